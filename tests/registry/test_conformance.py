"""Every registered planner and policy keeps the invariants every skipper shares, on a tiny model: skipping nothing
is the full model, a cached decode equals recomputing under a small plan, its file loads back as itself, and a model
it was not made for is refused clearly. And a method registered by a test alone is found everywhere: `skiplm plan
--method`, `make_plans` and `skiplm compare`, a sweep and the report."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import skiplm
from skiplm import PlanMismatchError, SkipPlan, load_skipper
from skiplm.measure.latency import LatencyModel
from skiplm.models.adapters import count_layers
from skiplm.planners import get_planner
from skiplm.planners.common import Planning, prefixes
from skiplm.policies import HaltingPolicy, make_policy
from skiplm.registry import PLANNERS, POLICIES, Option
from skiplm.sweep.compare import default_methods, make_plans

from conftest import NUM_LAYERS, VOCAB, greedy_with_cache, run_cli, tiny_model

# a fixed latency model: timing the tiny model would be noise
LATENCY = LatencyModel(fixed_s=0.004, attention_s=0.0005, mlp_s=0.001, num_layers=NUM_LAYERS, batch_size=1,
                       context=64)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def foreign():
    return tiny_model("llama", seed=1)  # same shapes, other weights


def calibration(sequences=2, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (1, length), generator=g) for _ in range(sequences)]


def plan_with(name: str, model, skip: int) -> SkipPlan:
    """The planner ``name``'s plan skipping ``skip`` units, given what its spec says it needs."""
    spec = PLANNERS.get(name)
    options = {}
    if spec.data_driven:
        options["calibration"] = calibration()
    if "latency" in spec.needs:
        options["latency_model"] = LATENCY
    return get_planner(name)(model, skip=skip, **options)


def ids():
    return torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))


# -- every planner ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PLANNERS.names())
def test_a_planner_skipping_nothing_is_the_full_model(model, name):
    plan = plan_with(name, model, 0)
    assert plan.decode.is_empty() and plan.prefill.is_empty()
    with torch.inference_mode():
        full = model(ids()).logits
        with skiplm.apply(model, plan):
            planned = model(ids()).logits
    assert torch.equal(full, planned)


@pytest.mark.parametrize("name", PLANNERS.names())
def test_a_planners_cached_decode_equals_recomputing_under_its_plan(model, name):
    plan = plan_with(name, model, 1)
    assert not plan.decode.is_empty()
    with torch.inference_mode(), skiplm.apply(model, plan):
        sequence, cached = greedy_with_cache(model, ids(), steps=4)
        recomputed = model(sequence, use_cache=False).logits[0, ids().shape[1] - 1:]
    assert torch.allclose(cached, recomputed, atol=1e-4)


@pytest.mark.parametrize("name", PLANNERS.names())
def test_a_planners_file_loads_back_and_refuses_another_model(model, foreign, name, tmp_path):
    plan = plan_with(name, model, 1)
    loaded = load_skipper(plan.save(tmp_path / "plan.json"))
    assert loaded == plan and loaded.provenance == plan.provenance
    assert loaded.provenance["method"] in PLANNERS  # a preset's plan says its base planner
    with pytest.raises(PlanMismatchError, match="plan"):
        skiplm.apply(foreign, loaded)


def test_every_planner_is_described(model):
    for spec in PLANNERS:
        assert spec.summary and spec.paper, spec.name
        if spec.data_driven:
            assert spec.calibration is not None, spec.name
        if spec.nested:
            assert callable(spec.extra.get("plan_targets")), spec.name
    assert "similarity" not in default_methods() and "similarity-attention" in default_methods()


# -- every policy -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", POLICIES.names())
def test_a_policy_skipping_nothing_is_the_full_model_and_its_file_loads_back(model, foreign, name, tmp_path):
    policy = make_policy(name, NUM_LAYERS, threshold=None, prefill_threshold=None).for_model(model)
    with torch.inference_mode():
        full = model(ids()).logits
        with skiplm.apply(model, policy):
            decided = model(ids()).logits
    assert torch.equal(full, decided)
    loaded = load_skipper(policy.save(tmp_path / "policy.json"))
    assert loaded.to_json() == policy.to_json()
    with pytest.raises(PlanMismatchError):
        skiplm.apply(foreign, loaded)


def test_the_policies_are_registered():
    assert {"ffn-skip", "lac", "lac-mlp"} <= set(POLICIES.names())


# -- a method registered by a test alone ----------------------------------------------------------------------------
def plan_last_blocks(model, *, speedup=None, skip=None, prefill="same", name=None, calibration=None, progress=None,
                     first: bool = False):
    """Toy planner: skip intermediate blocks from the last one down (``first``: from the first one up)."""
    job = Planning.start(model, "toy-planner", speedup=speedup, skip=skip, prefill=prefill, name=name,
                         calibration=calibration, progress=progress)
    middle = list(range(1, job.num_layers - 1))
    order = [("block", layer) for layer in (middle if first else middle[::-1])]
    units = job.select(prefixes(order), pool=order, limit=len(order), what="intermediate blocks")
    return job.plan(units, first=first)


@pytest.fixture
def toy_planner():
    with PLANNERS.temporarily("toy-planner", plan_last_blocks, paper="Toy et al. 2099, Skipping from the top",
                              needs={"calibration"}, calibration=(2, 16),
                              options=[Option("first", bool, False, "skip from the first block up")]) as spec:
        yield spec


TINY_SWEEP = ["--batch-sizes", "1", "--prompt-tokens", 8, "--decode-prompt-tokens", 4, "--new-tokens", 2,
              "--repeats", 1, "--warmup", 0, "--tokens", 48, "--context", 32, "--stride", 16, "--limit", 2,
              "--agree-tokens", 3, "--sequences", 2, "--length", 16]


def test_a_planner_registered_in_a_test_is_a_method_everywhere(toy_planner, tiny_folder, tmp_path, model):
    assert "toy-planner" in PLANNERS.names() and "toy-planner" in default_methods()

    # skiplm plan --method, its default calibration size and its options from the spec
    out = tmp_path / "toy.json"
    result = run_cli("plan", tiny_folder, "--method", "toy-planner", "--skip", 1, "-o", out)
    assert result.exception is None, result.output
    plan = SkipPlan.load(out)
    assert plan.decode.blocks == [2] and plan.provenance["method"] == "toy-planner"
    assert plan.provenance["paper"] == "Toy et al. 2099, Skipping from the top"
    assert plan.provenance["calibration"]["sequences"] == 2 and plan.provenance["calibration"]["length"] == 16
    result = run_cli("plan", tiny_folder, "--method", "toy-planner", "--skip", 1, "--option", "first=yes", "-o", out)
    assert result.exception is None, result.output
    assert SkipPlan.load(out).decode.blocks == [1]
    result = run_cli("plan", tiny_folder, "--method", "toy-planner", "--skip", 1, "--unit", "mlp", "-o", out)
    assert "--unit does not apply to the 'toy-planner' method" in str(result.exception)

    # make_plans: a plan per target, from the registry alone
    points = make_plans(model, ["toy-planner", "uniform"], [1.01, 50.0], calibration())
    assert [(p.method, p.target) for p in points] == [("toy-planner", 1.01), ("toy-planner", 50.0), ("uniform", 1.01),
                                                      ("uniform", 50.0)]
    assert points[0].plan.provenance["method"] == "toy-planner" and "out of reach" in points[1].error

    # a sweep, skiplm compare, and the report of both
    result = run_cli("bench", tiny_folder, "--sweep", "--methods", "toy-planner", "--targets", "1.005", *TINY_SWEEP,
                     "-o", tmp_path / "sweep")
    assert result.exception is None, result.output
    points = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["points"]
    assert [(p["method"], p["target"]) for p in points] == [("full", 1.0), ("toy-planner", 1.005)]
    assert points[1]["error"] is None and points[1]["plan"]["provenance"]["method"] == "toy-planner"
    result = run_cli("compare", tiny_folder, "--methods", "toy-planner", "--targets", "1.005", "--sequences", 2,
                     "--length", 16, "--tokens", 48, "--context", 32, "--stride", 16, "--repeats", 1, "--new-tokens", 2,
                     "-o", tmp_path / "compare")
    assert result.exception is None, result.output
    compared = json.loads((tmp_path / "compare" / "compare.json").read_text())
    assert [p["method"] for p in compared["points"]] == ["toy-planner"] and "perplexity" in compared["points"][0]
    result = run_cli("report", tmp_path / "sweep", tmp_path / "compare", "-o", tmp_path / "report.html")
    assert result.exception is None, result.output
    page = (tmp_path / "report.html").read_text()
    assert "<td>toy-planner</td><td>1.005</td>" in page and 'data-plan="toy-planner @ 1.005"' in page
    assert "Toy et al. 2099, Skipping from the top" in page  # the registry's description of the method


@dataclasses.dataclass
class ToyGate(HaltingPolicy):
    """A toy policy defined here: a token halts once sigmoid(mean of its residual) exceeds the threshold."""

    method = "toy-policy"
    threshold_range = (0.0, 1.0)
    more_skips_with_larger = False  # a larger threshold: fewer tokens pass it

    def _signal(self, layer, layer_input, mlp_input, layer_output, threshold):
        return self._values(torch.sigmoid(layer_output.mean(-1))) > threshold


def test_a_policy_registered_in_a_test_is_a_method_of_compare_and_sweeps(tiny_folder, tmp_path, monkeypatch, model):
    measured = classmethod(lambda cls, model, **kw: dataclasses.replace(LATENCY, num_layers=count_layers(model)))
    monkeypatch.setattr(LatencyModel, "measure", measured)
    with POLICIES.temporarily("toy-policy", ToyGate, paper="Toy et al. 2099, Halting at the top",
                              needs={"calibration"}):
        points = make_plans(model, ["toy-policy"], [1.1], calibration(length=24))
        assert points[0].error is None and points[0].plan.provenance["name"] == "toy-policy"
        assert isinstance(points[0].plan, ToyGate)
        result = run_cli("bench", tiny_folder, "--sweep", "--methods", "toy-policy", "--targets", "1.1", *TINY_SWEEP,
                         "-o", tmp_path / "sweep")
        assert result.exception is None, result.output
        result = run_cli("report", tmp_path / "sweep", "-o", tmp_path / "report.html")
        assert result.exception is None, result.output
        swept = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["points"][1]
        assert swept["method"] == "toy-policy" and swept["error"] is None
        assert isinstance(load_skipper(tmp_path / "sweep" / swept["plan_file"]), ToyGate)
    assert "Toy et al. 2099, Halting at the top" in (tmp_path / "report.html").read_text()
