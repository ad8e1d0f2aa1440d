import sys, time, statistics as st, copy
sys.path.insert(0, "/work/c1wt")
import torch
from models.backend import create_backend
from serve.launcher import app_args, load_config
from serve.settings import AppSettings
settings = AppSettings.model_validate(app_args(load_config("/work/c1wt/deploy/local.yaml")))
spec = settings.models[0]
b = create_backend(spec, spec.default_variant); b.load()
torch.set_num_threads(1)
S = ["The quick brown fox jumps over the lazy dog."]
rows = b.encode(S)
from models.torch_backend import _pad
ids, mask = _pad(rows, 0)
enc = b.lora.encoder
perf = time.perf_counter
# variant: eager attention copy
from transformers import AutoModel
eager = AutoModel.from_pretrained(b.path, attn_implementation="eager", local_files_only=True).eval()
nopool = AutoModel.from_pretrained(b.path, add_pooling_layer=False, local_files_only=True).eval()
# pre-transposed linear
import torch.nn as nn
class TLinear(nn.Module):
    def __init__(self, lin):
        super().__init__(); self.wt = lin.weight.detach().t().contiguous(); self.b = lin.bias.detach()
    def forward(self, x):
        return torch.addmm(self.b, x.view(-1, x.shape[-1]), self.wt).view(*x.shape[:-1], self.wt.shape[1])
tl = copy.deepcopy(enc)
for name, m in list(tl.named_modules()):
    for cn, c in list(m.named_children()):
        if isinstance(c, nn.Linear): setattr(m, cn, TLinear(c))
# mkldnn packed linear
mk = copy.deepcopy(enc)
class MkLinear(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.w = torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach(), None) if False else lin.weight.detach().to_mkldnn()
        self.b = lin.bias.detach()
    def forward(self, x):
        return torch._C._nn.mkldnn_linear(x.to_mkldnn(), self.w, self.b.to_mkldnn()).to_dense() if False else torch.ops.mkldnn._linear_pointwise(x, self.w, self.b, "none", [], "") 
ok_mk = True
try:
    for name, m in list(mk.named_modules()):
        for cn, c in list(m.named_children()):
            if isinstance(c, nn.Linear): setattr(m, cn, MkLinear(c))
    with torch.inference_mode():
        d = (mk(input_ids=ids, attention_mask=mask).last_hidden_state - enc(input_ids=ids, attention_mask=mask).last_hidden_state).abs().max()
    print("mkldnn linear diff", float(d))
except Exception as e:
    print("mkldnn variant failed", type(e).__name__, str(e)[:200]); ok_mk = False
with torch.inference_mode():
    d = (tl(input_ids=ids, attention_mask=mask).last_hidden_state - enc(input_ids=ids, attention_mask=mask).last_hidden_state).abs().max()
print("tlinear diff", float(d))
V = {"base": lambda: enc(input_ids=ids, attention_mask=mask),
     "eager_attn": lambda: eager(input_ids=ids, attention_mask=mask),
     "no_pooler": lambda: nopool(input_ids=ids, attention_mask=mask),
     "t_linear": lambda: tl(input_ids=ids, attention_mask=mask)}
if ok_mk: V["mkldnn_lin"] = lambda: mk(input_ids=ids, attention_mask=mask)
res = {k: [] for k in V}
with torch.inference_mode():
    for f in V.values():
        for _ in range(20): f()
    end = perf() + float(sys.argv[1])
    while perf() < end:
        for k, f in V.items():
            t0 = perf(); f(); res[k].append(perf() - t0)
for k, v in res.items():
    print(f"{k:12s} median {st.median(v)*1e3:.3f} ms  n={len(v)}")
