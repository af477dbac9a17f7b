"""LoRA-Drop on the real default model (SmolLM2-135M, 30 layers, sdpa attention): the paper's droppable layers,
one-forward scoring equals step-by-step decoding, and the KV cache of a decode holds what the schedule says."""

import pytest
import torch

import skiplm
from skiplm.lora_drop import LoraDrop, kv_cache_bytes

pytestmark = pytest.mark.slow


def test_the_default_model_scores_as_it_decodes():
    model, tokenizer = skiplm.load_model("smollm2-135m")
    skip = LoraDrop.initial(model, 2, 4, seed=0)
    g = torch.Generator().manual_seed(1)
    skip.corrections = {i: (a, torch.randn(b.shape, generator=g) * 0.05) for i, (a, b) in skip.corrections.items()}
    assert len(skip.droppable) == 22
    ids = tokenizer("The quick brown fox jumps over the lazy dog, and then it runs far away.",
                    return_tensors="pt").input_ids[:, :16]
    with torch.inference_mode():
        with skiplm.apply(model, skip.teacher_forced()):
            scored = model(ids, use_cache=False).logits
        with skiplm.apply(model, skip) as handle:
            out = model(ids[:, :1], use_cache=True)
            cache, logits = out.cache, [out.logits]
            for t in range(1, ids.shape[1]):
                out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
                cache = out.cache
                logits.append(out.logits)
        full = model(ids, use_cache=True).cache
    torch.testing.assert_close(torch.cat(logits, 1), scored, rtol=1e-3, atol=1e-3)
    assert handle.stats.to_json()["decode"]["dropped_layers_per_token"] == pytest.approx(22 * 8 / 15)
    assert kv_cache_bytes(cache) / kv_cache_bytes(full) == pytest.approx(skip.kv_fraction(1, 15))
