"""Markdown output of the embeddings benchmark: machine header, results table, ratios.

Kept apart from the measuring code so the numbers and their presentation can change separately.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path

from cpuwatch import BUSY
from httpload import LoadResult

Row = tuple[str, LoadResult]  # (setup label, result)
REPO = Path(__file__).resolve().parents[1]


def rel(path: str) -> str:
    """A path relative to the repo when it lies inside it (for reports)."""
    try:
        return os.path.relpath(path, REPO) if Path(path).is_relative_to(REPO) else path
    except ValueError:
        return path


def command_line(argv: list[str]) -> str:
    """The command that produced a report, as a user would type it from the repo root."""
    return shlex.join([rel(sys.executable), rel(str(Path(sys.argv[0]).resolve())), *argv])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _ram_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


EMBEDDINGS_TITLE = "Embeddings throughput: loraserve vs. a plain FastAPI recipe vs. the in-process ceiling"


def machine_header(command: str, notes: list[str], title: str = EMBEDDINGS_TITLE) -> str:
    """Where and how the numbers were taken; numbers without this are not comparable."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# {title}",
        "",
        f"- date: {now}",
        f"- CPU: {_cpu_model()}, {os.cpu_count()} cores; RAM {_ram_gib()}",
        f"- OS: {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}, torch {_version('torch')}, transformers "
        f"{_version('transformers')}, ray {_version('ray')}, fastapi {_version('fastapi')}, "
        f"uvicorn {_version('uvicorn')}",
        f"- command: `{command}`",
        *[f"- {n}" for n in notes],
        "",
    ]
    return "\n".join(lines)


def _fmt(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def table(rows: list[Row]) -> str:
    """One line per setup x concurrency. The client-CPU column is the load generator's CPU time
    in the measured window (for in-process rows: the backend's own CPU time); "other CPU" is
    what processes outside the benchmark used meanwhile, in cores (should be ~0)."""
    out = [
        "| setup | concurrency | req/s | p50 ms | p99 ms | errors | client CPU s (% of 1 core) "
        "| other CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows:
        cpu = f"{r.client_cpu_s:.2f} ({100 * r.client_cpu_s / r.duration_s:.0f}%)"
        if label.startswith("in-process"):
            cpu = f"({cpu} backend)"
        errors = str(r.errors)
        if r.error_kinds:
            errors += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(r.error_kinds.items())) + ")"
        other = f"{r.other_cpu:.2f}" + (" (!)" if r.other_cpu > BUSY else "")
        out.append(
            f"| {label} | {r.concurrency} | {_fmt(r.rps)} | {_fmt(r.p50_ms, 2)} | "
            f"{_fmt(r.p99_ms, 2)} | {errors} | {cpu} | {other} |"
        )
    disturbed = [(label, r) for label, r in rows if r.other_cpu > BUSY]
    if disturbed:
        out += ["", f"(!) Disturbed: other processes used more than {BUSY:.2f} cores during these "
                "points, so their numbers are too low; rerun on a quiet machine."]
        out += [f"- {label} c{r.concurrency}: {r.other_cpu:.2f} cores, busiest {r.other_top}"
                for label, r in disturbed]
    return "\n".join(out)


def _find(rows: list[Row], prefix: str, concurrency: int) -> LoadResult | None:
    for label, r in rows:
        if label.startswith(prefix) and r.concurrency == concurrency:
            return r
    return None


def ratios(rows: list[Row], top: int) -> str:
    """The three headline numbers; ``top`` is the highest concurrency measured (normally 32)."""
    service, recipe = _find(rows, "service", top), _find(rows, "recipe", top)
    ceiling = _find(rows, "in-process", 32)
    c1 = _find(rows, "service", 1)
    lines = ["", "Ratios:", ""]

    def ratio(a: LoadResult | None, b: LoadResult | None) -> str:
        return f"{a.rps / b.rps:.2f}x" if a and b and b.rps else "n/a"

    lines.append(f"- service / recipe req/s at c{top}: {ratio(service, recipe)}")
    lines.append(
        f"- service at c{top} / in-process ceiling (backend looping over batches of 32): "
        f"{ratio(service, ceiling)}"
    )
    lines.append(f"- service p50 at c1: {_fmt(c1.p50_ms, 2) + ' ms' if c1 else 'n/a'}")
    alone = _find(rows, "in-process,", 1)
    if alone:
        lines.append(
            f"- one sentence through the model alone at a replica's thread count: p50 "
            f"{_fmt(alone.p50_ms, 2)} ms (the floor under the service's c1 p50; the rest is "
            "HAProxy, the replica's HTTP handling and the batcher hand-off)"
        )
    return "\n".join(lines)


def client_cpu_summary(rows: list[Row]) -> str:
    http = [r for label, r in rows if not label.startswith("in-process")]
    if not http:
        return ""
    cpu = sum(r.client_cpu_s for r in http)
    wall = sum(r.duration_s for r in http)
    return (
        f"\nLoad generator CPU: {cpu:.2f} s over {wall:.0f} s of measured windows "
        f"({100 * cpu / wall:.1f}% of one core on average; the machine has {os.cpu_count()} cores)."
    )
