"""Where a verify pass goes: the full model over k new tokens after a 100-token cache, batch 1, fp32, 2 threads
(results in benchmarks/speculative/README.md).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speculative/verify_profile.py
"""
import time
import warnings

import torch
warnings.simplefilter("ignore")
torch.set_num_threads(2)
from skiplm.models import load_model, DEFAULT_MODEL
from transformers import DynamicCache
model, tok = load_model(DEFAULT_MODEL)
model.eval()
ids = torch.randint(100, 40000, (1, 100))
def step(k):
    cache = DynamicCache()
    with torch.inference_mode():
        model(ids, past_key_values=cache, use_cache=True)
        new = torch.randint(100, 40000, (1, k))
        t = time.perf_counter()
        model(new, past_key_values=cache, use_cache=True)
        return time.perf_counter() - t
res = {}
for k in (1, 8):
    for _ in range(3): step(k)
    ts = sorted(step(k) for _ in range(7)); res[k] = ts[3]
    print(f"k={k}: median {ts[3]*1e3:.1f} ms")
# the products alone: every linear weight times k rows
lin = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
for k in (1, 8):
    xs = {m.in_features: torch.randn(k, m.in_features) for m in lin}
    with torch.inference_mode():
        for _ in range(3):
            for m in lin: torch.nn.functional.linear(xs[m.in_features], m.weight)
        t = time.perf_counter()
        for _ in range(5):
            for m in lin: torch.nn.functional.linear(xs[m.in_features], m.weight)
        print(f"k={k}: all linear products (head included) {(time.perf_counter()-t)/5*1e3:.1f} ms")
from torch.profiler import profile, ProfilerActivity
cache = DynamicCache()
with torch.inference_mode():
    model(ids, past_key_values=cache, use_cache=True)
    new = torch.randint(100, 40000, (1, 8))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(new, past_key_values=cache, use_cache=True)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
