"""Results files: what every benchmark writes, and the facts that make its numbers comparable.

Every results file (``loadtest/results/<name>.md`` and ``.json``; ``--quick`` smoke runs go to
``loadtest/results/quick/``, git-ignored) records: the commit (``git rev-parse --short HEAD``,
``+dirty`` when the tree has uncommitted changes), the exact command, the CPU model and its
instruction-set extensions (AVX2, AVX-512, VNNI, AMX: present or not, from /proc/cpuinfo),
core count, package versions, and the repetitions behind each figure. A figure is the median of
its repetitions with the spread (min-max): ``Stat``. Paths in results are relative to the
repository (``scrub``); absolute paths of this machine never reach a results file.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from models.machine import ISA_FLAGS, cpu_facts, isa_line  # noqa: F401  (re-exported: reports name the CPU)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "loadtest" / "results"
PACKAGES = ("torch", "transformers", "onnxruntime", "optimum", "peft", "ray", "fastapi", "uvicorn",
            "numpy", "tokenizers")


# -- statistics ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stat:
    """A figure over repetitions: median and spread."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values) -> Stat | None:
        vals = [float(v) for v in values if v is not None]
        if not vals:
            return None
        return cls(statistics.median(vals), min(vals), max(vals), len(vals))

    def fmt(self, digits: int = 1, unit: str = "") -> str:
        """``342.0 (317.0-370.0)``; one repetition: the value alone."""
        m = f"{self.median:,.{digits}f}{unit}"
        if self.n < 2:
            return m
        return f"{m} ({self.low:,.{digits}f}-{self.high:,.{digits}f})"

    def as_dict(self) -> dict:
        return {"median": self.median, "min": self.low, "max": self.high, "n": self.n}


def fmt(stat: Stat | None, digits: int = 1, unit: str = "") -> str:
    return "n/a" if stat is None else stat.fmt(digits, unit)


def ratio(a: Stat | None, b: Stat | None) -> Stat | None:
    """Median over median, with the spread of the extreme pairings (min/max, max/min)."""
    if a is None or b is None or not b.median or not b.low or not b.high:
        return None
    return Stat(a.median / b.median, a.low / b.high, a.high / b.low, min(a.n, b.n))


def ratios(a: list[float], b: list[float]) -> Stat | None:
    """Per-repetition ratios a[i] / b[i] (same round, so drift cancels), as a Stat."""
    return Stat.of([x / y for x, y in zip(a, b) if y])


# -- the machine and the code ----------------------------------------------------------------------
def cores() -> str:
    total = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = total
    return f"{usable} cores" + (f" (of {total})" if usable != total else "")


def cpu_ticks() -> tuple[int, int]:
    """(all, stolen) CPU ticks since boot (``/proc/stat``; (0, 0) elsewhere). Steal is time the
    hypervisor gave this VM's CPUs to someone else: on a shared VM it makes latency tails that
    no code here causes, so benchmarks record it beside their figures."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0


def steal_pct(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[0] - before[0]
    return 100.0 * (after[1] - before[1]) / total if total > 0 else 0.0


def ram_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def commit() -> str:
    """Short HEAD, ``+dirty`` when the working tree has uncommitted changes (results files
    aside: ``make bench`` rewrites them one scenario after another)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=20).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD") or "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)loadtest/results")
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions(extra: dict[str, str] | None = None) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in PACKAGES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out.update(extra or {})
    return out


def command(argv: list[str], module: str) -> str:
    """The command as typed from the repository root: ``.venv/bin/python -m loadtest.x ...``."""
    return shlex.join([rel(sys.executable), "-m", module, *argv])


def machine(argv: list[str], module: str, reps: int, extra_versions: dict | None = None) -> dict:
    cpu = cpu_facts()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(), "command": command(argv, module), "cpu": cpu["model"],
        "isa": cpu["isa"], "isa_flags": cpu["flags"], "cores": cores(), "ram": ram_gib(),
        "os": f"{platform.system()} {platform.release()}", "versions": versions(extra_versions),
        "repetitions": reps,
    }


def header(title: str, facts: dict, notes: list[str], quick: bool = False) -> str:
    v = ", ".join(f"{k} {val}" for k, val in facts["versions"].items())
    lines = [f"# {title}", ""]
    if quick:
        lines += ["**Smoke run (`--quick`): one short repetition; the numbers are not results.**", ""]
    lines += [
        f"- date: {facts['date']}; commit: {facts['commit']}",
        f"- command: `{facts['command']}`",
        f"- CPU: {facts['cpu']}, {facts['cores']}; {facts['isa']}; RAM {facts['ram']}; {facts['os']}",
        f"- versions: {v}",
        f"- figures: median of {facts['repetitions']} repetitions, spread (min-max) in brackets",
        *[f"- {n}" for n in notes],
        "",
    ]
    return "\n".join(lines)


# -- paths and files -------------------------------------------------------------------------------
def rel(path: str | Path) -> str:
    """A path relative to the repository when it lies inside it, else as given."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(REPO)) if p.is_absolute() else str(p)
    except ValueError:
        return str(p)


def _replacements() -> list[tuple[str, str]]:
    pairs = [(str(REPO) + "/", ""), (str(REPO), "."), (sys.prefix + "/", rel(sys.prefix) + "/"),
             (tempfile.gettempdir().rstrip("/") + "/", "<tmp>/"), (str(Path.home()) + "/", "~/")]
    return sorted({p for p in pairs if len(p[0]) > 1}, key=lambda p: -len(p[0]))


ABSOLUTE = re.compile(r"(?<![\w.<~])/(?:home|root|work|tmp|Users|var|opt|srv|mnt)/[^\s\"'`)]*")


def scrub(obj):
    """``obj`` (str, list, dict, ...) with this machine's absolute paths made relative (repo),
    ``<tmp>/`` (temporary files), ``~/`` (home); any other absolute path left: ``<abs>``."""
    if isinstance(obj, str):
        for old, new in _replacements():
            obj = obj.replace(old, new)
        return ABSOLUTE.sub("<abs>", obj)
    if isinstance(obj, dict):
        return {scrub(str(k)) if isinstance(k, str) else k: scrub(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(x) for x in obj]
    if isinstance(obj, Path):
        return scrub(str(obj))
    return obj


def _plain(obj):
    if isinstance(obj, Stat):
        return obj.as_dict()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    if hasattr(obj, "as_dict"):
        return _plain(obj.as_dict())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def output_paths(name: str, quick: bool, output: str | None = None) -> tuple[Path, Path]:
    md = Path(output) if output else (RESULTS / "quick" if quick else RESULTS) / f"{name}.md"
    return md, md.with_suffix(".json")


def write(name: str, title: str, facts: dict, notes: list[str], body: str, data: dict,
          quick: bool = False, output: str | None = None) -> tuple[Path, Path]:
    """Write ``<name>.md`` (header + body) and ``<name>.json`` (facts, notes, data)."""
    md, js = output_paths(name, quick, output)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(scrub(header(title, facts, notes, quick) + "\n" + body.rstrip() + "\n"))
    raw = {"title": title, "smoke_run": quick, "machine": facts, "notes": notes, **data}
    js.write_text(json.dumps(scrub(_plain(raw)), indent=1, default=str) + "\n")
    return md, js


def say(msg: str) -> None:
    """Progress on stderr, one line per step, with the time of day."""
    print(f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
