"""Per-request alternation of variants (x-variant header), paired: robust to machine drift."""
import json, socket, statistics as st, sys, time, random
from pathlib import Path
sys.path.insert(0, "/tmp/c1exp")
from exp import PORT, BODY, WT, ManagedServer
V = json.loads(sys.argv[2]); out = Path(sys.argv[1]); secs = float(sys.argv[3])
out.mkdir(parents=True, exist_ok=True); pdir = out / "probe"; pdir.mkdir(exist_ok=True)
(pdir / "flags.json").write_text(json.dumps({"variants": V, "probe": True}))
env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(WT), "LORASERVE_PROBE": str(pdir)}
srv = ManagedServer("service", [sys.executable, "-m", "serve.cli", "up", "--config", "/tmp/c1exp/local.yaml"], "127.0.0.1", PORT, out / "service.log", env=env, cwd=WT)
def one(s, buf, name, seq):
    req = (f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(BODY)}\r\nx-variant: {name}\r\nx-seq: {seq}\r\n\r\n").encode() + BODY
    t0 = time.perf_counter(); s.sendall(req)
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536); assert d; buf += d
    head, _, rest = buf.partition(b"\r\n\r\n")
    n = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    while len(rest) < n:
        d = s.recv(65536); assert d; rest += d
    assert head.split(b" ")[1] == b"200", head
    return time.perf_counter() - t0, rest[n:]
lat = {k: [] for k in V}; log = []
try:
    srv.start(); print("healthy", srv.wait_healthy(240), flush=True)
    def conn():
        s = socket.create_connection(("127.0.0.1", PORT)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); return s
    s = conn(); buf = b""
    def safe(k, seq):
        global s, buf
        try:
            t, buf = one(s, buf, k, seq); return t
        except (AssertionError, OSError) as e:
            print("reconnect", type(e).__name__, flush=True); s.close(); time.sleep(0.2); s = conn(); buf = b""; return None
    names = list(V); seq = 0
    end = time.time() + 8
    while time.time() < end:  # warm-up incl. each variant (alt weights get built)
        for k in names: seq += 1; safe(k, seq)
    end = time.time() + secs
    while time.time() < end:
        random.shuffle(names)
        for k in names:
            seq += 1; t = safe(k, seq)
            if t is None: lat = {kk: v[:min(len(x) for x in lat.values())] for kk, v in lat.items()}; break
            lat[k].append(t * 1e3)
    s.close()
finally:
    srv.stop()
base = next(iter(V)); n = min(len(v) for v in lat.values())
for k in V:
    d = [x - y for x, y in zip(lat[k][:n], lat[base][:n])]
    print(f"{k:24s} p50 {st.median(lat[k]):6.2f} ms  n={len(lat[k])}  paired per-cycle diff vs {base}: median {st.median(d):+.3f} ms")
json.dump(lat, open(out / "lat.json", "w"))
