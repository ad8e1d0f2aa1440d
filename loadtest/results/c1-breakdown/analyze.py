import json, glob, sys, statistics as st
from collections import defaultdict
out = sys.argv[1]
probe = {}
for f in glob.glob(f"{out}/probe/probe.*.jsonl"):
    for l in open(f):
        r = json.loads(l)
        if r.get("seq") is not None:
            probe[r["seq"]] = r
client = defaultdict(list)
for l in open(f"{out}/client.jsonl"):
    name, rnd, seq, t0, t1 = json.loads(l)
    client[name].append((seq, t0, t1))
SEG = ["c0", "recv", "ray_in", "ucw_in", "fastapi_in", "handle0", "body", "parsed", "tokenized", "worker_take", "queued_obs",
       "exec0", "exec1", "loop_resumed", "batch_obs", "results_set", "gather_ret", "wait_for_ret",
       "body_built", "json", "metrics", "send0", "send1", "c1"]
EXTRA = [("send1", "fastapi_out"), ("fastapi_out", "ray_out")]
names = sorted(client, key=lambda n: ("_direct" in n, n))
rows = {}
for name in names:
    segs = defaultdict(list); tot = []; n = 0
    for seq, t0, t1 in client[name]:
        r = probe.get(seq)
        if not r: continue
        r = dict(r, c0=t0, c1=t1)
        if not all(k in r for k in SEG): continue
        n += 1
        tot.append((t1 - t0) * 1e3)
        for a, b in list(zip(SEG, SEG[1:])) + EXTRA:
            segs[f"{a}->{b}"].append((r[b] - r[a]) * 1e3)
    rows[name] = (n, tot, segs)
keys = [f"{a}->{b}" for a, b in zip(SEG, SEG[1:])]
xkeys = [f"{a}->{b}" for a, b in EXTRA]
med = lambda v: st.median(v) if v else float("nan")
print(f"{'segment (median ms)':26s}" + "".join(f"{n[:16]:>17s}" for n in names))
print(f"{'n joined':26s}" + "".join(f"{rows[n][0]:>17d}" for n in names))
print(f"{'client total p50':26s}" + "".join(f"{med(rows[n][1]):>17.3f}" for n in names))
for k in keys + xkeys:
    print(f"{k:26s}" + "".join(f"{med(rows[n][2][k]):>17.3f}" for n in names))
print(f"{'sum of chain medians':26s}" + "".join(f"{sum(med(rows[n][2][k]) for k in keys):>17.3f}" for n in names))
print(f"{'non-forward (chain-fw)':26s}" + "".join(f"{sum(med(rows[n][2][k]) for k in keys if k != 'exec0->exec1'):>17.3f}" for n in names))
