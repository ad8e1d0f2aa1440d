"""The machine a figure or a model was made on, and the numeric path that makes training
reproducible across machines.

- ``cpu_facts`` / ``isa_line``: the CPU model and the instruction sets that decide speed and
  int8 gains, for every results file and card (loadtest reports, the sentiment sweep).
- ``REPRODUCIBLE_ENV`` / ``pinned``: the CPU kernels torch, MKL and oneDNN choose, pinned to
  AVX2 and two threads, so that an AVX-512 machine computes what an AVX2 machine does; they
  must be set before torch starts, so ``pinned`` re-runs the module with them.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512vnni", "avx_vnni", "amx_tile")
REPRODUCIBLE_ENV = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "avx2",
                    "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def cpu_facts(cpuinfo: str | None = None) -> dict:
    """CPU model, flags of interest and the ISA line, from /proc/cpuinfo text."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = None, set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    have = {f: f in flags for f in ISA_FLAGS}
    model = model or platform.processor() or "unknown CPU"
    return {"model": model, "flags": have, "isa": isa_line(have)}


def isa_line(have: dict[str, bool]) -> str:
    """E.g. ``ISA: AVX2 (no AVX-512, no VNNI, no AMX)`` or
    ``ISA: AVX2, AVX-512, AVX-512 VNNI, AMX (no AVX-VNNI)``."""
    avx512_vnni = bool(have.get("avx512_vnni") or have.get("avx512vnni"))
    avx_vnni = bool(have.get("avx_vnni"))
    yes, no = [], []
    for name, ok in (("AVX2", have.get("avx2")), ("AVX-512", have.get("avx512f"))):
        (yes if ok else no).append(name)
    if avx512_vnni or avx_vnni:  # name the kind present, and the other kind as absent
        (yes if avx512_vnni else no).append("AVX-512 VNNI")
        (yes if avx_vnni else no).append("AVX-VNNI")
    else:
        no.append("VNNI")
    (yes if have.get("amx_tile") else no).append("AMX")
    return "ISA: " + (", ".join(yes) or "none of AVX2/AVX-512/VNNI/AMX") + (
        f" (no {', no '.join(no)})" if no and yes else "")



def pinned(module: str, argv: list[str]) -> None:
    """Re-run ``python -m module argv`` with ``REPRODUCIBLE_ENV`` unless it is already set."""
    if any(os.environ.get(k) != v for k, v in REPRODUCIBLE_ENV.items()):
        os.execve(sys.executable, [sys.executable, "-m", module, *argv], {**os.environ, **REPRODUCIBLE_ENV})
