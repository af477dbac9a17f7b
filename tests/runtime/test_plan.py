"""SkipPlan: construction, validation, files, model identity; the uniform planner; unsupported architectures."""

from __future__ import annotations

import json
import math

import pytest
import torch

import skiplm
from skiplm import CostModel, PlanError, PlanMismatchError, SkipPlan, SkipSet
from skiplm.planners.uniform import balanced_positions

from conftest import FAMILIES, NUM_LAYERS, cached_tiny_model, tiny_gpt2, tiny_model

N = NUM_LAYERS


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def llama():
    return cached_tiny_model("llama")


def stamped_plan(model) -> SkipPlan:
    return SkipPlan.from_layers(
        N, blocks=[1], attention=[3], mlp=[0, 2], prefill=SkipSet.of(attention=[3], mlp=[4]), provenance={"method": "test", "k": [1, 2]}
    ).for_model(model, name="tiny-llama")


def write(tmp_path, content, name="plan.json"):
    path = tmp_path / name
    if isinstance(content, (bytes, bytearray)):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))
    return path


def valid_json(model) -> dict:
    return stamped_plan(model).to_json()


# -- construction ---------------------------------------------------------------------------------------------------


def test_from_layers_builds_the_sets():
    plan = SkipPlan.from_layers(N, blocks=[3, 1], attention=[2], mlp=[0])
    assert plan.decode.blocks == [1, 3]
    assert plan.decode.attention == {1, 2, 3} and plan.decode.mlp == {0, 1, 3}
    assert plan.prefill == plan.decode
    assert plan.decode.skips(2, "attention") and not plan.decode.skips(2, "mlp")
    assert "blocks 1,3" in plan.describe() and f"of {N} layers" in plan.describe()
    full = SkipPlan.from_layers(N, blocks=[1], prefill="full")
    assert full.prefill.is_empty() and full.decode.blocks == [1] and not full.is_empty()
    assert "prefill: nothing skipped" in full.describe()
    assert SkipPlan.empty(N).is_empty()


def test_prefill_may_skip_mlp_that_decode_runs():
    plan = SkipPlan.from_layers(N, attention=[2], prefill=SkipSet.of(mlp=[1, 3], attention=[2]))
    assert plan.prefill.mlp == {1, 3} and plan.decode.mlp == frozenset()


# -- files ----------------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path, llama):
    plan = stamped_plan(llama)
    path = plan.save(tmp_path / "nested" / "dir" / "plan.json")
    assert path.is_file()
    data = json.loads(path.read_text())
    assert data["format"] == "skiplm.plan" and data["schema_version"] == 1 and data["num_layers"] == N
    assert data["decode"] == {"blocks": [1], "attention": [3], "mlp": [0, 2]}
    assert data["prefill"] == {"blocks": [], "attention": [3], "mlp": [4]}

    loaded = SkipPlan.load(path)
    assert loaded == plan
    assert loaded.prefill == plan.prefill and loaded.decode == plan.decode
    assert loaded.model == plan.model and loaded.model.name == "tiny-llama"
    assert loaded.model.weight_samples == plan.model.weight_samples
    assert loaded.provenance == {"method": "test", "k": [1, 2]}
    assert loaded.describe() == plan.describe()
    assert SkipPlan.load(loaded.save(tmp_path / "again.json")) == plan

    # the loaded plan does exactly what the original does
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(3))
    with skiplm.apply(llama, plan):
        original = llama(ids).logits
    with skiplm.apply(llama, loaded):
        assert torch.equal(llama(ids).logits, original)


def test_round_trip_of_an_unstamped_plan(tmp_path):
    plan = SkipPlan.from_layers(N, attention=[0], prefill="full")
    loaded = SkipPlan.load(plan.save(tmp_path / "p.json"))
    assert loaded == plan and loaded.model is None and loaded.prefill.is_empty()


# -- bad plans ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layers, message",
    [
        (dict(blocks=[N]), "out of range"),
        (dict(attention=[-1]), "out of range"),
        (dict(mlp=[0, 99]), "out of range"),
    ],
)
def test_indices_out_of_range(layers, message):
    with pytest.raises(PlanError, match=message) as info:
        SkipPlan.from_layers(N, **layers)
    assert f"valid indices 0..{N - 1}" in str(info.value)


def test_skipping_every_layer_is_refused():
    with pytest.raises(PlanError, match=f"skips every one of the {N} layers"):
        SkipPlan.from_layers(N, blocks=range(N))
    with pytest.raises(PlanError, match="every one"):
        SkipPlan.from_layers(N, attention=range(N), mlp=range(N))
    with pytest.raises(PlanError, match="prefill plan skips every one"):
        SkipPlan.from_layers(N, blocks=[0], prefill=SkipSet.of(range(N)))


def test_prefill_skipping_attention_that_decode_runs_is_refused():
    with pytest.raises(PlanError, match=r"prefill skips attention of layer\(s\) \[2\] but decode runs it"):
        SkipPlan.from_layers(N, blocks=[1], prefill=SkipSet.of(attention=[2]))
    with pytest.raises(PlanError, match="decode runs it"):
        SkipPlan.from_layers(N, mlp=[2], prefill=SkipSet.of(blocks=[2]))


def test_bad_prefill_and_num_layers():
    with pytest.raises(PlanError, match="prefill must be 'same', 'full' or a SkipSet"):
        SkipPlan.from_layers(N, blocks=[1], prefill="half")
    for bad in (0, -3, "5", 2.0):
        with pytest.raises(PlanError, match="num_layers must be a positive integer"):
            SkipPlan.from_layers(bad)


@pytest.mark.parametrize("bad", [[1.5], ["2"], [True], ["a"], [None]], ids=["float", "str-digit", "bool", "str", "None"])
def test_wrong_types_in_layer_lists_are_refused_by_the_api(bad):
    # The JSON loader refuses these (see below); the Python API must not silently coerce them (1.5 -> layer 1).
    with pytest.raises(PlanError, match="integer"):
        SkipPlan.from_layers(N, blocks=bad)


def test_missing_file(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        SkipPlan.load(tmp_path / "nope.json")


@pytest.mark.parametrize("text", ["", "   \n\t\n"], ids=["empty", "whitespace"])
def test_empty_file(tmp_path, text):
    with pytest.raises(PlanError, match="is empty"):
        SkipPlan.load(write(tmp_path, text))


def test_truncated_file(tmp_path, llama):
    text = json.dumps(valid_json(llama), indent=2)
    for cut in (len(text) // 3, len(text) // 2, len(text) - 2):
        with pytest.raises(PlanError, match="not valid JSON") as info:
            SkipPlan.load(write(tmp_path, text[:cut]))
        assert "truncated" in str(info.value) and "plan.json" in str(info.value)


def test_binary_file_gives_a_plan_error(tmp_path):
    with pytest.raises(PlanError, match="plan file"):
        SkipPlan.load(write(tmp_path, bytes(range(256))))


@pytest.mark.parametrize("data", [{"hello": 1}, [1, 2, 3], "a string", 42, None, {"format": "other", "schema_version": 1}])
def test_non_plan_json(tmp_path, data):
    with pytest.raises(PlanError, match="not a skiplm plan"):
        SkipPlan.load(write(tmp_path, json.dumps(data)))


def test_newer_schema_version(tmp_path, llama):
    data = valid_json(llama)
    data["schema_version"] = 2
    with pytest.raises(PlanError, match="schema version 2 is newer") as info:
        SkipPlan.load(write(tmp_path, data))
    assert "upgrade skiplm" in str(info.value)
    data["schema_version"] = "1"
    with pytest.raises(PlanError, match="schema_version"):
        SkipPlan.load(write(tmp_path, data))


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("decode", "blocks", ["1"]),
        ("decode", "blocks", [1.5]),
        ("decode", "attention", [True]),
        ("decode", "mlp", "0,2"),
        ("prefill", "mlp", None),
        ("prefill", "attention", [[3]]),
    ],
)
def test_wrong_types_in_lists(tmp_path, llama, section, key, value):
    data = valid_json(llama)
    data[section][key] = value
    with pytest.raises(PlanError, match=f"{section}.{key} must be a list of layer indices"):
        SkipPlan.load(write(tmp_path, data))


def test_other_malformed_fields(tmp_path, llama):
    cases = [
        (("num_layers", "5"), "'num_layers' must be an integer"),
        (("num_layers", True), "'num_layers' must be an integer"),
        (("decode", [1, 2]), "decode must be an object"),
        (("prefill", {"blocks": [], "layers": [1]}), "unknown keys ['layers']"),
        (("model", {"model_type": "llama"}), "'model' is malformed"),
        (("model", "llama"), "'model' is malformed"),
        (("provenance", "yesterday"), "'provenance' must be an object"),
    ]
    for (field, value), message in cases:
        data = valid_json(llama)
        data[field] = value
        with pytest.raises(PlanError) as info:
            SkipPlan.load(write(tmp_path, data))
        assert message in str(info.value), (field, str(info.value))
    data = valid_json(llama)
    del data["decode"]
    with pytest.raises(PlanError, match="no 'decode' section"):
        SkipPlan.load(write(tmp_path, data))


def test_out_of_range_in_file(tmp_path, llama):
    data = valid_json(llama)
    data["decode"]["blocks"] = [1, 7]
    with pytest.raises(PlanError, match="out of range") as info:
        SkipPlan.load(write(tmp_path, data))
    assert "plan.json" in str(info.value)
    data = valid_json(llama)
    data["model"]["num_layers"] = N + 1
    with pytest.raises(PlanError, match="inconsistent"):
        SkipPlan.load(write(tmp_path, data))


# -- model identity -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stamped", [False, True], ids=["unstamped", "stamped"])
def test_plan_for_a_different_number_of_layers(stamped, llama):
    plan = SkipPlan.from_layers(N, blocks=[1])
    if stamped:
        plan = plan.for_model(llama)
    shorter = cached_tiny_model("llama", num_layers=N - 1)
    with pytest.raises(PlanMismatchError, match=f"covers {N} layers but the model has {N - 1}"):
        skiplm.apply(shorter, plan)
    with pytest.raises(PlanError, match="different number"):
        skiplm.apply(shorter, plan, check_model=False)
    with pytest.raises(PlanMismatchError, match=f"covers {N} layers but the model has {N - 1}"):
        SkipPlan.from_layers(N, blocks=[1]).for_model(shorter)
    assert getattr(shorter, "_skiplm_handle", None) is None


def test_plan_for_same_shapes_but_different_weights(llama):
    plan = SkipPlan.from_layers(N, blocks=[2]).for_model(llama, name="seed0")
    other = cached_tiny_model("llama", seed=1)
    with pytest.raises(PlanMismatchError, match="same shapes but different weights") as info:
        skiplm.apply(other, plan)
    assert "seed0" in str(info.value)
    assert getattr(other, "_skiplm_handle", None) is None
    with skiplm.apply(other, plan, check_model=False) as handle:  # the escape hatch works
        assert handle.plan is plan


def test_plan_for_another_family_with_identical_parameters(llama):
    mistral = cached_tiny_model("mistral")  # same parameter names, shapes and (same seed) values as the llama
    plan = SkipPlan.from_layers(N, blocks=[2]).for_model(mistral)
    with pytest.raises(PlanMismatchError, match="made for a different model") as info:
        skiplm.apply(llama, plan)
    assert "mistral" in str(info.value) and "llama" in str(info.value)


def test_same_model_in_bfloat16_is_accepted(llama):
    plan = SkipPlan.from_layers(N, blocks=[2], attention=[3]).for_model(llama)
    bf16 = tiny_model("llama").to(torch.bfloat16)
    plan.check_model(bf16)
    ids = torch.randint(3, 100, (1, 10), generator=torch.Generator().manual_seed(5))
    with skiplm.apply(bf16, plan):
        logits = bf16(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    # and the other way round: a plan made on the bf16 copy fits the fp32 model
    skiplm.apply(llama, SkipPlan.from_layers(N, blocks=[2]).for_model(bf16)).remove()
    # a bf16 copy of a *different* model is still refused
    with pytest.raises(PlanMismatchError, match="different weights"):
        skiplm.apply(tiny_model("llama", seed=1).to(torch.bfloat16), plan)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_of_every_family(family):
    model = cached_tiny_model(family)
    identity = skiplm.model_identity(model)
    assert identity.model_type == family and identity.num_layers == N
    assert len(identity.weight_samples) > 0
    plan = SkipPlan.from_layers(N, blocks=[1]).for_model(model)
    plan.check_model(model)


# -- the uniform planner --------------------------------------------------------------------------------------------

DEEP = 12


@pytest.fixture(scope="module")
def deep():
    return cached_tiny_model("llama", num_layers=DEEP)


@pytest.mark.parametrize("skip", range(0, DEEP - 1))
def test_uniform_skip(deep, skip):
    plan = skiplm.plan_uniform(deep, skip=skip)
    blocks = plan.decode.blocks
    assert len(blocks) == skip
    assert plan.decode.attention == plan.decode.mlp == set(blocks), "uniform skips whole blocks only"
    assert plan.prefill == plan.decode
    assert 0 not in blocks and DEEP - 1 not in blocks
    assert blocks == sorted(set(blocks))
    # evenly spread over the DEEP - 2 intermediate layers: each within half a slot of its ideal position
    middle = DEEP - 2
    for k, layer in enumerate(blocks):
        ideal = 1 + (k + 0.5) * middle / skip
        assert abs(layer - ideal) < 1, (k, layer, ideal)
    gaps = [b - a for a, b in zip(blocks, blocks[1:])]
    if gaps:
        assert max(gaps) - min(gaps) <= 1, gaps
    assert plan.model is not None
    plan.check_model(deep)
    assert plan.provenance["method"] == "uniform" and plan.provenance["target"] == {"skip": skip}


def test_uniform_skip_out_of_range(deep):
    for bad in (DEEP - 1, DEEP, -1):
        with pytest.raises(PlanError, match=f"can skip 0..{DEEP - 2} intermediate layers"):
            skiplm.plan_uniform(deep, skip=bad)


def test_uniform_prefill_full(deep):
    plan = skiplm.plan_uniform(deep, skip=3, prefill="full")
    assert plan.prefill.is_empty() and len(plan.decode.blocks) == 3


@pytest.mark.parametrize("target", [1.01, 1.1, 1.25, 1.5, 2.0, 3.0])
def test_uniform_speedup_target(deep, target):
    costs = CostModel.from_parameter_counts(deep)
    plan = skiplm.plan_uniform(deep, speedup=target)
    count = len(plan.decode.blocks)
    assert costs.ideal_speedup(plan.decode) >= target
    assert count >= 1
    fewer = SkipSet.of(balanced_positions(DEEP, count - 1))
    assert costs.ideal_speedup(fewer) < target, "one block fewer would already reach the target"
    assert 0 not in plan.decode.blocks and DEEP - 1 not in plan.decode.blocks
    assert plan.provenance["target"] == {"speedup": target}


def test_cost_model_counts(deep):
    costs = CostModel.from_parameter_counts(deep)
    total = sum(p.numel() for p in deep.parameters())
    embedding = deep.get_input_embeddings().weight.numel()
    final_norm = deep.model.norm.weight.numel()
    assert costs.total == total - embedding - final_norm
    assert costs.ideal_speedup(SkipSet()) == 1.0
    one = costs.ideal_speedup(SkipSet.of([5]))
    assert math.isclose(one, costs.total / (costs.total - costs.attention[5] - costs.mlp[5]))


def test_uniform_unreachable_target(deep):
    with pytest.raises(PlanError, match="out of reach") as info:
        skiplm.plan_uniform(deep, speedup=1000.0)
    assert f"all {DEEP - 2} intermediate layers" in str(info.value)


def test_uniform_bad_arguments(deep):
    with pytest.raises(PlanError, match="exactly one"):
        skiplm.plan_uniform(deep)
    with pytest.raises(PlanError, match="exactly one"):
        skiplm.plan_uniform(deep, skip=2, speedup=1.2)
    for bad in (1.0, 0.5):
        with pytest.raises(PlanError, match="greater than 1"):
            skiplm.plan_uniform(deep, speedup=bad)
    assert skiplm.get_planner("uniform") is skiplm.plan_uniform
    with pytest.raises(PlanError, match="unknown planner 'magic'; available: uniform"):
        skiplm.get_planner("magic")


# -- unsupported architectures ---------------------------------------------------------------------------------------


def test_unsupported_architecture():
    gpt2 = tiny_gpt2()
    attempts = [
        lambda: skiplm.apply(gpt2, SkipPlan.from_layers(2, blocks=[1])),
        lambda: skiplm.apply(gpt2, SkipPlan.from_layers(2, blocks=[1]), check_model=False),
        lambda: SkipPlan.from_layers(2, blocks=[1]).for_model(gpt2),
        lambda: skiplm.plan_uniform(gpt2, skip=0),
        lambda: CostModel.from_parameter_counts(gpt2),
    ]
    for attempt in attempts:
        with pytest.raises(skiplm.UnsupportedArchitectureError) as info:
            attempt()
        message = str(info.value)
        assert "'gpt2'" in message
        for family in FAMILIES:
            assert family in message, family
        assert "set_adapter" in message
    assert getattr(gpt2, "_skiplm_handle", None) is None
    assert sorted(FAMILIES) == sorted(set(FAMILIES) & set(skiplm.supported_model_types()))


def test_object_without_config_is_unsupported():
    with pytest.raises(skiplm.UnsupportedArchitectureError, match="no `.config`"):
        skiplm.model_identity(torch.nn.Linear(2, 2))
