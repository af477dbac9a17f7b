"""The skip runtime on tiny models of every supported family: exactness, KV cache, generate, scoping."""

from __future__ import annotations

import pytest
import torch

import skiplm
from skiplm import SkipPlan

from conftest import ATTENTION_PROBE, MLP_PROBE, NUM_LAYERS, SLIDING_FAMILIES, SLIDING_WINDOW, VOCAB, cached_tiny_model, plan_for

ATOL = 1e-4
SEQ = 20  # > SLIDING_WINDOW
PREFIX = 6

# Plans over the NUM_LAYERS (5) layers of the tiny models.
PLANS = {
    "blocks": dict(blocks=[1, 3]),
    "block0": dict(blocks=[0]),
    "attention_only": dict(attention=[1, 2, 3]),
    "mlp_only": dict(mlp=[0, 2, 4]),
    "attention_layer0": dict(attention=[0]),
    "mixed": dict(blocks=[2], attention=[0, 3], mlp=[1, 4]),
}


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def token_ids(batch: int = 2, length: int = SEQ, seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def incremental_logits(model, ids: torch.Tensor, prefix: int = PREFIX) -> torch.Tensor:
    """Logits for ``ids`` computed with the KV cache: a prefill, one 3-token chunk, then one token at a time."""
    out = model(ids[:, :prefix], use_cache=True)
    logits, cache = [out.logits], out.cache
    position = prefix
    steps = [3] + [1] * (ids.shape[1] - prefix - 3)
    for step in steps:
        out = model(ids[:, position : position + step], cache=cache, use_cache=True)
        logits.append(out.logits)
        cache = out.cache
        position += step
    assert position == ids.shape[1]
    return torch.cat(logits, dim=1)


def count_calls(module: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    counter = [0]

    def hook(*_):
        counter[0] += 1

    return counter, module.register_forward_hook(hook)


def left_padded(prompts: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    batch = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, prompt in enumerate(prompts):
        batch[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return batch, mask


# -- exactness of the empty plan and of removal -------------------------------------------------------------------


def test_empty_plan_is_exactly_vanilla(model):
    ids = token_ids()
    vanilla = model(ids).logits
    vanilla_cached = incremental_logits(model, ids)
    vanilla_generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for plan in (SkipPlan.empty(NUM_LAYERS), SkipPlan.from_layers(NUM_LAYERS), SkipPlan.empty(NUM_LAYERS).for_model(model)):
        assert plan.is_empty()
        with skiplm.apply(model, plan):
            assert torch.equal(model(ids).logits, vanilla)
            assert torch.equal(incremental_logits(model, ids), vanilla_cached)
            assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), vanilla_generated)


@pytest.mark.parametrize("plan_name", PLANS)
def test_removing_a_plan_restores_exactly_vanilla(model, plan_name):
    ids = token_ids()
    vanilla = model(ids).logits
    vanilla_cached = incremental_logits(model, ids)
    modules_with_forward = {name for name, m in model.named_modules() if "forward" in m.__dict__}
    state_keys = list(model.state_dict())

    handle = skiplm.apply(model, plan_for(model, **PLANS[plan_name]))
    assert not torch.allclose(model(ids).logits, vanilla, atol=1e-2), "the plan did not change the logits"
    assert list(model.state_dict()) == state_keys
    handle.remove()
    handle.remove()  # safe twice

    assert torch.equal(model(ids).logits, vanilla)
    assert torch.equal(incremental_logits(model, ids), vanilla_cached)
    assert {name for name, m in model.named_modules() if "forward" in m.__dict__} == modules_with_forward
    assert not hasattr(model, "_skiplm_handle")


def test_plan_is_removed_when_the_with_block_raises(model):
    ids = token_ids()
    vanilla = model(ids).logits
    with pytest.raises(RuntimeError, match="boom"):
        with skiplm.apply(model, plan_for(model, **PLANS["mixed"])):
            raise RuntimeError("boom")
    assert torch.equal(model(ids).logits, vanilla)


# -- KV cache: incremental decoding equals one full forward under the same plan --------------------------------------


@pytest.mark.parametrize("plan_name", PLANS)
def test_incremental_decoding_matches_full_forward(model, family, plan_name):
    ids = token_ids()
    vanilla = model(ids).logits
    with skiplm.apply(model, plan_for(model, **PLANS[plan_name])):
        full = model(ids).logits
        incremental = incremental_logits(model, ids)
    assert full.shape == incremental.shape == (2, SEQ, VOCAB)
    torch.testing.assert_close(incremental, full, atol=ATOL, rtol=0)
    # Not vacuous: the plan changes the logits, including at positions past the sliding window.
    assert (full - vanilla).abs().max() > 1e-2
    assert (full[:, SLIDING_WINDOW + 2 :] - vanilla[:, SLIDING_WINDOW + 2 :]).abs().max() > 1e-2


@pytest.mark.parametrize("family", sorted(SLIDING_FAMILIES))
def test_sliding_window_is_really_in_effect(family):
    """Guard for the tests above: in the sliding families the window matters at SEQ tokens."""
    model = cached_tiny_model(family)
    ids = token_ids()
    out = model(ids, use_cache=True)
    sliding = [layer for layer in out.cache.layers if getattr(layer, "is_sliding", False)]
    assert sliding and all(layer.keys.shape[-2] < SEQ for layer in sliding)


# -- generate ---------------------------------------------------------------------------------------------------------


def test_batched_greedy_generate_with_left_padding_equals_each_row_alone(model):
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g) for n in (12, 5, 9)]
    batch, mask = left_padded(prompts)
    new = 10  # 12 + 10 > SLIDING_WINDOW
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    plan = plan_for(model, **PLANS["mixed"])
    vanilla = model.generate(batch, attention_mask=mask, **kwargs)
    with skiplm.apply(model, plan):
        together = model.generate(batch, attention_mask=mask, **kwargs)
        alone = [model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kwargs) for p in prompts]
    width = batch.shape[1]
    assert together.shape == (3, width + new)
    for row, (prompt, single) in enumerate(zip(prompts, alone)):
        assert torch.equal(together[row, width:], single[0, len(prompt) :]), f"row {row}"
    assert not torch.equal(together, vanilla), "the plan did not change the generated tokens"


def test_greedy_generate_equals_manual_cached_greedy_loop(model):
    ids = token_ids(batch=1, length=10)
    new = 12
    plan = plan_for(model, **PLANS["mixed"])
    with skiplm.apply(model, plan):
        generated = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        manual = ids
        for _ in range(new):
            logits = model(manual).logits[:, -1]  # no cache: full recomputation
            logits[:, model.config.eos_token_id] = float("-inf")  # what min_new_tokens does
            manual = torch.cat([manual, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, manual)


def test_sampling_generate_under_a_plan(model):
    ids = token_ids(batch=2, length=7)
    new = 9
    kwargs = dict(do_sample=True, top_k=10, temperature=0.7, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    with skiplm.apply(model, plan_for(model, **PLANS["blocks"])):
        torch.manual_seed(0)
        first = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        torch.manual_seed(0)
        second = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert first.shape == (2, 7 + new)
    assert torch.equal(first[:, :7], ids)
    assert ((first >= 0) & (first < VOCAB)).all()
    assert torch.equal(first, second), "seeded sampling is not reproducible under a plan"


# -- the KV cache holds placeholders for skipped attention ----------------------------------------------------------


@pytest.mark.parametrize("skipped", [0, 1, 2])
def test_skipped_attention_writes_no_keys(model, skipped):
    ids = token_ids()
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    with skiplm.apply(model, plan_for(model, attention=[skipped])):
        out = model(ids, use_cache=True)
        out = model(token_ids(length=2, seed=9), cache=out.cache, use_cache=True)  # and a decode step
    cache = out.cache
    for index, layer in enumerate(cache.layers):
        assert layer.get_seq_length() == SEQ + 2, f"layer {index} did not advance"
        stored = min(SEQ + 2, SLIDING_WINDOW - 1) if getattr(layer, "is_sliding", False) else SEQ + 2
        if index == skipped:
            assert layer.keys.shape == (2, 1, stored, 1)
            assert layer.values.shape == (2, 1, stored, 1)
            assert not layer.keys.any() and not layer.values.any()
        else:
            assert layer.keys.shape == (2, config.num_key_value_heads, stored, head_dim)
            assert layer.keys.abs().sum() > 0


# -- a skipped sublayer is not computed -------------------------------------------------------------------------------


def test_skipped_sublayers_do_not_run(model, family):
    layers = model.model.layers
    attention_probe = ATTENTION_PROBE.get(family, "q_proj")
    mlp_probe = MLP_PROBE.get(family, "gate_proj")
    watched = {
        "attention 1 (skipped)": getattr(layers[1].self_attn, attention_probe),
        "mlp 2 (skipped)": getattr(layers[2].mlp, mlp_probe),
        "attention 3 (block skipped)": getattr(layers[3].self_attn, attention_probe),
        "mlp 3 (block skipped)": getattr(layers[3].mlp, mlp_probe),
        "mlp 1 (kept)": getattr(layers[1].mlp, mlp_probe),
        "attention 2 (kept)": getattr(layers[2].self_attn, attention_probe),
    }
    counters, hooks = {}, []
    for name, module in watched.items():
        counters[name], hook = count_calls(module)
        hooks.append(hook)
    try:
        ids = token_ids()
        with skiplm.apply(model, plan_for(model, attention=[1], mlp=[2], blocks=[3])):
            incremental_logits(model, ids)
            model.generate(ids[:1, :5], max_new_tokens=3, do_sample=False, pad_token_id=0)
        calls_under_plan = {name: c[0] for name, c in counters.items()}
        model(ids)
        calls_after = {name: c[0] for name, c in counters.items()}
    finally:
        for hook in hooks:
            hook.remove()
    for name in watched:
        if "kept" in name:
            assert calls_under_plan[name] > 0, name
        else:
            assert calls_under_plan[name] == 0, f"{name} ran {calls_under_plan[name]} times under the plan"
        assert calls_after[name] == calls_under_plan[name] + 1, f"{name} did not run after removal"


def test_norms_of_skipped_branches_do_not_run(model, monkeypatch):
    """A skipped branch costs one add: its norms are identities, not computed (forward hooks cannot see this)."""
    adapter = skiplm.get_adapter(model)
    layers = adapter.decoder_layers(model)
    calls: dict[int, int] = {}

    def counting(original):
        def forward(self, *args, **kwargs):
            calls[id(self)] = calls.get(id(self), 0) + 1
            return original(self, *args, **kwargs)

        return forward

    norm_classes = {type(norm) for layer in layers for part in ("attention", "mlp") for norm in adapter.branch_modules(layer, part)[1]}
    for cls in norm_classes:
        monkeypatch.setattr(cls, "forward", counting(cls.forward))

    def norms(layer, part):
        return adapter.branch_modules(layers[layer], part)[1]

    skipped = norms(1, "attention") + norms(2, "mlp") + norms(3, "attention") + norms(3, "mlp")
    kept = norms(1, "mlp") + norms(2, "attention") + norms(4, "attention")
    assert skipped and kept
    with skiplm.apply(model, plan_for(model, attention=[1], mlp=[2], blocks=[3])):
        incremental_logits(model, token_ids())
    for norm in skipped:
        assert calls.get(id(norm), 0) == 0, f"{type(norm).__name__} of a skipped branch ran"
    for norm in kept:
        assert calls.get(id(norm), 0) > 0, f"{type(norm).__name__} of a kept branch did not run"


# -- llama only: scoping, several models, prefill='full', hidden states ----------------------------------------------


def test_two_models_carry_different_plans_at_once(make_model):
    a, b = make_model("llama", seed=0), make_model("llama", seed=1)
    plan_a = plan_for(a, blocks=[1], attention=[3])
    plan_b = plan_for(b, mlp=[0, 2], blocks=[3])
    ids = token_ids()
    with skiplm.apply(a, plan_a):
        alone_a = a(ids).logits
        alone_a_cached = incremental_logits(a, ids)
    with skiplm.apply(b, plan_b):
        alone_b = b(ids).logits
        alone_b_cached = incremental_logits(b, ids)
    with skiplm.apply(a, plan_a), skiplm.apply(b, plan_b):
        both_a, both_b = a(ids).logits, b(ids).logits
        # interleave the two models' decode steps
        out_a, out_b = a(ids[:, :PREFIX], use_cache=True), b(ids[:, :PREFIX], use_cache=True)
        steps_a, steps_b = [out_a.logits], [out_b.logits]
        for i in range(PREFIX, SEQ):
            out_a = a(ids[:, i : i + 1], cache=out_a.cache, use_cache=True)
            out_b = b(ids[:, i : i + 1], cache=out_b.cache, use_cache=True)
            steps_a.append(out_a.logits)
            steps_b.append(out_b.logits)
    assert torch.equal(both_a, alone_a) and torch.equal(both_b, alone_b)
    torch.testing.assert_close(torch.cat(steps_a, 1), alone_a_cached, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat(steps_b, 1), alone_b_cached, atol=ATOL, rtol=0)
    with skiplm.apply(a, plan_a):
        assert not torch.allclose(a(ids).logits, alone_b_cached, atol=1e-2)


def test_a_second_plan_on_a_planned_model_is_refused(llama):
    first = plan_for(llama, blocks=[1])
    handle = skiplm.apply(llama, first)
    try:
        with pytest.raises(skiplm.PlanError, match="already has a skip plan applied"):
            skiplm.apply(llama, plan_for(llama, blocks=[2]))
        with pytest.raises(skiplm.PlanError, match="already has a skip plan applied"):
            skiplm.apply(llama, first)
        assert handle.plan is first
    finally:
        handle.remove()
    # after removal a new plan is accepted
    with skiplm.apply(llama, plan_for(llama, blocks=[2])) as second:
        assert second.plan.decode.blocks == [2]


def test_disabled_gives_vanilla_inside_the_block(llama):
    ids = token_ids()
    vanilla = llama(ids).logits
    vanilla_cached = incremental_logits(llama, ids)
    with skiplm.apply(llama, plan_for(llama, **PLANS["mixed"])) as handle:
        planned = llama(ids).logits
        with handle.disabled():
            assert torch.equal(llama(ids).logits, vanilla)
            assert torch.equal(incremental_logits(llama, ids), vanilla_cached)
        assert torch.equal(llama(ids).logits, planned)
    assert not torch.allclose(planned, vanilla, atol=1e-2)


def test_prefill_full_plan(llama):
    ids = token_ids()
    plan = SkipPlan.from_layers(NUM_LAYERS, blocks=[1, 3], attention=[2], prefill="full").for_model(llama)
    assert plan.prefill.is_empty() and plan.decode.blocks == [1, 3]

    vanilla_full = llama(ids).logits
    vanilla_prefill = llama(ids[:, :PREFIX], use_cache=True)
    vanilla_steps = incremental_logits(llama, ids)[:, PREFIX:]
    new = 8
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    vanilla_generated = llama.generate(ids, **kwargs)
    with skiplm.apply(llama, plan):
        prefill = llama(ids[:, :PREFIX], use_cache=True)
        assert torch.equal(prefill.logits, vanilla_prefill.logits)
        assert torch.equal(llama(ids).logits, vanilla_full), "a cache-less forward is a prefill"
        steps = incremental_logits(llama, ids)[:, PREFIX:]
        generated = llama.generate(ids, **kwargs)
    assert (steps - vanilla_steps).abs().max() > 1e-2, "decode steps did not use the plan"
    assert generated.shape == (2, SEQ + new)
    # the first new token comes from the (full-depth) prefill, later ones from the skipping decode
    assert torch.equal(generated[:, : SEQ + 1], vanilla_generated[:, : SEQ + 1])
    assert not torch.equal(generated, vanilla_generated)


def test_hidden_states_under_a_plan(llama):
    ids = token_ids()
    skipped = [0, 2]
    with skiplm.apply(llama, plan_for(llama, blocks=skipped, attention=[3])):
        out = llama(ids, output_hidden_states=True)
    hidden = out.hidden_states
    assert len(hidden) == NUM_LAYERS + 1
    for layer in range(NUM_LAYERS - 1):  # the last entry has the final norm applied
        if layer in skipped:
            assert torch.equal(hidden[layer + 1], hidden[layer]), f"skipped block {layer} changed its input"
        else:
            assert not torch.equal(hidden[layer + 1], hidden[layer]), f"kept block {layer} did nothing"


def test_apply_rejects_what_is_not_a_plan(llama):
    with pytest.raises(skiplm.PlanError, match="needs a SkipPlan"):
        skiplm.apply(llama, {"blocks": [1]})
    assert not hasattr(llama, "_skiplm_handle")


def test_copying_a_model_under_a_plan_is_refused_and_leaves_the_original_as_it_was(llama):
    import copy

    plan = plan_for(llama, blocks=[1])
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        vanilla = llama(ids).logits
    with skiplm.apply(llama, plan) as handle:
        with torch.no_grad():
            planned = llama(ids).logits
        with pytest.raises(skiplm.PlanError, match="cannot copy a model while a skip plan"):
            copy.deepcopy(llama)
        assert getattr(llama, "_skiplm_handle", None) is handle  # the refused copy changed nothing
        with torch.no_grad():
            assert torch.equal(llama(ids).logits, planned)
    copied = copy.deepcopy(llama)  # after removal: an ordinary, independent copy without a plan
    assert getattr(copied, "_skiplm_handle", None) is None
    with torch.no_grad():
        assert torch.equal(copied(ids).logits, vanilla)
    with skiplm.apply(copied, plan):  # same weights: the plan made for the original fits the copy
        with torch.no_grad():
            assert torch.allclose(copied(ids).logits, planned)
        assert getattr(llama, "_skiplm_handle", None) is None  # a plan on the copy is not on the original
