"""Fine-grained interleaved A/B on one service: short alternating blocks, paired per cycle."""
import argparse, json, os, random, statistics as st, sys, time
from pathlib import Path
sys.path.insert(0, "/tmp/c1exp")
import exp
from exp import c1_client, PORT, BODY, WT, ManagedServer, run_load_in_process

def main():
    p = argparse.ArgumentParser()
    p.add_argument("out"); p.add_argument("--variants", required=True)
    p.add_argument("--cycles", type=int, default=12); p.add_argument("--block", type=float, default=2.5)
    p.add_argument("--c32cycles", type=int, default=3); p.add_argument("--c32block", type=float, default=4)
    a = p.parse_args()
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True); pdir = out / "probe"; pdir.mkdir(exist_ok=True)
    V = json.loads(a.variants)
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(WT), "LORASERVE_PROBE": str(pdir)}
    (pdir / "flags.json").write_text(json.dumps({"probe": False}))
    srv = ManagedServer("service", [sys.executable, "-m", "serve.cli", "up", "--config", "/tmp/c1exp/local.yaml"],
                        "127.0.0.1", PORT, out / "service.log", env=env, cwd=WT)
    c1 = {k: [] for k in V}; c32 = {k: [] for k in V}
    def setflags(f):
        (pdir / "flags.json").write_text(json.dumps(dict(f, probe=False))); time.sleep(0.35)
        c1_client("127.0.0.1", PORT, 0.3, 90_000_000, warm=0)  # both replicas pick the flags up
    try:
        srv.start(); print(f"healthy after {srv.wait_healthy(240):.0f}s", flush=True)
        c1_client("127.0.0.1", PORT, 4, 0, warm=0)
        for cyc in range(a.cycles):
            order = list(V); random.shuffle(order)
            for k in order:
                setflags(V[k])
                recs, _ = c1_client("127.0.0.1", PORT, a.block, 1, warm=0.2)
                c1[k].append(st.median([(t1 - t0) * 1e3 for _, t0, t1 in recs]))
            print(cyc, {k: round(v[-1], 2) for k, v in c1.items()}, flush=True)
        for cyc in range(a.c32cycles):
            order = list(V); random.shuffle(order)
            for k in order:
                setflags(V[k])
                r = run_load_in_process(f"http://127.0.0.1:{PORT}/v1/embeddings", BODY, 32, 1.5, a.c32block)
                c32[k].append(r.rps)
            print("c32", cyc, {k: round(v[-1], 1) for k, v in c32.items()}, flush=True)
    finally:
        srv.stop()
    base = next(iter(V))
    lines = []
    for k in V:
        if not c1[k]: c1[k] = [0.0]; c1[base] = c1[base] or [0.0]
        d = [x - y for x, y in zip(c1[k], c1[base])]
        q = st.quantiles(d, n=4) if len(d) > 1 else [0, 0, 0]
        line = (f"{k:22s} c1 p50 median {st.median(c1[k]):6.2f} ms (range {min(c1[k]):.2f}-{max(c1[k]):.2f}); "
                f"paired diff vs {base}: median {st.median(d):+.2f} ms, IQR [{q[0]:+.2f}, {q[2]:+.2f}]")
        if c32[k]:
            dd = [x / y - 1 for x, y in zip(c32[k], c32[base])]
            line += f" | c32 {st.median(c32[k]):6.1f} req/s {[round(x) for x in c32[k]]}, paired {st.median(dd)*100:+.1f}%"
        lines.append(line)
    print("\n".join(lines)); (out / "summary.txt").write_text("\n".join(lines) + "\n" + json.dumps({"c1": c1, "c32": c32}))

if __name__ == "__main__":
    main()
