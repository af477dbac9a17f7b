"""Static planners (ShortGPT block influence, Gromov angular distance, LLM-Drop similarity, SLEB greedy loss): valid
plans within target, deterministic, and each picks what its metric says on tiny models built so the answer is known."""

from __future__ import annotations

import copy

import pytest
import torch

import skiplm
from skiplm import CostModel, DataError, PlanError, SkipPlan
from skiplm.analysis.activations import trace_residuals
from skiplm.analysis.metrics import cosine_similarity, skip_effect
from skiplm.planners import PLANNERS, get_planner, load_calibration
from skiplm.planners.common import Calibration, skip_set

from conftest import FAMILIES, VOCAB, cached_tiny_model, run_cli, tiny_model

DEEP = 8

# (method, extra keyword arguments) for every planner variant
VARIANTS = [
    ("uniform", {}),
    ("block-influence", {}),
    ("angular", {}),
    *[("similarity", {"unit": unit, "iterative": iterative})
      for unit in ("attention", "mlp", "block", "joint") for iterative in (False, True)],
    ("greedy-loss", {}),
]
VARIANT_IDS = [m + "".join(f"-{v}" for v in kw.values()) for m, kw in VARIANTS]


@pytest.fixture(autouse=True)
def _no_plan_left_applied():
    yield
    for model in (cached_tiny_model("llama", num_layers=DEEP),):
        assert getattr(model, "_skiplm_handle", None) is None, "a test left a skip plan applied"


@pytest.fixture(scope="module")
def deep():
    return cached_tiny_model("llama", num_layers=DEEP)


def random_calibration(sequences=2, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (1, length), generator=g) for _ in range(sequences)]


def run_planner(method, model, calibration=None, **kwargs):
    planner = get_planner(method)
    if method != "uniform":
        kwargs["calibration"] = calibration if calibration is not None else random_calibration()
    return planner(model, **kwargs)


def zero_out(model, layer, parts=("attention", "mlp")):
    """Make a sublayer write nothing: scale its output projection to 0 (h + 0), so its output equals its input."""
    names = {"attention": "o_proj.weight", "mlp": "down_proj.weight"}
    with torch.no_grad():
        for part in parts:
            params = [p for n, p in skiplm.get_adapter(model).decoder_layers(model)[layer].named_parameters()
                      if n.endswith(names[part])]
            assert len(params) == 1, (layer, part)
            params[0].mul_(0.0)
    return model


def units_of(plan: SkipPlan) -> int:
    """Units a plan skips, in its method's terms (blocks, or sublayers for sublayer methods)."""
    if plan.provenance.get("unit") in ("attention", "mlp", "joint"):
        return len(plan.decode.attention) + len(plan.decode.mlp)
    return len(plan.decode.blocks)


def one_unit_fewer(plan: SkipPlan):
    """The skip set with the method's last-added unit removed."""
    decode = plan.decode
    order = plan.provenance.get("order")
    unit = plan.provenance.get("unit", "block")
    if order is None:  # uniform / angular: whole blocks, all of one cost in these models; drop any one
        return skip_set([("block", b) for b in decode.blocks[:-1]])
    if unit == "joint":
        units = [(label.split()[0], int(label.split()[1])) for label in order]
    else:
        units = [(unit, layer) for layer in order]
    assert skip_set(units) == decode
    return skip_set(units[:-1])


def without_time(provenance):
    return {k: v for k, v in provenance.items() if k != "created"}


# -- every planner: valid, within target, deterministic -------------------------------------------------------------


@pytest.mark.parametrize("target", [1.1, 1.4])
@pytest.mark.parametrize("method, kwargs", VARIANTS, ids=VARIANT_IDS)
def test_speedup_target_is_reached_by_the_fewest_units(deep, method, kwargs, target):
    costs = CostModel.from_parameter_counts(deep)
    plan = run_planner(method, deep, speedup=target, **kwargs)
    plan.check_model(deep)
    assert plan.prefill == plan.decode
    assert costs.ideal_speedup(plan.decode) >= target
    assert costs.ideal_speedup(one_unit_fewer(plan)) < target, "one unit fewer would already reach the target"
    assert plan.provenance["method"] == method and plan.provenance["target"] == {"speedup": target}
    if method != "uniform":
        assert plan.provenance["calibration"] == {"source": "token ids given by the caller", "sequences": 2,
                                                  "length": 24, "tokens": 48}
    ids = random_calibration(1, 12, seed=9)[0]
    with torch.inference_mode(), skiplm.apply(deep, plan):
        assert torch.isfinite(deep(ids).logits).all()
    again = run_planner(method, deep, speedup=target, **kwargs)
    assert again == plan and without_time(again.provenance) == without_time(plan.provenance), "not deterministic"


@pytest.mark.parametrize("method, kwargs", VARIANTS, ids=VARIANT_IDS)
def test_skip_count_and_plan_file(deep, method, kwargs, tmp_path):
    for count in (0, 1, 3):
        plan = run_planner(method, deep, skip=count, **kwargs)
        assert units_of(plan) == count
        assert plan.provenance["target"] == {"skip": count}
    loaded = SkipPlan.load(plan.save(tmp_path / "plan.json"))
    assert loaded == plan and loaded.provenance == plan.provenance
    full = run_planner(method, deep, skip=0, prefill="full", **kwargs)
    assert full.is_empty()
    partial = run_planner(method, deep, skip=2, prefill="full", **kwargs)
    assert partial.prefill.is_empty() and units_of(partial) == 2


@pytest.mark.parametrize("method, kwargs, limit", [
    ("block-influence", {}, DEEP - 1),
    ("angular", {}, DEEP - 1),
    ("greedy-loss", {}, DEEP - 1),
    ("similarity", {"unit": "block"}, DEEP - 1),
    ("similarity", {"unit": "attention"}, DEEP),
    ("similarity", {"unit": "joint", "iterative": True}, 2 * DEEP - 1),
], ids=["block-influence", "angular", "greedy-loss", "similarity-block", "similarity-attention", "similarity-joint"])
def test_skip_limits_and_unreachable_targets(deep, method, kwargs, limit):
    plan = run_planner(method, deep, skip=limit, **kwargs)
    assert units_of(plan) == limit
    if method == "angular":
        assert plan.decode.blocks == list(range(DEEP - 1)), "the last layer is never removed"
    with pytest.raises(PlanError, match=f"can skip 0..{limit} "):
        run_planner(method, deep, skip=limit + 1, **kwargs)
    with pytest.raises(PlanError, match="can skip"):
        run_planner(method, deep, skip=-1, **kwargs)
    calls = []
    with pytest.raises(PlanError, match="out of reach"):  # refused before any pass over the calibration text
        run_planner(method, deep, speedup=100.0, progress=lambda *a: calls.append(a), **kwargs)
    assert calls == []


# -- each method picks what its metric says ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma2", "olmo2", "phi3"])
def test_a_block_that_writes_nothing_is_removed_first(family):
    model = zero_out(tiny_model(family, num_layers=6), 3)
    calibration = random_calibration()
    for method, kwargs in [("block-influence", {}), ("similarity", {"unit": "block"}),
                           ("similarity", {"unit": "block", "iterative": True})]:
        plan = run_planner(method, model, calibration, skip=1, **kwargs)
        assert plan.decode.blocks == [3], (method, kwargs)
    scores = run_planner("block-influence", model, calibration, skip=1).provenance["scores"]["block_influence"]
    assert scores[3] == pytest.approx(0.0, abs=1e-6) and min(s for i, s in enumerate(scores) if i != 3) > 1e-3


def test_similarity_drops_the_sublayers_that_write_nothing():
    model = tiny_model("llama", num_layers=6)
    zero_out(model, 1, ["attention"])
    zero_out(model, 4, ["mlp"])
    calibration = random_calibration()
    for iterative in (False, True):
        attention = run_planner("similarity", model, calibration, skip=1, unit="attention", iterative=iterative)
        assert attention.decode.attention == {1} and not attention.decode.mlp
        mlp = run_planner("similarity", model, calibration, skip=1, unit="mlp", iterative=iterative)
        assert mlp.decode.mlp == {4} and not mlp.decode.attention
        joint = run_planner("similarity", model, calibration, skip=2, unit="joint", iterative=iterative)
        assert joint.decode.attention == {1} and joint.decode.mlp == {4}
    scores = run_planner("similarity", model, calibration, skip=1, unit="joint").provenance["scores"]
    assert scores["cosine_attention"][1] == pytest.approx(1.0, abs=1e-6)
    assert scores["cosine_mlp"][4] == pytest.approx(1.0, abs=1e-6)


def test_angular_removes_the_run_of_near_identity_blocks():
    model = tiny_model("llama", num_layers=DEEP)
    for layer in (3, 4, 5):
        zero_out(model, layer)
    calibration = random_calibration()
    for count in (2, 3):
        plan = run_planner("angular", model, calibration, skip=count)
        assert plan.decode.blocks == list(range(3, 3 + count))
        assert plan.provenance["start"] == 3 and plan.provenance["length"] == count
        assert plan.provenance["scores"]["angular_distance"][3] == pytest.approx(0.0, abs=1e-3)
    # a speedup target takes the shortest run that reaches it
    costs = CostModel.from_parameter_counts(model)
    two = costs.ideal_speedup(skiplm.SkipSet.of([3, 4]))
    plan = run_planner("angular", model, calibration, speedup=two)
    assert plan.decode.blocks == [3, 4]
    plan = run_planner("angular", model, calibration, speedup=two + 1e-6)
    assert plan.decode.blocks == [3, 4, 5]


def test_angular_never_removes_the_last_block_while_block_influence_may():
    model = zero_out(tiny_model("llama", num_layers=6), 5)  # the last block writes nothing
    calibration = random_calibration()
    assert run_planner("block-influence", model, calibration, skip=1).decode.blocks == [5]
    for count in range(1, 6):
        assert 5 not in run_planner("angular", model, calibration, skip=count).decode.blocks


def sampled_calibration(model, sequences=4, length=40, seed=0):
    """Text the model itself samples: the full model is the best predictor of it, so any real change costs loss."""
    torch.manual_seed(seed)
    starts = torch.randint(3, VOCAB, (sequences, 1), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return [model.generate(start[None], do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                               max_new_tokens=length - 1, min_new_tokens=length - 1) for start in starts]


def test_greedy_loss_removes_the_block_that_costs_no_loss_and_scores_on_top_of_earlier_removals():
    model = zero_out(tiny_model("llama", num_layers=6), 3)
    calibration = sampled_calibration(model)
    seen = []
    plan = run_planner("greedy-loss", model, calibration, skip=2, progress=lambda done, total: seen.append((done, total)))
    order = plan.provenance["order"]
    assert order[0] == 3
    steps = plan.provenance["steps"]
    assert steps[0]["loss"] == plan.provenance["baseline_loss"]  # removing a block that writes nothing changes nothing
    assert steps[0]["candidate_loss"][3] == min(steps[0]["candidate_loss"])
    # step 2's losses are with block 3 already removed; the block chosen has the lowest of them
    assert steps[1]["candidate_loss"][3] is None
    with torch.no_grad():
        reference = torch.cat([model(ids).logits[0] for ids in calibration])
    for layer in (0, 4, order[1]):
        expected = skip_effect(model, calibration, skip_set([("block", 3), ("block", layer)]), reference)["loss"]
        assert steps[1]["candidate_loss"][layer] == pytest.approx(expected, rel=1e-5)
    assert order[1] == min(range(6), key=lambda l: (steps[1]["candidate_loss"][l] or float("inf"), l))
    # progress after every forward pass: the full model, then 6 + 5 trials
    assert [done for done, _ in seen] == list(range(1, 1 + 1 + 6 + 5)) and all(t == 12 for _, t in seen)


def test_greedy_loss_plan_cut_to_a_smaller_target_equals_planning_for_it(deep):
    from skiplm.planners.greedy_loss import cut_plan

    calibration = random_calibration()
    costs = CostModel.from_parameter_counts(deep)
    large = run_planner("greedy-loss", deep, calibration, speedup=1.6)
    for target in (1.05, 1.2, 1.4, 1.6):
        direct = run_planner("greedy-loss", deep, calibration, speedup=target)
        cut = cut_plan(deep, large, target)
        assert (cut.decode, cut.prefill) == (direct.decode, direct.prefill)
        assert cut.provenance["steps"] == direct.provenance["steps"]
        assert cut.provenance["target"] == {"speedup": target}
        assert costs.ideal_speedup(cut.decode) >= target
    with pytest.raises(PlanError, match="out of reach|ran out"):
        cut_plan(deep, run_planner("greedy-loss", deep, calibration, speedup=1.1), 1.6)
    with pytest.raises(PlanError, match="only a greedy-loss plan"):
        cut_plan(deep, run_planner("uniform", deep, speedup=1.2), 1.1)


# -- iterative similarity --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["attention", "mlp", "block", "joint"])
def test_iterative_scores_are_those_of_the_model_with_earlier_drops_applied(unit):
    model = tiny_model("llama", seed=1, num_layers=6)
    calibration = random_calibration(length=32)
    one_shot = run_planner("similarity", model, calibration, skip=3, unit=unit)
    iterative = run_planner("similarity", model, calibration, skip=3, unit=unit, iterative=True)
    steps = iterative.provenance["steps"]
    # step 1 scores the full model: the same ranking as one-shot
    assert iterative.provenance["order"][0] == one_shot.provenance["order"][0]
    for part, values in steps[0]["scores"].items():
        assert values == one_shot.provenance["scores"][f"cosine_{part}"]
    # later steps: the scores of a copy whose dropped units physically write nothing (output projections zeroed)
    dropped = []
    for step in steps:
        reference = copy.deepcopy(model)
        for label in dropped:
            part, layer = label.split()
            zero_out(reference, int(layer), ["attention", "mlp"] if part == "block" else [part])
        trace = trace_residuals(reference, calibration)
        for part, values in step["scores"].items():
            assert values == pytest.approx(cosine_similarity(trace, part).tolist(), abs=1e-5)
        dropped.append(step["dropped"])


def test_iterative_and_one_shot_agree_on_the_first_drop_and_can_part_later():
    model = tiny_model("llama", seed=1, num_layers=6)
    calibration = random_calibration(length=32)
    for unit in ("attention", "mlp", "block", "joint"):
        one = run_planner("similarity", model, calibration, skip=1, unit=unit)
        assert run_planner("similarity", model, calibration, skip=1, unit=unit, iterative=True) == one
    # With this seed and data, once attention 4 is dropped MLP 4 sees a different input, and re-scoring ranks it
    # above MLP 5 (one-shot, scored on the full model, has it the other way round).
    one = run_planner("similarity", model, calibration, skip=3, unit="joint").provenance["order"]
    iterative = run_planner("similarity", model, calibration, skip=3, unit="joint", iterative=True).provenance["order"]
    assert one == ["attention 5", "attention 4", "mlp 5"]
    assert iterative == ["attention 5", "attention 4", "mlp 4"]


@pytest.mark.parametrize("family", FAMILIES)
def test_trace_under_a_plan_equals_the_model_whose_skipped_units_write_nothing(family):
    model = tiny_model(family)
    plan = SkipPlan.from_layers(5, blocks=[1], attention=[2], mlp=[3])
    calibration = random_calibration(length=12)
    with skiplm.apply(model, plan, check_model=False):
        traced = trace_residuals(model, calibration)
    assert torch.equal(traced.block_in[1], traced.block_in[2]) and torch.equal(traced.mid[1], traced.block_in[1])
    assert torch.equal(traced.mid[2], traced.block_in[2]) and torch.equal(traced.block_in[4], traced.mid[3])
    reference = copy.deepcopy(model)
    zero_out(reference, 1)
    zero_out(reference, 2, ["attention"])
    zero_out(reference, 3, ["mlp"])
    expected = trace_residuals(reference, calibration)
    assert torch.allclose(traced.block_in, expected.block_in, atol=1e-5)
    assert torch.allclose(traced.mid, expected.mid, atol=1e-5)


# -- bad input --------------------------------------------------------------------------------------------------------


def test_bad_arguments_get_clear_errors(deep):
    for method in ("block-influence", "angular", "similarity", "greedy-loss"):
        with pytest.raises(PlanError, match="calibration=") as info:
            get_planner(method)(deep, skip=1)
        assert "load_calibration" in str(info.value)
        with pytest.raises(PlanError, match="exactly one"):
            run_planner(method, deep)
        with pytest.raises(PlanError, match="exactly one"):
            run_planner(method, deep, skip=1, speedup=1.2)
        with pytest.raises(PlanError, match="greater than 1"):
            run_planner(method, deep, speedup=1.0)
        with pytest.raises(PlanError, match="must be an integer"):
            run_planner(method, deep, skip=1.5)
        with pytest.raises(DataError, match="calibration is empty"):
            run_planner(method, deep, [], skip=1)
        with pytest.raises(DataError, match="outside 0..127"):
            run_planner(method, deep, [torch.tensor([[5, 500, 7]])], skip=1)
        with pytest.raises(DataError, match="tensor of token ids"):
            run_planner(method, deep, [torch.rand(1, 8)], skip=1)
    with pytest.raises(PlanError, match="unknown unit 'layer'.*attention, mlp, block, joint"):
        run_planner("similarity", deep, skip=1, unit="layer")
    with pytest.raises(DataError, match="needs at least 2"):
        run_planner("greedy-loss", deep, [torch.tensor([[5]])], skip=1)
    with skiplm.apply(deep, SkipPlan.from_layers(DEEP, blocks=[2]), check_model=False):
        with pytest.raises(PlanError, match="has a skip plan applied"):
            run_planner("block-influence", deep, skip=1)
    assert {"uniform", "block-influence", "angular", "similarity", "greedy-loss"} <= set(PLANNERS.names())


def test_load_calibration_from_a_text_file(tmp_path):
    from skiplm.models.loading import _converted_gguf, default_gguf_path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(_converted_gguf(default_gguf_path(), "smollm2-135m")))
    calibration = load_calibration(tokenizer, "gsm8k", sequences=3, length=16)
    assert isinstance(calibration, Calibration) and len(calibration) == 3
    assert all(ids.shape == (1, 16) for ids in calibration)
    assert calibration.describe() == {"source": "gsm8k", "sequences": 3, "length": 16, "tokens": 48}
    text = tmp_path / "short.txt"
    text.write_text("Only a few words here.")
    with pytest.raises(DataError, match="'short.txt' is too short.*fewer or shorter sequences"):
        load_calibration(tokenizer, str(text), sequences=4, length=64)
    with pytest.raises(DataError, match="positive integer"):
        load_calibration(tokenizer, "gsm8k", sequences=0, length=16)


# -- the CLI ----------------------------------------------------------------------------------------------------------





@pytest.mark.parametrize("method, options", [
    ("block-influence", []),
    ("angular", []),
    ("similarity", ["--unit", "joint", "--iterative"]),
    ("greedy-loss", []),
])
def test_cli_plan_with_each_method(tiny_folder, tmp_path, method, options):
    out = tmp_path / "plan.json"
    result = run_cli("plan", tiny_folder, "--method", method, "--skip", 2, "--sequences", 2, "--length", 16,
                     *options, "-o", out)
    assert result.exception is None, result.output
    plan = SkipPlan.load(out)
    assert plan.provenance["method"] == method
    assert plan.provenance["calibration"] == {"source": "gsm8k", "sequences": 2, "length": 16, "tokens": 32}
    assert units_of(plan) == 2
    if method == "similarity":
        assert plan.provenance["unit"] == "joint" and plan.provenance["iterative"] is True


def test_cli_plan_speedup_and_default_calibration_size(tiny_folder, tmp_path):
    out = tmp_path / "plan.json"
    result = run_cli("plan", tiny_folder, "--method", "similarity", "--unit", "attention", "--speedup", 1.001,
                     "--corpus", "pydoc", "-o", out)
    assert result.exception is None, result.output
    plan = SkipPlan.load(out)
    assert plan.provenance["calibration"] == {"source": "pydoc", "sequences": 8, "length": 256, "tokens": 2048}
    assert plan.provenance["target"] == {"speedup": 1.001} and len(plan.decode.attention) >= 1


def test_cli_plan_bad_input(tiny_folder, tmp_path):
    out = tmp_path / "x.json"
    cases = [
        (["--method", "similarity", "--unit", "heads", "--skip", 1], PlanError, "unknown unit 'heads'"),
        (["--method", "angular"], PlanError, "exactly one"),
        (["--method", "block-influence", "--unit", "mlp", "--skip", 1], PlanError, "--unit does not apply"),
        (["--method", "angular", "--iterative", "--skip", 1], PlanError, "--iterative does not apply"),
        (["--method", "uniform", "--sequences", 4, "--skip", 1], PlanError, "uses no calibration text"),
        (["--method", "greedy-loss", "--skip", 1, "--length", 1], DataError, "needs at least 2"),
        (["--method", "angular", "--skip", 9], PlanError, "can skip 0..3"),
    ]
    short = tmp_path / "short.txt"
    short.write_text("Too short for calibration.")
    cases.append((["--method", "block-influence", "--skip", 1, "--corpus", short, "--sequences", 4], DataError,
                  "too short"))
    for args, error, message in cases:
        result = run_cli("plan", tiny_folder, *args, "-o", out)
        assert isinstance(result.exception, error) and message in str(result.exception), (args, result.exception)
    assert not out.exists()
