"""Self-speculative decoding on tiny models: greedy output equals plain greedy decoding, sampled output follows the
full model's distribution, draft length adapts, fallback keeps it from being slower, stats add up."""

from __future__ import annotations

import math
import json

import pytest
import torch

import skiplm
from skiplm import SkipPlan
from skiplm.measure.agreement import greedy_continuations
from skiplm.errors import DataError, ModelLoadError, PlanError
from skiplm.speculative import (
    AdaptiveDraftLength,
    Sampling,
    SpeculativeDecoder,
    SpeedMonitor,
    generate,
    plain_generate,
)

from conftest import NUM_LAYERS, VOCAB, cached_tiny_model, plan_for, run_cli

# Draft plans over the 5 layers of the tiny models, from "the draft is the full model" to "the draft is nearly nothing".
DRAFTS = {
    "empty": {},  # every draft accepted
    "blocks": dict(blocks=[1, 3]),
    "sublayers": dict(attention=[1, 2], mlp=[3]),
    "nearly_all": dict(blocks=[0, 1, 2, 3]),  # nearly always wrong
}
FAMILIES = ["llama", "qwen2", "gemma2", "phi3"]  # gemma2: sliding windows of 8 tokens, shorter than the sequences


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def left_padded(lengths, seed=0):
    """A left-padded batch of random prompts (ids avoid pad / bos / eos) and its attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(3, VOCAB, (length,), generator=g)
        mask[row, width - length:] = 1
    return ids, mask


def rows_of(ids, mask):
    return [ids[row][mask[row].bool()].tolist() for row in range(ids.shape[0])]


def oracle(model, ids, mask, new_tokens, eos=()):
    """Plain greedy decoding by the agreement module (independent code), each row alone (no padding)."""
    return greedy_continuations(model, rows_of(ids, mask), new_tokens=new_tokens, eos_ids=list(eos), pad_token_id=0,
                                batch_size=1)


# -- greedy: exact ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_speculative_equals_plain_greedy(family):
    model = cached_tiny_model(family)
    ids, mask = left_padded([5, 13, 9], seed=hash(family) % 1000)
    expected = oracle(model, ids, mask, 30)
    assert plain_generate(model, ids, mask, max_new_tokens=30, eos_token_id=[]) == expected
    for name, layers in DRAFTS.items():
        plan = plan_for(model, **layers)
        for max_draft in (1, 4) if name != "empty" else (8,):
            out = generate(model, None, ids, mask, plan=plan, max_new_tokens=30, max_draft=max_draft, fallback=False,
                           eos_token_id=[])
            assert out.tokens == expected, (name, max_draft)
            if name == "empty":
                assert out.stats.acceptance_rate == 1.0
        # batch 1, each row alone, with the default fallback monitor on
        for row, prompt in enumerate(rows_of(ids, mask)[:2]):
            out = generate(model, None, torch.tensor([prompt]), plan=plan, max_new_tokens=30, eos_token_id=[])
            assert out.tokens == [expected[row]], (name, row)
    assert getattr(model, "_skiplm_handle", None) is None


@pytest.mark.parametrize("family", ["mistral", "qwen3", "gemma3_text", "olmo2"])
def test_greedy_exact_on_the_remaining_families(family):
    model = cached_tiny_model(family)
    ids, mask = left_padded([11, 4], seed=3)
    expected = oracle(model, ids, mask, 24)
    for layers in (DRAFTS["blocks"], DRAFTS["sublayers"]):
        out = generate(model, None, ids, mask, plan=plan_for(model, **layers), max_new_tokens=24, max_draft=4,
                       fallback=False, eos_token_id=[])
        assert out.tokens == expected


def test_prefill_at_full_depth_and_prefill_only_skips():
    model = cached_tiny_model("llama")
    ids, mask = left_padded([7, 12], seed=5)
    expected = oracle(model, ids, mask, 20)
    full_prefill = SkipPlan.from_layers(NUM_LAYERS, blocks=[1, 3], prefill="full").for_model(model)
    out = generate(model, None, ids, mask, plan=full_prefill, max_new_tokens=20, fallback=False, eos_token_id=[])
    assert out.tokens == expected


def test_rows_stop_at_their_own_eos():
    model = cached_tiny_model("qwen2")
    ids, mask = left_padded([6, 10, 8], seed=11)
    free = oracle(model, ids, mask, 24)
    stop = next(i for i in range(3, 24) if free[1][i] not in free[1][:i])
    eos = free[1][stop]  # row 1 stops at its token `stop`; the others wherever (or never) they meet it
    expected = oracle(model, ids, mask, 24, eos=[eos])
    assert expected[1][-1] == eos and len(expected[1]) == stop + 1
    for layers in DRAFTS.values():
        streamed = [[] for _ in range(3)]

        def stream(rows):
            for row, tokens in zip(streamed, rows):
                row.extend(tokens)

        out = generate(model, None, ids, mask, plan=plan_for(model, **layers), max_new_tokens=24, max_draft=5,
                       fallback=False, eos_token_id=eos, streamer=stream)
        assert out.tokens == expected
        assert streamed == expected


def test_batch_advances_by_the_fewest_accepted_and_reports_the_waste():
    model = cached_tiny_model("llama")
    ids, mask = left_padded([9, 9, 9, 9], seed=2)
    plan = plan_for(model, **DRAFTS["sublayers"])
    out = generate(model, None, ids, mask, plan=plan, max_new_tokens=32, max_draft=6, fallback=False,
                   eos_token_id=[])
    assert out.tokens == oracle(model, ids, mask, 32)
    s = out.stats
    assert s.discarded == s.accepted - s.committed_from_draft >= 0
    alone = [generate(model, None, ids[r:r + 1], plan=plan, max_new_tokens=32, max_draft=6, fallback=False,
                      eos_token_id=[]).stats for r in range(4)]
    assert all(a.discarded == 0 for a in alone)
    # a batch commits no more drafts per row and round than its rows do alone
    assert s.tokens_per_round <= max(a.tokens_per_round for a in alone) + 1e-9


# -- the draft variants -----------------------------------------------------------------------------------------------
def test_bf16_draft_is_exact_and_reports_its_memory():
    model = cached_tiny_model("llama")
    ids, mask = left_padded([8, 14], seed=4)
    expected = oracle(model, ids, mask, 24)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # the lean draft copies every weight in bf16 but the embedding table (it looks rows up in the model's own)
    # and the RMS norms' weights (folded into the products that follow them)
    norms = sum(p.numel() * 4 for name, p in model.named_parameters() if "norm" in name)
    copied = weights - model.get_input_embeddings().weight.numel() * 4 - norms
    for engine, expected_bytes in (("modules", (weights // 2, weights // 2 + 64)),  # + fp32 rotary buffers
                                   ("lean", (copied // 2, copied // 2))):
        for plan in (None, plan_for(model, blocks=[2])):
            out = generate(model, None, ids, mask, plan=plan, draft_dtype=torch.bfloat16, max_new_tokens=24,
                           fallback=False, eos_token_id=[], draft_engine=engine)
            assert out.tokens == expected
            assert expected_bytes[0] <= out.stats.draft_weight_bytes <= expected_bytes[1]
            if plan is None:
                assert out.stats.acceptance_rate > 0.5
    # the verifier is the full model even when a plan is applied to it after the low-precision copy was made
    with SpeculativeDecoder(model, draft_dtype="bfloat16") as decoder, skiplm.apply(model, plan_for(model, blocks=[1])):
        assert decoder.generate(ids, mask, max_new_tokens=24, fallback=False, eos_token_id=[]).tokens == expected
    same = generate(model, None, ids, mask, plan=plan_for(model, blocks=[2]), max_new_tokens=8, eos_token_id=[])
    assert same.stats.draft_weight_bytes == 0
    assert getattr(model, "_skiplm_handle", None) is None and next(model.parameters()).dtype == torch.float32


def test_int8_linear_matches_its_dequantized_weights_with_and_without_the_kernel():
    from skiplm.speculative.quantize import Int8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    quantized = Int8Linear(linear.weight, linear.bias)
    x = torch.randn(3, 5, 64)
    dequantized = quantized.weight_int8.float() * quantized.scale.float()[:, None]
    # half a quantization step, plus the scale's own bfloat16 rounding (2^-8 of the weight)
    assert ((dequantized - linear.weight).abs() <= quantized.scale.float()[:, None] / 2 + linear.weight.abs() / 256
            + 1e-7).all()
    reference = torch.nn.functional.linear(x.bfloat16().float(), dequantized, linear.bias)
    out = quantized(x)
    assert out.shape == (3, 5, 48) and out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference, rtol=0.03, atol=0.03)
    quantized.use_kernel = not quantized.use_kernel  # the other path gives the same numbers
    assert torch.allclose(quantized(x).float(), out.float(), rtol=0.02, atol=0.02)


def test_int8_draft_is_exact_and_smaller_than_the_model():
    model = cached_tiny_model("llama")
    ids, mask = left_padded([8, 14], seed=5)
    expected = oracle(model, ids, mask, 24)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    for plan in (None, plan_for(model, blocks=[2])):
        out = generate(model, None, ids, mask, plan=plan, draft_dtype="int8", max_new_tokens=24, fallback=False,
                       eos_token_id=[])
        assert out.tokens == expected
        assert 0 < out.stats.draft_weight_bytes < weights // 2  # int8 weights, bf16 embeddings and norms
        if plan is None:
            assert out.stats.acceptance_rate > 0.5
    assert next(model.parameters()).dtype == torch.float32 and getattr(model, "_skiplm_handle", None) is None


def test_a_draft_plan_carries_its_precision():
    from skiplm.speculative import draft_precision

    model = cached_tiny_model("llama")
    plan = plan_for(model, blocks=[1])
    carried = SkipPlan.from_layers(NUM_LAYERS, blocks=[1], model=plan.model, provenance={"draft": {"precision": "int8"}})
    assert draft_precision(plan) is None and draft_precision(carried) == "int8"
    with SpeculativeDecoder(model, carried) as decoder:
        assert decoder.draft_model is not model and decoder.draft_weight_bytes > 0
        assert decoder.draft_engine == "lean" and decoder.draft_model.precision == "int8"
    with SpeculativeDecoder(model, carried, draft_dtype="bfloat16") as decoder:  # an explicit precision wins
        assert decoder.draft_model.precision == "bfloat16" and decoder.plan == carried
    with SpeculativeDecoder(model, carried, draft_engine="modules") as decoder:
        assert decoder.draft_engine == "modules" and next(decoder.draft_model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown draft precision 'int4'"):
        SpeculativeDecoder(model, draft_dtype="int4")


def test_draft_selector_tries_every_plan_then_keeps_the_fastest_and_re_explores():
    from skiplm.speculative import DraftSelector

    plans = ["a", "b", "c"]  # the selector only holds them
    selector = DraftSelector(plans, trial_rounds=2, explore_every=4, smoothing=0.0)
    seconds_per_token = {0: 3.0, 1: 1.0, 2: 2.0}
    chosen = []
    for _ in range(12):
        index = selector.choose()
        chosen.append(index)
        selector.observe(index, seconds_per_token[index] * 2, 2)
    assert chosen[:6] == [0, 0, 1, 1, 2, 2]  # each plan for its trial rounds, in order
    assert chosen[6:10] == [1, 1, 1, 1]  # then the fastest
    assert chosen[10:12] == [0, 0]  # after 4 rounds, the plan tried least recently gets another trial
    seconds_per_token[0] = 0.5  # ... and the text now suits it better: it becomes the choice
    selector.observe(0, 1.0, 2)
    assert selector.choose() == 0 and selector.rounds == [5, 6, 2]


@pytest.mark.parametrize("draft_dtype", [None, "int8"])
def test_on_the_fly_draft_selection_stays_exact_and_switches(draft_dtype):
    model = cached_tiny_model("qwen2")
    ids, mask = left_padded([9, 13, 6], seed=7)
    expected = oracle(model, ids, mask, 40)
    plans = [plan_for(model, **DRAFTS[name]) for name in ("nearly_all", "blocks", "empty")]
    with SpeculativeDecoder(model, plans[0], draft_dtype=draft_dtype, alternatives=plans[1:]) as decoder:
        decoder.selector.explore_every = 3
        for _ in range(2):
            out = decoder.generate(ids, mask, max_new_tokens=40, fallback=False, eos_token_id=[], max_draft=3)
            assert out.tokens == expected
            assert sum(out.stats.rounds_by_plan) == out.stats.rounds and out.stats.draft_switches >= 1
        assert all(count > 0 for count in decoder.selector.rounds)  # every candidate drafted
        if draft_dtype is None:  # the empty plan drafts the full model: 4 tokens a round against ~1, at ~equal cost
            assert decoder.selector.best() == 2
    assert getattr(model, "_skiplm_handle", None) is None


def test_on_the_fly_selection_needs_the_draft_plan():
    model = cached_tiny_model("llama")
    with pytest.raises(PlanError, match="plan="):
        SpeculativeDecoder(model, draft_dtype="bfloat16", alternatives=[plan_for(model, blocks=[1])])
    with SpeculativeDecoder(model, plan_for(model, blocks=[2]), alternatives=[plan_for(model, blocks=[1])]) as decoder:
        with pytest.raises(PlanError, match="on the fly"):
            decoder.set_plan(plan_for(model, blocks=[3]))


def test_decoder_reuses_a_plan_the_caller_applied_and_leaves_it():
    model = cached_tiny_model("phi3")
    ids, mask = left_padded([10], seed=6)
    plan = plan_for(model, blocks=[1])
    with skiplm.apply(model, plan) as handle:
        with SpeculativeDecoder(model) as decoder:
            assert decoder.plan is plan
            out = decoder.generate(ids, mask, max_new_tokens=16, fallback=False, eos_token_id=[])
        assert model._skiplm_handle is handle  # still applied
        with handle.disabled():
            assert out.tokens == oracle(model, ids, mask, 16)


def test_set_plan_between_generations():
    model = cached_tiny_model("llama")
    ids, mask = left_padded([10], seed=7)
    expected = oracle(model, ids, mask, 16)
    with SpeculativeDecoder(model, plan_for(model, blocks=[1])) as decoder:
        first = decoder.generate(ids, mask, max_new_tokens=16, fallback=False, eos_token_id=[])
        decoder.set_plan(plan_for(model))
        second = decoder.generate(ids, mask, max_new_tokens=16, fallback=False, eos_token_id=[])
    assert first.tokens == second.tokens == expected
    assert second.stats.acceptance_rate == 1.0
    assert getattr(model, "_skiplm_handle", None) is None


# -- sampling: the full model's distribution --------------------------------------------------------------------------
def _distribution(model, prefix, sampling):
    logits = model(torch.tensor([prefix])).logits[0, -1]
    return sampling.probabilities(logits)


def _exact_joint(model, prompt, steps, sampling, handle=None, draft_from=None):
    """P(t1..t_steps | prompt) under the full model, as {tuple: prob}. With ``draft_from`` = i, tokens from position i
    on are drawn from the draft (the plan applied) instead: what a wrong implementation that samples from the draft
    would produce."""
    joint = {(): 1.0}
    for step in range(steps):
        nxt = {}
        for prefix, mass in joint.items():
            if draft_from is not None and step >= draft_from:
                probs = _distribution(model, prompt + list(prefix), sampling)
            else:
                with handle.disabled() if handle is not None else _null():
                    probs = _distribution(model, prompt + list(prefix), sampling)
            for token in torch.nonzero(probs > 0).flatten().tolist():
                nxt[prefix + (token,)] = mass * float(probs[token])
        joint = nxt
    return joint


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _tv(counts, total, joint):
    keys = set(counts) | set(joint)
    return 0.5 * sum(abs(counts.get(k, 0) / total - joint.get(k, 0.0)) for k in keys)


def _chi2_ok(counts, total, joint, alpha_z=3.5):
    """Pearson chi-square over outcomes (those expected < 5 pooled), against a Wilson–Hilferty critical value."""
    cells, pooled_obs, pooled_exp = [], 0, 0.0
    for key, prob in joint.items():
        expected = prob * total
        if expected < 5:
            pooled_obs += counts.get(key, 0)
            pooled_exp += expected
        else:
            cells.append((counts.get(key, 0), expected))
    pooled_obs += sum(c for k, c in counts.items() if k not in joint)
    if pooled_exp > 0 or pooled_obs:
        cells.append((pooled_obs, max(pooled_exp, 1e-9)))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    df = len(cells) - 1
    critical = df * (1 - 2 / (9 * df) + alpha_z * math.sqrt(2 / (9 * df))) ** 3
    return stat, critical


def test_sampled_first_tokens_follow_the_full_model_batched():
    """4,000 independent rows in one batch: token 1 comes from the verifier's prefill, token 2 from rejection
    sampling against a draft (rows accept different drafts, so the batch advances one token per round)."""
    model = cached_tiny_model("llama")
    prompt = [5, 17, 33, 9, 60, 2 + 40]
    sampling = Sampling(True, temperature=0.8, top_k=4, top_p=0.95)
    plan = plan_for(model, mlp=[2])
    rows = 4000
    out = generate(model, None, torch.tensor([prompt] * rows), plan=plan, max_new_tokens=3, do_sample=True,
                   temperature=0.8, top_k=4, top_p=0.95, max_draft=1, seed=123, fallback=False, eos_token_id=[])
    assert out.stats.rounds >= 1 and out.stats.drafted >= rows
    counts = {}
    for tokens in out.tokens:
        counts[tuple(tokens[:2])] = counts.get(tuple(tokens[:2]), 0) + 1
    exact = _exact_joint(model, prompt, 2, sampling)
    with skiplm.apply(model, plan) as handle:
        wrong = _exact_joint(model, prompt, 2, sampling, handle=handle, draft_from=1)
    assert abs(sum(exact.values()) - 1) < 1e-5
    tv = _tv(counts, rows, exact)
    stat, critical = _chi2_ok(counts, rows, exact)
    assert stat < critical, (stat, critical, tv)
    assert tv < 0.05
    wrong_tv = 0.5 * sum(abs(exact.get(k, 0) - wrong.get(k, 0)) for k in set(exact) | set(wrong))
    assert wrong_tv > 0.15, wrong_tv  # sampling token 2 from the draft would fail the bound above by far
    assert 0.05 < out.stats.acceptance_rate < 0.95  # both branches of the rejection sampler were exercised


def _sample_chains(decoder, prompt, samples):
    """One generation per seed (top-2 sampling, 4 new tokens, drafts of up to 2): counts of the first 3 tokens, and
    each generation's stats."""
    counts, runs = {}, []
    for seed in range(samples):
        out = decoder.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=True, top_k=2, max_draft=2,
                               seed=seed, fallback=False, eos_token_id=[])
        key = tuple(out.tokens[0][:3])
        counts[key] = counts.get(key, 0) + 1
        runs.append(out.stats)
    return counts, runs


def test_sampled_chains_follow_the_full_model_one_row_at_a_time():
    """Batch 1, drafts of 2 tokens with no confidence stop: tokens 2 and 3 come from one round's accept / reject
    chain (accepted, rejected at the first or the second draft, or a bonus token)."""
    model = cached_tiny_model("qwen2")
    prompt = [7, 70, 21, 99, 3]
    sampling = Sampling(True, temperature=1.0, top_k=2)
    plan = plan_for(model, blocks=[2])
    decoder = SpeculativeDecoder(model, plan, draft_length=AdaptiveDraftLength(threshold=0.0, adapt=False))
    samples = 300
    try:
        counts, runs = _sample_chains(decoder, prompt, samples)
        accepted, drafted = sum(s.accepted for s in runs), sum(s.drafted for s in runs)
        exact = _exact_joint(model, prompt, 3, sampling, handle=decoder.draft_handle)
        wrong = _exact_joint(model, prompt, 3, sampling, handle=decoder.draft_handle, draft_from=1)
    finally:
        decoder.close()
    tv = _tv(counts, samples, exact)
    stat, critical = _chi2_ok(counts, samples, exact)
    assert stat < critical, (stat, critical, tv)
    wrong_tv = 0.5 * sum(abs(exact.get(k, 0) - wrong.get(k, 0)) for k in set(exact) | set(wrong))
    assert tv < 0.12 < wrong_tv - 0.05, (tv, wrong_tv)
    assert 0.1 < accepted / drafted < 0.9


def test_sampling_is_reproducible_with_a_seed_and_warpers_are_applied():
    model = cached_tiny_model("llama")
    ids, mask = left_padded([6, 9], seed=8)
    kwargs = dict(plan=plan_for(model, blocks=[2]), max_new_tokens=12, do_sample=True, top_k=5, temperature=0.7,
                  fallback=False, eos_token_id=[])
    a = generate(model, None, ids, mask, seed=1, **kwargs)
    b = generate(model, None, ids, mask, seed=1, **kwargs)
    assert a.tokens == b.tokens
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.count_nonzero(Sampling(True, top_k=2).probabilities(logits)) == 2
    top_p = Sampling(True, top_p=0.7).probabilities(logits)  # softmax: .64 .24 .09 .03 -> keeps the first two
    assert torch.count_nonzero(top_p) == 2 and torch.isclose(top_p.sum(), torch.tensor(1.0))


# -- draft length and fallback ----------------------------------------------------------------------------------------
def test_adaptive_threshold_follows_acceptance():
    policy = AdaptiveDraftLength(threshold=0.5, target_acceptance=0.8, step=0.1)
    for _ in range(3):
        policy.update(drafted=4, accepted=0)
    assert policy.threshold == pytest.approx(0.8)
    assert policy.stop(torch.tensor([0.7, 0.95])) and not policy.stop(torch.tensor([0.85]))
    for _ in range(20):
        policy.update(drafted=4, accepted=4)
    assert policy.threshold == pytest.approx(0.0)


def test_draft_length_adapts_in_generation():
    model = cached_tiny_model("llama")
    ids, _ = left_padded([12], seed=9)
    lengths = {}
    for name in ("empty", "nearly_all"):
        out = generate(model, None, ids, plan=plan_for(model, **DRAFTS[name]), max_new_tokens=60, max_draft=6,
                       fallback=False, eos_token_id=[])
        lengths[name] = out.stats.drafted / out.stats.rounds
        if name == "empty":
            assert out.stats.final_threshold == 0.0 and max(out.stats.accepted_histogram) > 0
            assert len(out.stats.accepted_histogram) == 7  # full-length drafts of 6 were made and all accepted
    assert lengths["nearly_all"] < lengths["empty"]
    fixed = SpeculativeDecoder(model, plan_for(model, **DRAFTS["nearly_all"]),
                               draft_length=AdaptiveDraftLength(threshold=0.0, adapt=False))
    rounds = []
    with fixed:
        fixed.generate(ids, max_new_tokens=31, max_draft=5, fallback=False, eos_token_id=[], on_round=rounds.append)
    assert rounds[0].drafted == 5  # no confidence stop: max_draft, except where fewer tokens are left
    assert sum(r.drafted < 5 for r in rounds) <= 4


def test_speed_monitor_falls_back_when_speculation_does_not_pay_and_retries():
    monitor = SpeedMonitor(probe_steps=2, min_rounds=2, backoff=4, max_backoff=8, smoothing=0.5)
    assert not monitor.speculate()
    monitor.observe_plain(1.0)
    monitor.observe_plain(1.0)
    assert monitor.speculate()
    monitor.observe_round(seconds=2.0, tokens=4)
    monitor.observe_round(seconds=2.0, tokens=4)  # 0.5 s/token < 1: keep going
    assert monitor.speculate() and not monitor.events
    monitor.observe_round(seconds=3.0, tokens=1)
    monitor.observe_round(seconds=3.0, tokens=1)  # smoothed rate now above plain decoding's
    assert not monitor.speculate() and len(monitor.events) == 1 and monitor.plain_left == 4
    for _ in range(4):
        monitor.observe_plain(1.0)
    assert monitor.speculate()  # retry, judged after one round blended into the estimate it had
    monitor.observe_round(seconds=3.0, tokens=1)
    assert not monitor.speculate() and monitor.plain_left == 8  # back-off doubled
    for _ in range(8):
        monitor.observe_plain(1.0)
    monitor.observe_round(seconds=0.5, tokens=4)  # the text got easier: one fast round pays for the blend
    assert monitor.speculate() and len(monitor.events) == 2 and monitor.backoff == 4 and not monitor.retrying


def test_a_slow_first_round_does_not_poison_the_monitor_but_a_slow_draft_still_falls_back():
    # the reported case: plain decoding ~33 ms/token; a draft at ~19 ms/token whose first round paid 1.2 s of setup
    def run(draft_s_per_token, first_round_s, source):
        monitor = SpeedMonitor()
        for _ in range(3):
            monitor.observe_plain(0.033, source="plain")  # the first is a warm-up: two probes after it
        assert monitor.speculate() and len(monitor.warmups) == 1
        monitor.observe_round(first_round_s, 4, source=source)
        for token in range(4, 200, 4):
            if monitor.speculate():
                monitor.observe_round(draft_s_per_token * 4, 4, at_token=token, source=source)
            else:
                monitor.observe_plain(0.033, source="plain")
        return monitor

    fast = run(0.019, 1.2, source="draft")
    assert not fast.events and fast.warmups[-1] == {"kind": "speculative", "seconds": 1.2, "tokens": 4}
    poisoned = run(0.019, 1.2, source=None)  # what the monitor did before warm-ups were recognised
    assert poisoned.events and poisoned.backoff > poisoned.initial_backoff
    slow = run(0.05, 0.2, source="draft")  # a draft that really is slower than plain decoding
    assert slow.events and slow.events[0]["reason"].startswith("speculation 50.0 ms/token > plain decoding 33.0")
    assert slow.plain_left > 0 or slow.backoff > slow.initial_backoff


def test_fallback_kicks_in_for_a_useless_draft_and_output_stays_exact():
    model = cached_tiny_model("gemma2")
    ids, mask = left_padded([10, 6], seed=10)
    out = generate(model, None, ids, mask, plan=plan_for(model, **DRAFTS["nearly_all"]), max_new_tokens=60,
                   max_draft=4, eos_token_id=[])
    assert out.tokens == oracle(model, ids, mask, 60)
    s = out.stats
    assert s.fallbacks >= 1 and s.fallback_steps > 0 and s.fallback_events
    assert s.fallback_events[0]["speculative_s_per_token"] > s.fallback_events[0]["plain_s_per_token"]
    assert s.plain_steps >= s.fallback_steps + 2  # the probe steps too


def test_a_decoder_keeps_one_speed_monitor_per_batch_size():
    model = cached_tiny_model("llama")
    ids, mask = left_padded([10, 6], seed=11)
    with SpeculativeDecoder(model, plan_for(model, blocks=[2])) as decoder:
        decoder.generate(ids[:1], mask[:1], max_new_tokens=12, eos_token_id=[])
        one = decoder.monitors[1]
        observed = one.plain_observed
        decoder.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
        # a batch of two is timed by its own monitor: a step's cost depends on the batch size
        assert set(decoder.monitors) == {1, 2} and decoder.monitors[1] is one and one.plain_observed == observed
        assert decoder.monitors[2].plain_observed >= 2  # its own probe steps
        decoder.generate(ids[1:], mask[1:], max_new_tokens=12, eos_token_id=[])
        assert decoder.monitors[1] is one and one.plain_observed >= observed  # batch 1 carries on where it was


# -- stats, hooks, streaming, errors ----------------------------------------------------------------------------------
def test_stats_add_up():
    model = cached_tiny_model("olmo2")
    ids, mask = left_padded([8, 11, 5], seed=12)
    rounds = []
    out = generate(model, None, ids, mask, plan=plan_for(model, **DRAFTS["sublayers"]), max_new_tokens=40,
                   max_draft=4, eos_token_id=[], on_round=rounds.append)
    s = out.stats
    assert s.new_tokens == 40 and [len(t) for t in out.tokens] == [40, 40, 40]
    # ragged rounds: each row commits its own accepted drafts and the full model's token; a row stops at 40
    # ragged rounds: a row that has its 40 tokens finishes, the others go on
    assert s.row_rounds == sum(len(r.accepted) for r in rounds) and [len(r.accepted) for r in rounds] == sorted(
        (len(r.accepted) for r in rounds), reverse=True)
    assert len(rounds) == s.rounds == sum(s.accepted_histogram)
    assert s.drafted == sum(r.drafted * len(r.accepted) for r in rounds)
    assert s.accepted == sum(sum(r.accepted) for r in rounds)
    assert s.committed_from_draft == sum(round((r.committed - 1) * len(r.accepted)) for r in rounds)
    assert s.acceptance_rate == s.accepted / s.drafted
    assert s.mean_accepted_per_round == s.accepted / s.row_rounds
    assert all(abs(r.committed - 1 - sum(r.accepted) / len(r.accepted)) < 1e-9 and r.drafted <= 4 for r in rounds)
    assert s.draft_seconds >= 0 and s.verify_seconds > 0 and s.total_seconds >= s.prefill_seconds
    assert "drafts accepted" in s.describe() and s.to_json()["acceptance_rate"] == s.acceptance_rate
    assert s.draft_cache_bytes > 0 or s.rounds == 0


def test_text_streamer_protocol_and_tokenizer_texts(tiny_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    model = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()

    class Collect:
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, value):
            self.tokens.extend(value.tolist())

        def end(self):
            self.ended = True

    streamer = Collect()
    ids = tokenizer("Hello there", return_tensors="pt").input_ids
    plan = SkipPlan.from_layers(4, blocks=[1]).for_model(model)
    out = generate(model, tokenizer, ids, plan=plan, max_new_tokens=10, streamer=streamer)
    assert streamer.ended and streamer.tokens == out.tokens[0]
    assert out.texts == [tokenizer.decode(out.tokens[0], skip_special_tokens=True)]
    eos = model.generation_config.eos_token_id
    assert out.tokens == plain_generate(model, ids, max_new_tokens=10, eos_token_id=eos if eos is not None else
                                        tokenizer.eos_token_id)


def test_bad_input_gets_clear_errors():
    model = cached_tiny_model("llama")
    ids, mask = left_padded([4, 6], seed=13)
    with pytest.raises(PlanError, match="needs a draft"):
        SpeculativeDecoder(model)
    with pytest.raises(DataError, match="left padding"):
        generate(model, None, ids, mask.flip(1), plan=plan_for(model))
    with pytest.raises(DataError, match="max_draft"):
        generate(model, None, ids, mask, plan=plan_for(model), max_draft=0)
    with pytest.raises(DataError, match="temperature"):
        generate(model, None, ids, mask, plan=plan_for(model), do_sample=True, temperature=0)
    with skiplm.apply(model, plan_for(model)), pytest.raises(PlanError, match="already applied"):
        SpeculativeDecoder(model, draft_dtype="bfloat16")
    from skiplm.policies import make_policy

    with pytest.raises(PlanError, match="input-adaptive policy cannot draft"):
        SpeculativeDecoder(model, make_policy("ffn-skip", 5, 0.5, protect_first=1, protect_last=1))
    assert getattr(model, "_skiplm_handle", None) is None


def test_cli_generate_speculative(tiny_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    plan_file = SkipPlan.from_layers(4, blocks=[1]).for_model(model).save(tmp_path / "draft.json")
    result = run_cli("generate", tiny_folder, "--speculative", "--plan", plan_file, "--prompt", "Hello",
                     "--max-new-tokens", 12, "--max-draft", 3)
    assert result.exception is None, result.output
    result = run_cli("generate", tiny_folder, "--speculative", "--draft-dtype", "bfloat16", "--prompt", "Hello",
                     "--max-new-tokens", 6, "--temperature", 0.8, "--top-k", 5)
    assert result.exception is None, result.output
    result = run_cli("generate", tiny_folder, "--speculative", "--draft-dtype", "int8", "--draft-engine", "modules",
                     "--prompt-lookup", 0, "--prompt", "Hello", "--max-new-tokens", 6)
    assert result.exception is None, result.output
    assert "modules engine" in result.output and "prompt lookup" not in result.output
    result = run_cli("generate", tiny_folder, "--speculative", "--prompt", "Hello")
    assert isinstance(result.exception, PlanError) and "draft" in str(result.exception)
    result = run_cli("generate", tiny_folder, "--speculative", "--plan", plan_file, "--adapt", "--prompt", "Hello")
    assert isinstance(result.exception, PlanError) and "draft-search --alternatives" in str(result.exception)
    # a draft plan that names its precision and runner-ups: int8 copy, skip set chosen on the fly
    carried = SkipPlan.from_layers(4, blocks=[1], provenance={"draft": {"precision": "int8", "alternatives": [[2], []]}})
    carried_file = carried.for_model(model).save(tmp_path / "carried.json")
    result = run_cli("generate", tiny_folder, "--speculative", "--plan", carried_file, "--adapt", "--prompt", "Hello",
                     "--max-new-tokens", 16, "--max-draft", 2)
    assert result.exception is None, result.output
    assert "int8 copy" in result.output and "rounds per candidate draft plan" in result.output


# -- the benchmark command ---------------------------------------------------------------------------------------------
def test_speculative_bench_command_measures_and_every_output_is_identical(tiny_folder, tmp_path):
    from conftest import run_cli

    plan_path = skiplm.SkipPlan.from_layers(4, blocks=[1]).save(tmp_path / "skip1.json")
    out = tmp_path / "spec"
    result = run_cli("bench-speculative", tiny_folder, "--draft-plan", plan_path, "--draft-dtype", "bfloat16",
                     "--draft-dtype", "int8:modules", "--prompt-lookup", 2, "--force", "--limit", 4, "--batch-sizes",
                     "1,4", "--new-tokens", 8, "--repeats", 2, "-o", out)
    assert result.exception is None, result.output
    data = json.loads((out / "speculative.json").read_text())
    assert data["drafts"] == {
        "skip1": "skip blocks 1 of 4 layers", "bfloat16": "bfloat16 copy", "int8:modules": "int8 copy (modules engine)",
        "skip1+lookup": "skip blocks 1 of 4 layers; combined with 2-gram prompt lookup",
        "bfloat16+lookup": "bfloat16 copy; combined with 2-gram prompt lookup",
        "int8:modules+lookup": "int8 copy (modules engine); combined with 2-gram prompt lookup"}
    assert set(data["results"]) == {"gsm8k_b1", "gsm8k_b4", "pydoc_b1", "pydoc_b4"}
    for key, entry in data["results"].items():
        assert entry["rows"] == 4 and entry["plain"]["tokens"] > 0
        assert entry["skip1"]["lookup_rounds"] == 0 <= entry["skip1+lookup"]["lookup_rounds"]
        for name in data["drafts"]:
            measured = entry[name]
            assert measured["identical_rows"] == 4 * 2, (key, name)  # greedy speculative == plain greedy, every row
            assert len(measured["speedup_per_round"]) == 2 and measured["speedup"] > 0
            assert 0 <= measured["acceptance_rate"] <= 1
    assert data["results"]["pydoc_b1"]["bfloat16"]["draft_weight_mib"] > 0
    assert data["results"]["pydoc_b1"]["skip1"]["draft_weight_mib"] == 0
    assert "| pydoc | 4 | bfloat16 |" in (out / "speculative.md").read_text()
    assert (out / "speculative.png").stat().st_size > 1000

    result = run_cli("bench-speculative", tiny_folder, "-o", out)
    assert isinstance(result.exception, PlanError) and "give a draft" in str(result.exception)
    result = run_cli("bench-speculative", tiny_folder, "--draft-dtype", "bfloat16", "--limit", 2, "--batch-sizes", "4",
                     "-o", out)
    assert isinstance(result.exception, DataError) and "batch 4 needs more" in str(result.exception)
    result = run_cli("bench-speculative", tiny_folder, "--draft-dtype", "bfloat16", "--prompts", "poems", "-o", out)
    assert isinstance(result.exception, DataError) and "unknown prompt set 'poems'" in str(result.exception)
    result = run_cli("bench-speculative", tiny_folder, "--draft-dtype", "int8:fast", "-o", out)
    assert isinstance(result.exception, DataError) and "unknown draft engine 'fast'" in str(result.exception)


def test_draft_search_times_the_candidates_and_saves_the_fastest(tiny_folder, tmp_path):
    from conftest import run_cli

    out = tmp_path / "draft.json"
    result = run_cli("draft-search", tiny_folder, "--max-blocks", 2, "--limit", 2, "--new-tokens", 6,
                     "--precisions", "float32,int8", "--repeats", 2, "-o", out)
    assert result.exception is None, result.output
    search = json.loads((tmp_path / "draft.search.json").read_text())
    assert set(search["speedups"]) == {"skip-1-blocks", "skip-2-blocks", "skip-0-blocks-int8", "skip-1-blocks-int8",
                                       "skip-2-blocks-int8"}
    assert search["best"] == max(search["speedups"], key=search["speedups"].get)
    assert search["pays"] == (search["speedups"][search["best"]] > 1.0)
    measured = search["measured"]["results"]["calibration_b1"]
    assert all(measured[name]["identical_rows"] == 2 * 2 for name in search["speedups"])  # 2 rows x 2 rounds, exact
    assert all(measured[name]["fallbacks"] == 0 for name in search["speedups"])  # each candidate speculated throughout
    plan = skiplm.SkipPlan.load(out)
    assert len(plan.decode.blocks) == int(search["best"].split("-")[1])
    assert plan.provenance["draft"]["precision"] == ("int8" if search["best"].endswith("int8") else "float32")
    same_precision = [n for n in search["speedups"] if n != search["best"] and n.endswith("int8") == search["best"].endswith("int8")]
    runner_ups = sorted(same_precision, key=lambda n: -search["speedups"][n])[:2]  # --alternatives 2, the default
    assert [len(blocks) for blocks in plan.provenance["draft"]["alternatives"]] == [int(n.split("-")[1]) for n in runner_ups]
    assert plan.provenance["draft_search"]["speedups"] == search["speedups"]
    measured_rounds = search["measured"]["results"]["calibration_b1"]["skip-1-blocks"]["speedup_per_round"]
    assert len(measured_rounds) == 2 and plan.provenance["draft_search"]["repeats"] == 2  # the median of two rounds
    result = run_cli("bench-speculative", tiny_folder, "--draft-plan", out, "--adapt", "--limit", 1, "--batch-sizes",
                     "1", "--new-tokens", 12, "--max-draft", 2, "--prompts", "pydoc", "-o", tmp_path / "bench")
    assert result.exception is None, result.output
    bench = json.loads((tmp_path / "bench" / "speculative.json").read_text())
    adaptive = bench["results"]["pydoc_b1"]["draft-adapt"]  # the draft plan with its runner-ups, chosen on the fly
    others = len(plan.provenance["draft"]["alternatives"])
    assert adaptive["identical_rows"] == 1 and f"chosen on the fly among it and {others}" in bench["drafts"]["draft-adapt"]
    assert sum(adaptive["rounds_by_plan"]) == adaptive["rounds"]
    assert ("int8 copy" in bench["drafts"]["draft"]) == search["best"].endswith("int8")  # the plan's precision drafts
    overall = bench["overall"]["draft"]
    assert overall["search_seconds"] == pytest.approx(search["seconds"])  # the search counts against the draft
    assert overall["speedup_with_search"] < overall["plain_seconds"] / overall["draft_seconds"]


# -- prompt lookup combined with the draft -----------------------------------------------------------------------------
def test_prompt_lookup_proposes_what_followed_the_latest_occurrence():
    from skiplm.speculative import PromptLookup

    lookup = PromptLookup(ngram=2, min_kept=1.0, smoothing=0.0, retry_every=3)
    seq = torch.tensor([[0, 0, 5, 6, 7, 8, 5, 6, 9, 4, 5, 6, 0, 0],
                        [0, 11, 12, 13, 11, 12, 14, 15, 16, 17, 11, 12, 0, 0]])
    pads = torch.tensor([2, 1])
    active = torch.tensor([True, True])
    # row 0 ends with (5, 6), last seen before at 6..7, followed by 9, 4, 5; row 1 ends with (11, 12) -> 14, 15, 16
    proposal = lookup.propose(seq, 12, pads, active, k_max=3, pad=0)
    assert proposal.tolist() == [[9, 4, 5], [14, 15, 16]]
    assert lookup.propose(seq, 12, pads, active, k_max=2, pad=0).tolist() == [[9, 4], [14, 15]]
    # a finished row proposes padding; a row without an earlier occurrence stops lookup for the batch
    assert lookup.propose(seq, 12, pads, torch.tensor([True, False]), k_max=3, pad=0).tolist() == [[9, 4, 5], [0, 0, 0]]
    assert lookup.propose(seq, 11, pads, active, k_max=3, pad=0) is None  # row 0 ends with (4, 5): not seen before
    # lookup that keeps nothing is switched off, with a trial every `retry_every` rounds
    lookup.observe(0)
    assert [lookup.propose(seq, 12, pads, active, k_max=3, pad=0) is None for _ in range(4)] == [True] * 3 + [False]
    lookup.observe(2)
    assert lookup.propose(seq, 12, pads, active, k_max=3, pad=0) is not None
    with pytest.raises(DataError, match="at least 1 token"):
        PromptLookup(ngram=0)


@pytest.mark.parametrize("draft_dtype", [None, "int8"])
def test_greedy_output_with_prompt_lookup_is_exact(draft_dtype):
    from skiplm.speculative import PromptLookup

    model = cached_tiny_model("llama")
    ids, mask = left_padded([10, 7], seed=3)  # greedy text that repeats pieces of itself
    expected = oracle(model, ids, mask, 48)
    plan = plan_for(model, blocks=[2])
    # 1-gram lookup used whenever it finds a match (min_kept=0): most of its drafts are wrong, all must be caught
    lookup = PromptLookup(ngram=1, min_kept=0.0)
    with SpeculativeDecoder(model, plan, draft_dtype=draft_dtype, prompt_lookup=lookup) as decoder:
        for batch in (1, 2):
            rounds = []
            out = decoder.generate(ids[:batch], mask[:batch], max_new_tokens=48, fallback=False, eos_token_id=[],
                                   on_round=rounds.append)
            assert out.tokens == expected[:batch]
            s = out.stats
            assert s.lookup_rounds == sum(r.drafter == "lookup" for r in rounds) > 0
            assert s.rounds > s.lookup_rounds  # the draft model drafted the other rounds
            assert "prompt lookup" in s.describe()


def test_sampled_chains_with_prompt_lookup_follow_the_full_model():
    """Batch 1, a prompt holding every token, so 1-gram lookup always proposes: its drafts are certain (q one-hot),
    and rejection sampling must still give the full model's distribution over tokens 1-3."""
    from skiplm.speculative import PromptLookup

    model = cached_tiny_model("qwen2")
    prompt = list(range(3, VOCAB)) + [7, 70]
    sampling = Sampling(True, temperature=1.0, top_k=2)
    lookup = PromptLookup(ngram=1, min_kept=0.0)
    decoder = SpeculativeDecoder(model, plan_for(model, blocks=[2]), prompt_lookup=lookup)
    samples = 300
    try:
        counts, runs = _sample_chains(decoder, prompt, samples)
        lookup_rounds, kept = sum(s.lookup_rounds for s in runs), sum(s.lookup_committed for s in runs)
    finally:
        decoder.close()
    exact = _exact_joint(model, prompt, 3, sampling)
    stat, critical = _chi2_ok(counts, samples, exact)
    tv = _tv(counts, samples, exact)
    assert stat < critical and tv < 0.12, (stat, critical, tv)
    assert lookup_rounds >= samples and 0 < kept < 2 * lookup_rounds  # lookup drafted, and was sometimes rejected


# -- inside transformers' generate() ----------------------------------------------------------------------------------
def test_custom_generate_inside_transformers_generate_is_exact():
    from skiplm.speculative import custom_generate

    model = cached_tiny_model("llama")
    ids, mask = left_padded([9, 6, 11], seed=2)
    vanilla = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    assert (vanilla[:, ids.shape[1]:] == model.generation_config.eos_token_id).any()  # a row ends early: padding
    for options in (dict(draft_dtype="int8", prompt_lookup=2), dict(draft_plan=plan_for(model, blocks=[1]))):
        got = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                             custom_generate=custom_generate, **options)
        assert torch.equal(got, vanilla), options
    with SpeculativeDecoder(model, draft_dtype="int8") as decoder:  # one decoder kept across calls
        for _ in range(2):
            got = model.generate(ids, attention_mask=mask, max_new_tokens=16, custom_generate=custom_generate,
                                 speculative_decoder=decoder)
            assert torch.equal(got, vanilla)
        assert set(decoder.monitors) == {3}
    torch.manual_seed(0)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=5, temperature=0.7,
                             custom_generate=custom_generate, draft_dtype="int8")
    torch.manual_seed(0)
    again = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=5, temperature=0.7,
                           custom_generate=custom_generate, draft_dtype="int8")
    assert torch.equal(sampled, again) and sampled.shape[1] <= ids.shape[1] + 8
    with pytest.raises(DataError, match="RepetitionPenaltyLogitsProcessor"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, repetition_penalty=1.3,
                       custom_generate=custom_generate, draft_dtype="int8")
    with pytest.raises(DataError, match="return_dict_in_generate"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, return_dict_in_generate=True,
                       custom_generate=custom_generate, draft_dtype="int8")
    with pytest.raises(PlanError, match="needs a draft"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, custom_generate=custom_generate)


def test_a_prompt_beyond_the_context_is_refused_before_decoding(tiny_folder):
    model, tokenizer = skiplm.load_model(str(tiny_folder))  # max_position_embeddings 512
    ids = torch.ones(1, 510, dtype=torch.long)
    with pytest.raises(skiplm.DataError, match=r"the prompt is 510 tokens and 8 new tokens.*context is 512 tokens"):
        skiplm.speculative.generate(model, tokenizer, ids, plan=skiplm.SkipPlan.from_layers(4, blocks=[1]),
                                    max_new_tokens=8)
    out = skiplm.speculative.generate(model, tokenizer, ids, plan=skiplm.SkipPlan.from_layers(4, blocks=[1]),
                                      max_new_tokens=2)  # 512 in all: fits
    assert 1 <= len(out.tokens[0]) <= 2


def test_draft_search_times_the_batch_sizes_it_is_asked_for(tiny_folder, tmp_path):
    from conftest import run_cli

    out = tmp_path / "draft.json"
    result = run_cli("draft-search", tiny_folder, "--max-blocks", 1, "--limit", 2, "--new-tokens", 6,
                     "--precisions", "int8", "--batch-sizes", "1,2", "-o", out)
    assert result.exception is None, result.output
    search = json.loads((tmp_path / "draft.search.json").read_text())
    assert search["batch_sizes"] == [1, 2]
    measured = search["measured"]["results"]
    for name, speedup in search["speedups"].items():  # the geometric mean of each batch size's measured speedup
        per = search["speedups_by_batch"][name]
        assert per == {str(b): measured[f"calibration_b{b}"][name]["speedup"] for b in (1, 2)}
        assert speedup == pytest.approx((per["1"] * per["2"]) ** 0.5)
        assert measured["calibration_b2"][name]["identical_rows"] == 2  # one batch of two rows, exact
    assert search["best"] == max(search["speedups"], key=search["speedups"].get)
    assert search["pays"] == (min(search["speedups_by_batch"][search["best"]].values()) > 1.0)
    plan = skiplm.SkipPlan.load(out)
    assert plan.provenance["draft_search"]["batch_sizes"] == [1, 2]
    assert plan.provenance["draft_search"]["speedups_by_batch"] == search["speedups_by_batch"]
    refused = run_cli("draft-search", tiny_folder, "--limit", 2, "--batch-sizes", "1,4", "-o", tmp_path / "x.json")
    assert refused.exit_code != 0 and "--limit 4 or more (now 2)" in str(refused.exception)  # before loading anything
    assert not (tmp_path / "x.json").exists()
