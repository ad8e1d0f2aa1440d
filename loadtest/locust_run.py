"""A headless Locust run that leaves a report: CSV, Locust's HTML page, a Markdown summary with
PNG plots (users, requests per second, p50/p95 latency and failures over time), and the SLO
verdict as the exit code.

    .venv/bin/python -m loadtest.locust_run --host http://127.0.0.1:8000 [--users 16 --time 60]
        [--stages 30:4,60:16,60:4] [--out loadtest/results/locust] [-- extra locust options]

The user mix, adapters and SLO come from the environment (the top of loadtest/locustfile.py).
``run`` and ``plot`` are also the load and the plots of the autoscaling scenario.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

from loadtest.report import REPO

BIN = Path(sys.executable).parent
LOCUSTFILE = REPO / "loadtest" / "locustfile.py"


def run(host: str, out: Path, *, users: int = 16, time_s: int = 60, stages: str | None = None,
        env: dict | None = None, extra: list[str] | None = None, wait: bool = True):
    """Start Locust headless, writing ``out/locust_*.csv`` (with history) and ``out/locust.html``;
    returns the finished process (``wait``) or the running one."""
    out.mkdir(parents=True, exist_ok=True)
    argv = [str(BIN / "locust"), "-f", str(LOCUSTFILE), "--headless", "--host", host,
            "--csv", str(out / "locust"), "--csv-full-history", "--html", str(out / "locust.html"),
            "--only-summary", "--stop-timeout", "10"]
    if not stages:
        argv += ["-u", str(users), "-r", str(users), "-t", f"{time_s}s"]
    full_env = {**os.environ, **(env or {}), **({"LORASERVE_STAGES": stages} if stages else {})}
    proc = subprocess.Popen(argv + (extra or []), env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if wait:
        proc.output, _ = proc.communicate()
    return proc


def history(out: Path) -> list[dict]:
    """Locust's per-second aggregated rows: t (s from start), users, rps, p50, p95, failures/s."""
    rows = [r for r in csv.DictReader(open(out / "locust_stats_history.csv")) if r["Name"] == "Aggregated"]
    if not rows:
        return []
    t0 = int(rows[0]["Timestamp"])

    def num(r, key):
        try:
            return float(r[key])
        except (ValueError, KeyError):
            return 0.0

    return [{"t": int(r["Timestamp"]) - t0, "users": num(r, "User Count"), "rps": num(r, "Requests/s"),
             "fails": num(r, "Failures/s"), "p50": num(r, "50%"), "p95": num(r, "95%")} for r in rows]


def totals(out: Path) -> dict:
    rows = list(csv.DictReader(open(out / "locust_stats.csv")))
    return {r["Name"]: {"requests": int(r["Request Count"]), "failures": int(r["Failure Count"]),
                        "p50_ms": float(r["50%"]), "p95_ms": float(r["95%"]), "p99_ms": float(r["99%"]),
                        "rps": float(r["Requests/s"])} for r in rows}


def plot(out: Path, hist: list[dict], extra: dict[str, list[tuple[float, float]]] | None = None,
         title: str = "Locust run") -> Path:
    """One PNG: users, requests/s, p50/p95 latency and failures over time; ``extra`` series
    (for example replicas per deployment) get a panel of their own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 4 if extra else 3
    fig, axes = plt.subplots(panels, 1, figsize=(9, 2.4 * panels), sharex=True)
    t = [h["t"] for h in hist]
    axes[0].plot(t, [h["users"] for h in hist], color="gray", label="users")
    ax = axes[0].twinx()
    ax.plot(t, [h["rps"] for h in hist], color="tab:blue", label="requests/s")
    axes[0].set_ylabel("users")
    ax.set_ylabel("requests/s")
    axes[0].legend(loc="upper left")
    ax.legend(loc="upper right")
    axes[1].plot(t, [h["p50"] for h in hist], label="p50")
    axes[1].plot(t, [h["p95"] for h in hist], label="p95")
    axes[1].set_ylabel("latency (ms)")
    axes[1].legend(loc="upper left")
    axes[2].plot(t, [h["fails"] for h in hist], color="tab:red", label="failures/s")
    axes[2].set_ylabel("failures/s")
    axes[2].legend(loc="upper left")
    if extra:
        for name, points in sorted(extra.items()):
            axes[3].step([p[0] for p in points], [p[1] for p in points], where="post", label=name)
        axes[3].set_ylabel("replicas")
        axes[3].legend(loc="upper left", fontsize="small")
    axes[-1].set_xlabel("seconds since the load started")
    fig.suptitle(title)
    fig.tight_layout()
    path = out / "locust.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def markdown(out: Path, proc, title: str) -> Path:
    tot = totals(out)
    verdict = [line for line in (proc.output or "").splitlines() if line.strip().startswith(("PASS", "FAIL", "SLO"))]
    lines = [f"# {title}", "", f"Locust exit code {proc.returncode} (non-zero: the SLO was missed).", "",
             "```", *verdict, "```", "", "| route | requests | failures | p50 ms | p95 ms | p99 ms | req/s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in tot.items():
        lines.append(f"| {name} | {r['requests']} | {r['failures']} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
                     f"{r['p99_ms']:.0f} | {r['rps']:.1f} |")
    lines += ["", "![users, throughput, latency and failures over time](locust.png)", "",
              "Files: `locust_stats.csv`, `locust_stats_history.csv`, `locust_failures.csv`, `locust.html`."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="http://127.0.0.1:8000")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--time", type=int, default=60, help="seconds (ignored with --stages)")
    p.add_argument("--stages", default=None, help="seconds:users pairs, e.g. 30:4,60:16,60:4")
    p.add_argument("--out", default=str(REPO / "loadtest" / "results" / "locust"))
    a = p.parse_args(argv)
    out = Path(a.out)
    proc = run(a.host, out, users=a.users, time_s=a.time, stages=a.stages, extra=extra)
    print(proc.output[-3000:])
    plot(out, history(out))
    print(f"report: {markdown(out, proc, f'Locust against {a.host}')}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
