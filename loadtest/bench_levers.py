"""Compare Serve's fast-path levers: run the service benchmark once per config in
loadtest/configs/ (plus the in-process ceiling once), and write one summary table.

Each config differs from deploy/local.yaml in one or two settings (its first line says which).
Points run one after another on a quiet machine; compare rows of the same run only, since this
machine drifts by up to +-30% between runs.

With ``--rounds N`` the configs run interleaved N times (ceiling first in each round) and the
table gives medians with the range, which is what a decision between close configs needs.

Usage: ``.venv/bin/python loadtest/bench_levers.py [--duration 10] [--rounds 1] [--only a,b]``
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
OUT = HERE / "results" / "levers"
ROW = re.compile(r"^\| (?P<setup>[^|]+?) \| (?P<c>\d+) \| (?P<rps>[\d.]+) \| (?P<p50>[\d.]+) \| (?P<p99>[\d.]+) \| (?P<err>\d+) \|")


def run_bench(args: list[str], output: Path) -> dict[tuple[str, int], dict]:
    cmd = [sys.executable, str(HERE / "bench_embeddings.py"), *args, "--output", str(output)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rows = {}
    for line in output.read_text().splitlines():
        m = ROW.match(line)
        if m:
            rows[(m["setup"], int(m["c"]))] = {k: float(m[k]) for k in ("rps", "p50", "p99", "err")}
    return rows


def _fmt(values: list[float], digits: int = 1) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--only", default="", help="comma-separated config names (default: all)")
    a = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    names = [c.stem for c in sorted(CONFIGS.glob("*.yaml"))]
    if a.only:
        names = [n for n in names if n in a.only.split(",")]
    common = ["--duration", str(a.duration), "--warmup", "3", "--concurrency", "1,32"]
    ceilings: list[float] = []
    got: dict[str, list[tuple[dict, dict]]] = {n: [] for n in names}
    for r in range(a.rounds):
        ceiling = run_bench([*common, "--setups", "ceiling"], OUT / "ceiling.md")
        ceilings.append(next(v["rps"] for (s, c), v in ceiling.items() if c == 32))
        for name in names:
            cfg = CONFIGS / f"{name}.yaml"
            rows = run_bench([*common, "--setups", "service", "--config", str(cfg)], OUT / f"{name}.md")
            got[name].append((rows[("service", 1)], rows[("service", 32)]))
            print(f"round {r + 1} {name}: c32 {rows[('service', 32)]['rps']:.1f} req/s, "
                  f"c1 p50 {rows[('service', 1)]['p50']:.1f} ms", flush=True)
    ceil = statistics.median(ceilings)
    lines = [
        "# Serve fast-path levers (service only)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; command: "
        f"`.venv/bin/python loadtest/bench_levers.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- {a.rounds} interleaved round(s); cells: median (min-max) over rounds",
        "- machine, versions and the last round's details: the files in levers/",
        f"- in-process ceiling (same backend, batches of 32, all cores): {_fmt(ceilings)} req/s",
        "",
        "| config | what differs | req/s c32 | of ceiling | p50 ms c32 | p50 ms c1 | errors |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        what = (CONFIGS / f"{name}.yaml").read_text().splitlines()[0].split(":", 1)[-1].strip()
        c1s, c32s = [x[0] for x in got[name]], [x[1] for x in got[name]]
        rps = [x["rps"] for x in c32s]
        errors = int(sum(x["err"] for x in c1s + c32s))
        lines.append(
            f"| {name} | {what} | {_fmt(rps)} | {statistics.median(rps) / ceil:.2f} "
            f"| {_fmt([x['p50'] for x in c32s])} | {_fmt([x['p50'] for x in c1s])} | {errors} |"
        )
    (HERE / "results" / "levers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
