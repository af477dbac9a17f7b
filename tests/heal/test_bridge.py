"""The bridge fit: exact where the skipped span is linear, the exact algebra of the fold into a down projection, the
same map as an independent least-squares solve, lower error to the full model on held-out tokens, a teacher that
stays bit-exact, and clear refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import skiplm
from skiplm import PlanMismatchError, SkipPlan
from skiplm.analysis.activations import trace_residuals
from skiplm.heal import HealError, fit_bridge, heal
from skiplm.registry import HEALERS

from conftest import VOCAB, tiny_model

LAYERS = 6


def tokens(sequences=8, length=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (1, length), generator=g) for _ in range(sequences)]


def held_out():
    return torch.cat(tokens(2, 40, seed=99))


def kl(full, other):
    return torch.nn.functional.kl_div(other.log_softmax(-1), full.log_softmax(-1), log_target=True,
                                      reduction="batchmean").item()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_layers=LAYERS)


def plan(model, blocks):
    return SkipPlan.from_layers(LAYERS, blocks=blocks).for_model(model)


@torch.inference_mode()
def logits(model, skipper=None, ids=None):
    ids = held_out() if ids is None else ids
    if skipper is None:
        return model(ids).logits
    with skiplm.apply(model, skipper):
        return model(ids).logits


def linear_blocks(model, blocks, seed=3):
    """Make ``blocks`` act linearly on the residual: h -> h (I + P^T). Attention adds 0 (o_proj zero), the MLP's norm is
    an identity and the MLP one Linear P. Returns the product of the blocks' maps."""
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    total = torch.eye(d, dtype=torch.float64)
    for index in blocks:
        layer = model.model.layers[index]
        with torch.no_grad():
            layer.self_attn.o_proj.weight.zero_()
        layer.post_attention_layernorm = nn.Identity()
        layer.mlp = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            layer.mlp.weight.copy_(torch.randn(d, d, generator=g) * 0.3)
        total = total @ (torch.eye(d, dtype=torch.float64) + layer.mlp.weight.detach().double().T)
    return total


def test_a_linear_span_is_recovered_exactly():
    model = tiny_model("llama", num_layers=LAYERS)
    expected = linear_blocks(model, [0, 1])
    skip = plan(model, [0, 1])
    healed = fit_bridge(model, skip, calibration=tokens(), ridge=0.0, skip_positions=0)
    assert healed.spans[0].fold == "embedding"
    assert torch.allclose(healed.maps["span.0-1"].double(), expected, atol=1e-4)
    assert healed.fit[0]["residual_after"] < 1e-5 < healed.fit[0]["residual_before"]
    full = logits(model)
    assert not torch.allclose(logits(model, skip), full, atol=1e-2)
    assert torch.allclose(logits(model, healed), full, atol=1e-4)  # the healed pruned model IS the full model


def test_the_fold_into_the_down_projection_is_exact_algebra(model):
    skip = plan(model, [2, 3])
    healed = fit_bridge(model, skip, calibration=tokens(4))
    t = healed.maps["span.2-3"]
    down = model.model.layers[1].mlp.down_proj
    hook = down.register_forward_hook(lambda module, args, out: out @ t)  # the map applied to the MLP output itself
    try:
        mapped = logits(model, skip)
    finally:
        hook.remove()
    assert torch.allclose(logits(model, healed), mapped, atol=1e-5)


def test_the_map_is_the_least_squares_solution(model):
    skip = plan(model, [3])
    cal = tokens(4)
    healed = fit_bridge(model, skip, calibration=cal, ridge=0.0, inputs="full", skip_positions=0)
    captured = []
    hook = model.model.layers[2].mlp.down_proj.register_forward_hook(lambda m, a, out: captured.append(out[0].double()))
    try:
        trace = trace_residuals(model, cal)
    finally:
        hook.remove()
    m = torch.cat(captured)
    target = trace.block_in[4].double() - trace.mid[2].double()
    expected = torch.linalg.lstsq(m, target).solution
    assert torch.allclose(healed.maps["span.3-3"].double(), expected, atol=1e-4)


@pytest.mark.parametrize("inputs", ["healed", "full"])
def test_healing_brings_the_pruned_model_closer_to_the_full_model_on_held_out_tokens(model, inputs):
    # (a random tiny model on random tokens: the map needs a few thousand positions not to over-fit them)
    skip = plan(model, [2, 3])
    healed = fit_bridge(model, skip, calibration=tokens(32, 64), inputs=inputs)
    full, pruned, bridged = logits(model)[0], logits(model, skip)[0], logits(model, healed)[0]
    assert kl(full, bridged) < 0.9 * kl(full, pruned)
    ids = held_out()
    with torch.inference_mode():
        final = model(ids, output_hidden_states=True).hidden_states[-1]
        with skiplm.apply(model, skip):
            unhealed = model(ids, output_hidden_states=True).hidden_states[-1]
        with skiplm.apply(model, healed):
            healed_state = model(ids, output_hidden_states=True).hidden_states[-1]
    assert (healed_state - final).norm() < (unhealed - final).norm()
    for fit in healed.fit:
        assert fit["residual_after"] < fit["residual_before"]


def test_the_teacher_is_untouched_by_fitting_applying_and_removing(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = logits(model)
    healed = fit_bridge(model, plan(model, [2, 4]), calibration=tokens(4))
    assert torch.equal(logits(model), full)
    with torch.inference_mode(), skiplm.apply(model, healed) as handle:
        assert not torch.equal(model(held_out()).logits, full)
        with handle.disabled():  # the full model inside: plan off, original weights back
            assert torch.equal(model(held_out()).logits, full)
        assert not torch.equal(model(held_out()).logits, full)
    assert torch.equal(logits(model), full)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_progress_counts_every_pass(model):
    calls = []
    fit_bridge(model, plan(model, [1, 3]), calibration=tokens(3), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 6) for i in range(1, 7)]  # 3 batches x 2 spans (inputs="healed")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
def test_every_llama_like_family_heals_and_restores(family):
    model = tiny_model(family)
    skip = SkipPlan.from_layers(5, blocks=[2, 3]).for_model(model)
    ids = tokens(1, 20, seed=7)[0]
    full = logits(model, ids=ids)
    healed = fit_bridge(model, skip, calibration=tokens(4, 24))
    assert healed.fit[0]["residual_after"] < healed.fit[0]["residual_before"]
    assert not torch.allclose(logits(model, healed, ids), logits(model, skip, ids), atol=1e-3)
    assert torch.equal(logits(model, ids=ids), full)


@pytest.mark.parametrize("family", ["gemma2", "olmo2"])
def test_a_family_with_a_norm_after_the_mlp_is_refused(family):
    model = tiny_model(family)
    with pytest.raises(HealError, match="post-feedforward norm"):
        fit_bridge(model, SkipPlan.from_layers(5, blocks=[2]).for_model(model), calibration=tokens(2, 16))


def test_bad_plans_are_refused_with_the_reason(model):
    cal = tokens(2, 16)
    cases = [
        (SkipPlan.from_layers(LAYERS, mlp=[2]).for_model(model), "single sublayers"),
        (SkipPlan.from_layers(LAYERS, blocks=[2], attention=[4]).for_model(model), "single sublayers"),
        (SkipPlan.empty(LAYERS).for_model(model), "skips nothing"),
        (SkipPlan.from_layers(LAYERS, blocks=[2], prefill="full").for_model(model), "prefill"),
    ]
    for bad, reason in cases:
        with pytest.raises(HealError, match=reason):
            fit_bridge(model, bad, calibration=cal)
    with pytest.raises(HealError, match="heals a SkipPlan"):
        fit_bridge(model, "plan.json", calibration=cal)
    with pytest.raises(HealError, match="ridge"):
        fit_bridge(model, plan(model, [2]), calibration=cal, ridge=-1.0)
    with pytest.raises(PlanMismatchError):
        fit_bridge(tiny_model("llama", num_layers=LAYERS, seed=1), plan(model, [2]), calibration=cal)
    with skiplm.apply(model, plan(model, [2])), pytest.raises(skiplm.PlanError, match="plan applied"):
        fit_bridge(model, plan(model, [2]), calibration=cal)


def test_a_span_at_block_0_is_refused_when_the_embedding_is_tied():
    model = tiny_model("llama", num_layers=LAYERS)
    model.lm_head.weight = model.model.embed_tokens.weight
    with pytest.raises(HealError, match="ties it to its LM head|ties to its LM head"):
        fit_bridge(model, plan(model, [0, 1]), calibration=tokens(2, 16))


def test_heal_dispatches_by_name_and_checks_options(model):
    assert "bridge" in HEALERS and HEALERS.get("bridge").paper and HEALERS.get("bridge").data_driven
    healed = heal(model, plan(model, [3]), "bridge", calibration=tokens(2, 16), ridge=1e-3)
    assert healed.provenance["options"]["ridge"] == 1e-3 and healed.provenance["calibration"]["tokens"] == 32
    with pytest.raises(skiplm.SkipLMError, match="no option 'bogus'"):
        heal(model, plan(model, [3]), calibration=tokens(2, 16), bogus=1)
    with pytest.raises(skiplm.SkipLMError, match="unknown healing method"):
        heal(model, plan(model, [3]), "nope", calibration=tokens(2, 16))
    with pytest.raises(HealError, match="calibration"):
        heal(model, plan(model, [3]))
