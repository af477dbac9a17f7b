"""Perplexity and the speed benchmark — on tiny models."""

import math

import pytest
import torch

import skiplm
from skiplm.measure.speed import BenchSettings, make_configs, run_bench
from skiplm.measure.costs import CostModel
from skiplm.errors import DataError
from skiplm.measure.perplexity import compare_perplexity, perplexity, tokenize_corpus, windows

from conftest import tiny_model



@pytest.mark.parametrize("total,context,stride", [(10, 4, 2), (10, 4, 3), (3, 8, 4), (100, 16, 5), (17, 16, 15)])


def test_windows_score_every_token_once_with_enough_context(total, context, stride):
    scored = []
    for start, end, first in windows(total, context, stride):
        assert end - start <= context
        assert start < first <= end
        if start > 0:
            assert first - start >= context - stride  # every scored token sees at least this much context
        scored.extend(range(first, end))
    assert scored == list(range(1, total))


@pytest.mark.parametrize("stride", [0, 16, 20])


def test_windows_refuse_a_stride_without_overlap(stride):
    with pytest.raises(DataError, match="stride must be"):
        windows(100, 16, stride)


def test_perplexity_equals_direct_cross_entropy_when_one_window_fits():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(1))
    result = perplexity(model, ids, context=64, stride=32)
    with torch.inference_mode():
        logits = model(ids[None]).logits[0]
    direct = torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).item()
    assert result.tokens_scored == 39
    assert math.isclose(result.mean_nll, direct, rel_tol=1e-5)
    assert math.isclose(result.perplexity, math.exp(direct), rel_tol=1e-5)


def test_compare_perplexity_uses_the_decode_skip_set_for_every_token():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (60,), generator=torch.Generator().manual_seed(2))
    plan = skiplm.SkipPlan.from_layers(5, blocks=[2], prefill="full").for_model(model)
    same = skiplm.SkipPlan.from_layers(5, blocks=[2]).for_model(model)
    results = compare_perplexity(model, ids, {"full": None, "plan": plan, "same": same}, context=32, stride=16)
    assert results["full"].perplexity == perplexity(model, ids, context=32, stride=16).perplexity
    assert results["plan"].perplexity == results["same"].perplexity
    assert results["plan"].perplexity != results["full"].perplexity


def test_bootstrap_interval_brackets_the_median():
    from skiplm.measure.speed import bootstrap_median_ci

    values = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6]
    low, high = bootstrap_median_ci(values)
    assert 1.0 <= low <= 1.3 <= high <= 1.6 and low < high
    assert bootstrap_median_ci(values) == (low, high)  # seeded
    assert bootstrap_median_ci([2.0] * 5) == (2.0, 2.0)


def test_tokenize_corpus_refuses_empty_text():
    model, tokenizer = None, _FakeTokenizer()
    with pytest.raises(DataError, match="empty"):
        tokenize_corpus(tokenizer, "   ", 10)


class _FakeTokenizer:
    def __call__(self, text, **kwargs):  # pragma: no cover - never reached for empty text
        raise AssertionError("should refuse before tokenizing")


def test_bench_measures_every_config_and_reports_ratios():
    model = tiny_model("llama")
    block_plan = skiplm.SkipPlan.from_layers(5, blocks=[1, 3]).for_model(model)
    sublayer_plan = skiplm.SkipPlan.from_layers(5, attention=[2]).for_model(model)
    configs = make_configs(model, {"blocks": block_plan, "attn": sublayer_plan}, compare_pruned=True)
    assert [c.name for c in configs] == ["full", "blocks", "blocks (layers deleted)", "attn"]
    settings = BenchSettings(batch_sizes=(1, 2), prompt_tokens=8, decode_prompt_tokens=4, new_tokens=3, repeats=2, warmup=1)
    seen = []
    result = run_bench(configs, torch.arange(3, 100), settings, progress=seen.append)
    assert len(seen) == (settings.warmup + settings.repeats) * len(configs) * 4
    costs = CostModel.from_parameter_counts(model)
    for name in ["full", "blocks", "blocks (layers deleted)", "attn"]:
        for measure in ["prefill_b1", "decode_b1", "prefill_b2", "decode_b2"]:
            r = result[name][measure]
            assert len(r["samples_s"]) == 2 and all(s > 0 for s in r["samples_s"])
            assert r["median_s"] > 0 and r["tokens_per_s"] > 0
    assert result["full"]["decode_b1"]["speedup"] == 1.0
    low, high = result["blocks"]["decode_b1"]["speedup_ci95"]
    assert low <= result["blocks"]["decode_b1"]["speedup"] <= high
    assert result["blocks"]["decode_b1"]["ideal_speedup"] == pytest.approx(costs.ideal_speedup(block_plan.decode))
    assert result["blocks"]["decode_b1"]["ideal_speedup"] > result["attn"]["decode_b1"]["ideal_speedup"] > 1.0
    assert getattr(model, "_skiplm_handle", None) is None  # no plan left applied
