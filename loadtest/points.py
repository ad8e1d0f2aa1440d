"""Measured points over HTTP: warm-up, interleaved repetitions, and their medians.

A ``Target`` is one thing to measure (URL, bodies, concurrency). ``rounds`` runs repetitions
the way this machine needs them: each round visits every group of targets in turn (e.g. the
variants, or the setups), warms the group at concurrency 32 (the Router's autoscaler may have
scaled down during a quiet minute) and then measures each target of the group once. Since the
rounds interleave, slow drift of the machine hits every target alike, and ratios are taken
per round (``report.ratios``). Each window records the load generator's result and CPU share,
the cores the server's process tree used, the cores other processes used (``OtherLoad``) and
the Router replicas before and after.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from loadtest.load import run_wrk, warm
from loadtest.report import Stat, fmt, say
from loadtest.service import BUSY, OtherLoad, Server, wait_quiet

WARM_CONCURRENCY = 32


@dataclass
class Target:
    """POST ``bodies`` (drawn by ``weights`` with ``seed`` when several) to ``url`` at ``concurrency``."""

    label: str
    url: str
    bodies: list[str]
    concurrency: int
    weights: list[float] | None = None
    seed: int = 0


def body(model: str, text: str | list[str]) -> str:
    return json.dumps({"model": model, "input": text})


def window(target: Target, duration_s: float, server: Server | None, hooks=None) -> dict:
    """One measured run of ``target``, with what the machine did meanwhile. ``hooks``: an object
    with ``before(target) -> token`` and ``after(target, token, run) -> dict`` (merged into the
    run), e.g. to scrape the service's metrics around the window."""
    token = hooks.before(target) if hooks else None
    before = server.replicas() if server else None
    cpu0 = server.cpu_s() if server else 0.0
    other = OtherLoad().start()
    r = run_wrk(target.url, target.bodies, target.concurrency, duration_s,
                weights=target.weights, seed=target.seed)
    other_cores = other.stop()
    run = {"result": r.as_dict(), "other_cores": other_cores,
           "server_cores": (server.cpu_s() - cpu0) / r.duration_s if server and r.duration_s else None,
           "replicas": [before, server.replicas() if server else None]}
    if hooks:
        run.update(hooks.after(target, token, run))
    say(f"  {target.label}: {r.rps:.1f} req/s, p50 {r.p50_ms:.1f} ms, p99 {r.p99_ms:.1f} ms"
        + (f", errors {r.errors}" if r.errors else "") + f", wrk {100 * r.client_cpu_share:.1f}% CPU"
        + (f", other {other_cores:.2f} cores" if other_cores > BUSY else ""))
    return run


def rounds(groups: dict[str, list[Target]], reps: int, warm_s: float | dict[str, float],
           duration_s: float, server_of: Callable[[str], Server | None], quiet_s: float = 0.0,
           hooks=None) -> dict[str, list[dict]]:
    """``reps`` interleaved rounds over ``groups``; {target label: [run per round]}.
    ``warm_s``: seconds, or seconds per group name."""
    runs: dict[str, list[dict]] = {t.label: [] for ts in groups.values() for t in ts}
    for rep in range(reps):
        for name, targets in groups.items():
            server = server_of(name)
            if quiet_s:
                wait_quiet(quiet_s, say)
            first = max(targets, key=lambda t: t.concurrency)
            seconds = warm_s.get(name, 0.0) if isinstance(warm_s, dict) else warm_s
            say(f"round {rep + 1}/{reps}, {name}: warm-up {seconds:g} s at c{WARM_CONCURRENCY}")
            warm(first.url, first.bodies, WARM_CONCURRENCY, seconds, weights=first.weights,
                 seed=first.seed + 7919 * (rep + 1))
            for t in sorted(targets, key=lambda t: -t.concurrency):
                runs[t.label].append(window(t, duration_s, server, hooks))
    return runs


def summary(runs: list[dict]) -> dict:
    """Medians and spreads of one target's runs."""
    res = [r["result"] for r in runs]
    errors: dict[str, int] = {}
    for x in res:
        for k, v in x["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {
        "rps": Stat.of(x["rps"] for x in res),
        "p50_ms": Stat.of(x["p50_ms"] for x in res),
        "p99_ms": Stat.of(x["p99_ms"] for x in res),
        "client_cpu_share": Stat.of(x["client_cpu_share"] for x in res),
        "server_cores": Stat.of(r["server_cores"] for r in runs),
        "other_cores_max": max((r["other_cores"] for r in runs), default=0.0),
        "errors": errors,
        "replicas": sorted({n for r in runs for n in r["replicas"] if n is not None}),
        "runs": runs,
    }


TABLE_HEAD = ("| setup | c | req/s | p50 ms | p99 ms | errors | wrk CPU (% of a core) "
              "| server cores | other cores (max) | replicas |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def table_row(label: str, concurrency: int, s: dict) -> str:
    errors = sum(s["errors"].values())
    err = f"{errors} ({', '.join(f'{k}: {v}' for k, v in s['errors'].items())})" if errors else "0"
    share = s["client_cpu_share"]
    cpu = "n/a" if share is None else f"{100 * share.median:.1f}%"
    other = f"{s['other_cores_max']:.2f}" + (" (!)" if s["other_cores_max"] > BUSY else "")
    reps = "/".join(str(n) for n in s["replicas"]) or "-"
    return (f"| {label} | {concurrency} | {fmt(s['rps'])} | {fmt(s['p50_ms'], 2)} | "
            f"{fmt(s['p99_ms'], 2)} | {err} | {cpu} | {fmt(s['server_cores'], 2)} | {other} | {reps} |")


def disturbed_note(summaries: dict[str, dict]) -> str:
    bad = [f"{label} ({s['other_cores_max']:.2f} cores)" for label, s in summaries.items()
           if s["other_cores_max"] > BUSY]
    if not bad:
        return ""
    return (f"(!) Disturbed: other processes used more than {BUSY:.2f} cores during some windows "
            "of: " + ", ".join(bad) + ". Those numbers are too low; rerun on a quiet machine.")


def common_args(p, duration: float, warmup: float, reps: int = 3):
    """The options every scenario shares; ``finish_args`` applies ``--quick``."""
    p.add_argument("--config", default="deploy/local.yaml", help="Serve config the service runs")
    p.add_argument("--reps", type=int, default=reps, help="repetitions per figure (>= 3)")
    p.add_argument("--duration", type=float, default=duration, help="measured seconds per window")
    p.add_argument("--warmup", type=float, default=warmup,
                   help=f"unrecorded seconds at c{WARM_CONCURRENCY} before each round of a setup")
    p.add_argument("--wait-quiet", type=float, default=60.0,
                   help="before each round wait up to this long for other processes to leave the "
                   "CPU idle (0: do not wait)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for /health")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 repetition, short windows; writes to loadtest/results/quick/")
    p.add_argument("--output", default=None, help="markdown path (default: loadtest/results/<name>.md)")
    return p


def finish_args(p, a, quick_duration: float = 3.0, quick_warmup: float = 2.0):
    if a.quick:
        a.reps, a.duration, a.warmup = 1, min(a.duration, quick_duration), min(a.warmup, quick_warmup)
        a.wait_quiet = min(a.wait_quiet, 5.0)
    elif a.reps < 3:
        p.error("--reps must be >= 3 (figures are medians of at least 3 repetitions); "
                "use --quick for a smoke run")
    return a
