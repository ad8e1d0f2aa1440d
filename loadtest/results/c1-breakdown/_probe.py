"""EXPERIMENT ONLY (not for commit): per-request timestamps and runtime A/B flags.

Enabled by env LORASERVE_PROBE=<dir>. Valid at concurrency 1 per replica only (one global record).
Flags file: <dir>/flags.json, re-read when its mtime changes (checked every 0.25 s).
"""

import json
import os
import time

DIR = os.environ.get("LORASERVE_PROBE")
ON = bool(DIR)
FLAGS: dict = {}
_cur: dict = {}
_done: list = []
_last_check = 0.0
_mtime = 0.0
perf = time.perf_counter


def mark(name: str) -> None:
    if ON and FLAGS.get("probe", True):
        _cur[name] = perf()


def check_flags() -> None:
    global _last_check, _mtime, FLAGS
    now = perf()
    if now - _last_check < 0.25:
        return
    _last_check = now
    try:
        m = os.stat(os.path.join(DIR, "flags.json")).st_mtime
    except OSError:
        return
    if m != _mtime:
        _mtime = m
        with open(os.path.join(DIR, "flags.json")) as fh:
            FLAGS = json.load(fh)
        VARIANTS.update(FLAGS.get("variants", {}))
        if "variants" not in FLAGS:
            _apply_torch()


BACKENDS = []
VARIANTS: dict = {}
_ALT = {}


def _swap_layout(want):
    import copy, torch
    for b in BACKENDS:
        if id(b) not in _ALT:
            alt = copy.deepcopy(b.lora.encoder)
            for m in alt.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.data = m.weight.data.t().contiguous().t()
            _ALT[id(b)] = (b.lora.encoder, alt)
        b.lora.encoder = _ALT[id(b)][1 if want else 0]
_layout = False


def _apply_torch():
    global _layout
    import torch
    want = bool(FLAGS.get("layout"))
    if want != _layout:
        for b in BACKENDS:
            for m in b.lora.encoder.modules():
                if isinstance(m, torch.nn.Linear):
                    w = m.weight.data
                    m.weight.data = w.t().contiguous().t() if want else w.contiguous()
        _layout = want
    if "mkldnn" in FLAGS:
        torch.backends.mkldnn.enabled = bool(FLAGS["mkldnn"])


def install() -> None:
    """Patch uvicorn's protocol and Ray's direct-ingress ASGI entry (call in the replica)."""
    if not ON:
        return
    with open(os.path.join(DIR, f"where.{os.getpid()}.txt"), "w") as fh:
        import serve, models
        fh.write(f"{serve.__file__} {models.__file__}\n")
    from uvicorn.protocols.http import httptools_impl
    from ray.serve._private import replica as rr

    orig_dr = httptools_impl.HttpToolsProtocol.data_received

    def data_received(self, data):
        global _cur
        _cur = {"recv": perf()}
        return orig_dr(self, data)

    httptools_impl.HttpToolsProtocol.data_received = data_received

    orig_asgi = rr.Replica._direct_ingress_asgi

    async def _direct_ingress_asgi(self, scope, receive, send):
        _cur["ray_in"] = perf()
        seq = None
        for k, v in scope.get("headers", ()):
            if k == b"x-seq":
                seq = int(v)
        rec = _cur
        for k, v in scope.get("headers", ()):
            if k == b"x-variant":
                global FLAGS
                FLAGS = dict(VARIANTS.get(v.decode(), {}), probe=FLAGS.get("probe", True))
                _swap_layout(bool(FLAGS.get("layout")))

        async def send2(msg):
            if msg["type"] == "http.response.start":
                rec["send0"] = perf()
            await send(msg)
            if msg["type"] == "http.response.body":
                rec["send1"] = perf()

        await orig_asgi(self, scope, receive, send2)
        rec["ray_out"] = perf()
        rec["seq"] = seq
        _done.append(rec)
        if len(_done) >= 100:
            with open(os.path.join(DIR, f"probe.{os.getpid()}.jsonl"), "a") as fh:
                for r in _done:
                    fh.write(json.dumps(r) + "\n")
            _done.clear()

    rr.Replica._direct_ingress_asgi = _direct_ingress_asgi

    orig_ucw = rr.UserCallableWrapper._call_http_entrypoint

    async def _call_http_entrypoint(self, *a, **kw):
        mark("ucw_in")
        return await orig_ucw(self, *a, **kw)

    rr.UserCallableWrapper._call_http_entrypoint = _call_http_entrypoint

    from fastapi import FastAPI
    orig_fa = FastAPI.__call__

    async def fa_call(self, scope, receive, send):
        mark("fastapi_in")
        await orig_fa(self, scope, receive, send)
        mark("fastapi_out")

    FastAPI.__call__ = fa_call
