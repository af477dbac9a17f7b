"""The oracles again, on an accelerator: empty plan == vanilla, cached == recomputed, speculative greedy == plain
greedy (same-weights, bfloat16 and int8 drafts, on-the-fly selection), policies and the search planner run there.

The device is ``$SKIPLM_TEST_DEVICE``, else CUDA where torch sees it; skipped otherwise. On a GPU machine:
``pytest tests/test_device.py``; ``SKIPLM_TEST_DEVICE=cpu`` runs the same checks on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

import skiplm
from skiplm import SkipPlan
from skiplm.measure.latency import LatencyModel
from skiplm.planners.search import plan_search
from skiplm.policies import calibrate
from skiplm.speculative.decoder import SpeculativeDecoder, plain_generate

from conftest import NUM_LAYERS, VOCAB, greedy_with_cache, plan_for, tiny_model

DEVICE = os.environ.get("SKIPLM_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no accelerator (set SKIPLM_TEST_DEVICE to choose a device)")
FAMILIES = ["llama", "qwen2", "gemma2", "phi3"]


def device_model(family: str):
    return tiny_model(family).to(DEVICE)


def prompts(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator).to(DEVICE)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_empty_plan_is_vanilla_and_cached_equals_recomputed_on_the_device(family):
    model = device_model(family)
    ids = prompts(2, 12)
    vanilla = model(ids).logits
    with skiplm.apply(model, SkipPlan.from_layers(NUM_LAYERS).for_model(model)):
        assert torch.equal(model(ids).logits, vanilla)
    with skiplm.apply(model, plan_for(model, blocks=[1], attention=[3], mlp=[2])):
        sequence, cached = greedy_with_cache(model, ids[:1], steps=8)
        recomputed = model(sequence).logits[0, ids.shape[1] - 1:]
        assert torch.allclose(cached, recomputed, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(model(ids).logits, vanilla, atol=1e-3)  # the plan does skip


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("draft", ["plan", "bfloat16", "int8", "adapt"])
@torch.no_grad()
def test_speculative_greedy_equals_plain_greedy_on_the_device(family, draft):
    model = device_model(family)
    ids = prompts(3, 10, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row
    expected = plain_generate(model, ids, mask, max_new_tokens=24, eos_token_id=[])
    plan = plan_for(model, blocks=[2])
    options = {"plan": {"plan": plan}, "bfloat16": {"draft_dtype": "bfloat16"}, "int8": {"draft_dtype": "int8"},
               "adapt": {"plan": plan, "alternatives": [plan_for(model, blocks=[1, 3]), plan_for(model)]}}[draft]
    with SpeculativeDecoder(model, **options) as decoder:
        for batch in (slice(0, 1), slice(0, 3)):
            out = decoder.generate(ids[batch], mask[batch], max_new_tokens=24, fallback=False, eos_token_id=[],
                                   max_draft=4)
            assert out.tokens == expected[batch]
            assert out.stats.rounds > 0
    assert getattr(model, "_skiplm_handle", None) is None


@torch.no_grad()
def test_policy_and_search_planner_run_on_the_device():
    model = device_model("llama")
    batches = [prompts(1, 32, seed=s) for s in range(2)]
    policy = calibrate(model, "ffn-skip", batches, 0.3, steps=6)
    with skiplm.apply(model, policy, check_model=False) as handle:
        logits = model(batches[0]).logits
        assert torch.isfinite(logits).all() and 0.0 < handle.stats.mlp_skip_ratio("prefill") <= 1.0
    latency = LatencyModel.measure(model, context=8, steps=4, repeats=2)
    assert latency.full_s > 0
    plan = plan_search(model, calibration=batches, speedup=1.2,
                       latency_model=LatencyModel(0.003, 0.001, 0.002, NUM_LAYERS, 1, 8), refine_budget=8)
    with skiplm.apply(model, plan):
        assert torch.isfinite(model(batches[0]).logits).all()
