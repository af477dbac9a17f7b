"""skiplm's own planner: a measured latency model and a KL-greedy search over attention and MLP sublayers."""

import pytest
import torch

import skiplm
from skiplm.measure.latency import LatencyModel
from skiplm.planners.search import KLScorer, SearchStep, _skips_of, plan_search, refine
from skiplm.plan import SkipSet

from conftest import NUM_LAYERS, tiny_model

# A fixed latency model keeps the tests deterministic: attention saves 1 ms, an MLP 2 ms, 3 ms are fixed.
LATENCY = LatencyModel(fixed_s=0.003, attention_s=0.001, mlp_s=0.002, num_layers=NUM_LAYERS, batch_size=1, context=8)


def calibration(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (1, 24), generator=generator) for _ in range(2)]


def with_dead_sublayers(family="llama"):
    """A tiny model whose layer-1 MLP and layer-3 attention write nothing: skipping them costs no quality."""
    model = tiny_model(family)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.zero_()
        model.model.layers[3].self_attn.o_proj.weight.zero_()
    return model


def test_latency_model_arithmetic():
    skips = SkipSet.of(attention=[1, 2], mlp=[3])
    assert LATENCY.full_s == pytest.approx(0.003 + NUM_LAYERS * 0.003)
    assert LATENCY.step_s(skips) == pytest.approx(LATENCY.full_s - 0.002 - 0.002)
    assert LATENCY.speedup(skips) == pytest.approx(LATENCY.full_s / LATENCY.step_s(skips))


def test_latency_model_gives_a_whole_block_its_own_saving():
    latency = LatencyModel(fixed_s=0.003, attention_s=0.001, mlp_s=0.002, num_layers=NUM_LAYERS, batch_size=1,
                           context=8, block_s=0.005)
    # layer 1: a whole block (5 ms); layer 2: attention only (1 ms); layer 3: MLP only (2 ms)
    skips = SkipSet.of(blocks=[1], attention=[2], mlp=[3])
    assert latency.step_s(skips) == pytest.approx(latency.full_s - 0.005 - 0.001 - 0.002)
    assert LATENCY.step_s(SkipSet.of(blocks=[1])) == pytest.approx(LATENCY.full_s - 0.003)  # no block_s: the halves


def test_latency_model_is_measured_from_real_steps():
    model = tiny_model("llama")
    measured = LatencyModel.measure(model, context=8, steps=4, repeats=2)
    assert measured.num_layers == NUM_LAYERS and measured.full_s > 0
    assert measured.attention_s >= 0 and measured.mlp_s >= 0 and measured.fixed_s >= 0 and measured.block_s >= 0
    assert measured.check_error >= 0


def test_search_takes_a_whole_free_block_in_one_step_when_a_block_saves_more():
    model = tiny_model("llama")
    with torch.no_grad():  # layer 2 writes nothing: either half, or the block, costs no quality
        model.model.layers[2].mlp.down_proj.weight.zero_()
        model.model.layers[2].self_attn.o_proj.weight.zero_()
    latency = LatencyModel(fixed_s=0.003, attention_s=0.001, mlp_s=0.002, num_layers=NUM_LAYERS, batch_size=1,
                           context=8, block_s=0.004)
    plan = plan_search(model, calibration=calibration(), speedup=latency.full_s / (latency.full_s - 0.004),
                       latency_model=latency)
    path = plan.provenance["path"]
    assert [(step["layer"], step["part"]) for step in path] == [(2, "block")]
    assert plan.decode.blocks == [2] and path[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    # with a sublayer count as the target the search goes sublayer by sublayer
    counted = plan_search(model, calibration=calibration(), skip=2, latency_model=latency)
    assert {step["part"] for step in counted.provenance["path"]} <= {"attention", "mlp"}


def test_search_finds_the_free_sublayers_first():
    model = with_dead_sublayers()
    plan = plan_search(model, calibration=calibration(), skip=2, latency_model=LATENCY)
    assert plan.decode.attention == {3} and plan.decode.mlp == {1}
    path = plan.provenance["path"]
    assert [step["kl"] for step in path] == pytest.approx([0.0, 0.0], abs=1e-6)


@pytest.mark.parametrize("target", [1.2, 1.5])
def test_search_reaches_a_speedup_target_and_stops(target):
    model = with_dead_sublayers()
    plan = plan_search(model, calibration=calibration(), speedup=target, latency_model=LATENCY, refine_budget=0)
    assert LATENCY.speedup(plan.decode) >= target and plan.provenance["refinement"] is None
    path = [SearchStep(**step) for step in plan.provenance["path"]]
    assert _skips_of(path) == plan.decode
    assert LATENCY.speedup(_skips_of(path[:-1])) < target
    with skiplm.apply(model, plan):  # the plan is valid for this model
        model(torch.arange(3, 10)[None])


def test_refinement_drops_a_unit_the_target_does_not_need():
    model = with_dead_sublayers()
    scorer = KLScorer(model, calibration())
    costly = SkipSet.of(attention=[3], mlp=[1, 2])  # layer 2's MLP is live; two sublayers meet the target
    skips, record = refine(scorer, costly, lambda s: len(s.attention) + len(s.mlp) >= 2, scores={})
    assert skips == SkipSet.of(attention=[3], mlp=[1]) and record["removed"] == [[2, "mlp"]]
    assert record["kl_after"] == pytest.approx(0.0, abs=1e-6) and record["kl_before"] > 1e-4
    assert record["evaluations"] == scorer.evaluations == 1 + 3 + 2  # KL before, then each set less one unit, twice


def test_refinement_swaps_a_costly_unit_for_a_free_one_and_keeps_the_target():
    model = with_dead_sublayers()
    scorer = KLScorer(model, calibration())
    meets = lambda s: len(s.attention) + len(s.mlp) >= 1  # noqa: E731
    scores = {(layer, part): 1.0 for layer in range(NUM_LAYERS) for part in ("attention", "mlp")}
    scores[(1, "mlp")] = 0.0  # the search's scores rank the dead MLP first
    skips, record = refine(scorer, SkipSet.of(mlp=[2]), meets, scores)
    assert skips == SkipSet.of(mlp=[1]) and record["swaps"] == [[[2, "mlp"], [1, "mlp"]]]
    assert record["kl_after"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("target", [1.2, 1.5])
def test_refined_search_plan_meets_its_target_with_no_more_kl_than_the_cut_path(target):
    model = tiny_model("llama")
    plan = plan_search(model, calibration=calibration(), speedup=target, latency_model=LATENCY, refine_budget=24)
    record = plan.provenance["refinement"]
    assert LATENCY.speedup(plan.decode) >= target
    assert record["kl_before"] == pytest.approx(plan.provenance["path"][-1]["kl"])
    assert record["kl_after"] <= record["kl_before"] and record["evaluations"] <= 24 + 2 * NUM_LAYERS
    assert KLScorer(model, calibration())(plan.decode) == pytest.approx(record["kl_after"], rel=1e-4, abs=1e-6)


def test_search_respects_latency_and_quality_budgets():
    model = with_dead_sublayers()
    fast = plan_search(model, calibration=calibration(), latency_ms=12.0, latency_model=LATENCY)
    assert LATENCY.step_s(fast.decode) * 1e3 <= 12.0
    careful = plan_search(model, calibration=calibration(), max_kl=1e-6, latency_model=LATENCY)
    assert careful.decode.attention == {3} and careful.decode.mlp == {1}  # only the free ones fit a zero budget


def test_search_bad_targets_are_clear():
    model = tiny_model("llama")
    with pytest.raises(skiplm.PlanError, match="exactly one target"):
        plan_search(model, calibration=calibration(), latency_model=LATENCY)
    with pytest.raises(skiplm.PlanError, match="calibration"):
        plan_search(model, speedup=1.2, latency_model=LATENCY)
    with pytest.raises(skiplm.PlanError, match="out of reach"):
        plan_search(model, calibration=calibration(), latency_ms=1.0, latency_model=LATENCY)
