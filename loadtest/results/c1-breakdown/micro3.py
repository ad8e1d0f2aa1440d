import sys, time, statistics as st, copy
sys.path.insert(0, "/work/c1wt")
import torch, torch.nn as nn
from models.backend import create_backend
from serve.launcher import app_args, load_config
from serve.settings import AppSettings
settings = AppSettings.model_validate(app_args(load_config("/work/c1wt/deploy/local.yaml")))
spec = settings.models[0]
b = create_backend(spec, spec.default_variant); b.load()
torch.set_num_threads(1)
b2 = create_backend(spec, spec.default_variant); b2.load()
for m in b2.lora.encoder.modules():
    if isinstance(m, nn.Linear):
        m.weight.data = m.weight.data.t().contiguous().t()
perf = time.perf_counter
for n in (1, 32):
    rows = b.encode(["The quick brown fox jumps over the lazy dog."] * n)
    print(n, "max diff", float(abs(b.predict(rows) - b2.predict(rows)).max()))
    res = {"base": [], "strided_w": []}
    for _ in range(5): b.predict(rows); b2.predict(rows)
    end = perf() + float(sys.argv[1])
    while perf() < end:
        t0 = perf(); b.predict(rows); t1 = perf(); b2.predict(rows); t2 = perf()
        res["base"].append(t1 - t0); res["strided_w"].append(t2 - t1)
    print(n, {k: round(st.median(v) * 1e3, 3) for k, v in res.items()}, "paired median diff", round(st.median([y - x for x, y in zip(res["base"], res["strided_w"])]) * 1e3, 3), "n", len(res["base"]))
