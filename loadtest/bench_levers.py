"""Compare Serve's fast-path levers: run the service benchmark once per config in
loadtest/configs/ (plus the in-process ceiling once), and write one summary table.

Each config differs from deploy/local.yaml in one or two settings (its first line says which).
Points run one after another on a quiet machine; compare rows of the same run only, since this
machine drifts by up to +-30% between runs.

Usage: ``.venv/bin/python loadtest/bench_levers.py [--duration 10] [--only name,name]``
"""

from __future__ import annotations

import argparse
import re
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--only", default="", help="comma-separated config names (default: all)")
    a = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    names = [c.stem for c in sorted(CONFIGS.glob("*.yaml"))]
    if a.only:
        names = [n for n in names if n in a.only.split(",")]
    common = ["--duration", str(a.duration), "--warmup", "3", "--concurrency", "1,32"]
    ceiling = run_bench([*common, "--setups", "ceiling"], OUT / "ceiling.md")
    ceil32 = next(v["rps"] for (s, c), v in ceiling.items() if c == 32)
    lines = [
        "# Serve fast-path levers (service only, one run)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; command: "
        f"`.venv/bin/python loadtest/bench_levers.py {' '.join(argv or sys.argv[1:])}`",
        "- machine, versions and per-run details: the files beside this one (levers/*.md)",
        f"- in-process ceiling (same backend, batches of 32, all cores): {ceil32:.1f} req/s",
        "",
        "| config | what differs | req/s c32 | of ceiling | p50 ms c32 | p50 ms c1 | p99 ms c1 | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        cfg = CONFIGS / f"{name}.yaml"
        what = cfg.read_text().splitlines()[0].split(":", 1)[-1].strip()
        rows = run_bench([*common, "--setups", "service", "--config", str(cfg)], OUT / f"{name}.md")
        c1, c32 = rows[("service", 1)], rows[("service", 32)]
        lines.append(
            f"| {name} | {what} | {c32['rps']:.1f} | {c32['rps'] / ceil32:.2f} | {c32['p50']:.1f} "
            f"| {c1['p50']:.1f} | {c1['p99']:.1f} | {int(c1['err'] + c32['err'])} |"
        )
        print(lines[-1], flush=True)
    (HERE / "results" / "levers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
