"""The policy registry: every registered policy conforms (name, options, files, calibration direction), presets carry
their fixed settings, and a policy registered by a third party — a toy defined here, no skiplm file touched — works
through the public functions and the command line."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import skiplm
from skiplm.errors import PlanError
from skiplm.policies import (
    LAC,
    HaltingPolicy,
    apply_policy,
    calibrate,
    make_policy,
    measure_skip_ratio,
    policy_from_json,
)
from skiplm.registry import POLICIES, Option

from conftest import VOCAB, cached_tiny_model, run_cli

LAYERS = 8


def batch_ids(rows: int = 1, length: int = 48, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


@dataclasses.dataclass
class MeanGate(HaltingPolicy):
    """A toy policy: a token halts once sigmoid(scale x mean of its residual) exceeds the threshold."""

    scale: float = 1.0

    method = "mean-gate"
    threshold_range = (0.0, 1.0)
    more_skips_with_larger = False  # a larger threshold: fewer tokens pass it

    def _signal(self, layer, layer_input, mlp_input, layer_output, threshold):
        return self._values(torch.sigmoid(self.scale * layer_output.mean(-1))) > threshold

    def settings(self):
        return {**super().settings(), "scale": self.scale}


@pytest.fixture
def mean_gate():
    with POLICIES.temporarily("mean-gate", MeanGate, paper="a test", needs={"calibration"}, calibration=(2, 32),
                              options=[Option("scale", float, 1.0, "how sharp the gate is")]) as spec:
        yield spec
    assert "mean-gate" not in POLICIES


# -- conformance: every registered policy ------------------------------------------------------------------------------
def test_the_built_in_policies_are_registered():
    assert {"ffn-skip", "lac", "lac-mlp"} <= set(POLICIES.names())
    assert POLICIES.get("lac-mlp").target is LAC and POLICIES.get("lac-mlp").defaults == {"parts": "mlp"}
    assert make_policy("lac-mlp", LAYERS, 0.3).parts == "mlp"
    assert make_policy("lac", LAYERS, 0.3).parts == "layer"  # the sweep's "lac": whole layers


@pytest.mark.parametrize("name", POLICIES.names())
def test_every_registered_policy_conforms(name):
    spec = POLICIES.get(name)
    policy_class = spec.target
    assert issubclass(policy_class, HaltingPolicy) and spec.paper and spec.summary
    if not spec.defaults:  # a policy, not a preset: its files carry its registered name
        assert policy_class.method == name
    fields = {field.name: field for field in dataclasses.fields(policy_class)}
    for option in spec.options:  # an option is a setting of the policy, with the same default
        assert option.name in fields and fields[option.name].default == option.default, option.name
    low, high = policy_class.threshold_range
    assert low < high and isinstance(policy_class.more_skips_with_larger, bool)
    policy = make_policy(name, LAYERS, (low + high) / 2, protect_first=2, protect_last=1)
    assert skiplm.skipper.is_skipper(policy) and policy.input_adaptive
    loaded = policy_from_json(json.loads(json.dumps(policy.to_json())))
    assert type(loaded) is type(policy) and loaded.settings() == policy.settings()
    for key, value in spec.defaults.items():
        assert getattr(loaded, key) == value
    model, ids = cached_tiny_model("llama", num_layers=LAYERS), batch_ids(rows=2, length=12)
    with skiplm.apply(model, policy, check_model=False) as handle:
        model(ids)
    assert handle.stats.tokens["prefill"] == ids.numel()


def test_a_preset_keeps_its_fixed_settings():
    with pytest.raises(PlanError, match="fixes parts='mlp'"):
        make_policy("lac-mlp", LAYERS, 0.3, parts="layer")
    assert make_policy("lac-mlp", LAYERS, 0.3, parts="mlp").parts == "mlp"


def test_unknown_policies_are_refused_with_the_registered_names():
    with pytest.raises(PlanError, match="unknown policy 'nope'; available: ffn-skip, lac, lac-mlp"):
        make_policy("nope", LAYERS, 0.3)
    data = make_policy("lac", LAYERS, 0.3).to_json() | {"method": "nope"}
    with pytest.raises(PlanError, match="policy method 'nope' is unknown; available: ffn-skip, lac"):
        policy_from_json(data)


def test_a_policy_file_written_before_the_registry_still_loads(tmp_path):
    """The file format is unchanged: a file as ``skiplm policy`` wrote it before policies were registered."""
    data = {"format": "skiplm.policy", "schema_version": 1, "method": "lac", "num_layers": LAYERS,
            "description": "lac (...)", "settings": {"thresholds": {"prefill": 0.25, "decode": 0.25},
                                                    "protect_first": 2, "protect_last": 1, "warmup": 4,
                                                    "last_check": 4, "parts": "mlp"},
            "model": None, "provenance": {"method": "lac", "target_skip_ratio": 0.2}}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    policy = skiplm.load_skipper(path)
    assert isinstance(policy, LAC) and policy.parts == "mlp" and policy.last_check == 4
    assert policy.to_json()["settings"] == data["settings"]


# -- a third party's policy --------------------------------------------------------------------------------------------
def test_a_policy_registered_elsewhere_calibrates_saves_loads_and_applies(mean_gate, tmp_path):
    model = cached_tiny_model("llama", num_layers=LAYERS)
    batches = [batch_ids(seed=s) for s in range(2)]
    policy = calibrate(model, "mean-gate", batches, 0.3, protect_first=2, protect_last=1, scale=4.0)
    assert isinstance(policy, MeanGate) and policy.scale == 4.0
    assert policy.provenance["method"] == "mean-gate"
    measured = measure_skip_ratio(model, policy, batches)
    assert measured == pytest.approx(policy.provenance["calibrated_skip_ratio"])
    assert abs(measured - 0.3) < 0.1

    loaded = skiplm.load_skipper(policy.save(tmp_path / "gate.json"))
    assert isinstance(loaded, MeanGate) and loaded.settings() == policy.settings() and loaded.model == policy.model
    ids = batch_ids(rows=1, length=10)
    with skiplm.apply(model, loaded) as handle:
        skipped = model(ids).logits
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert handle.stats.mlp_skip_ratio("prefill") > 0 and generated.shape[1] == ids.shape[1] + 4
    with apply_policy(model, make_policy("mean-gate", LAYERS, 1.0, protect_first=2, protect_last=1),
                      check_model=False) as handle:  # a threshold no sigmoid passes: the full model
        assert torch.equal(model(ids).logits, cached_tiny_model("llama", num_layers=LAYERS)(ids).logits)
    assert handle.stats.mlp_skip_ratio("prefill") == 0.0
    assert not torch.equal(skipped, model(ids).logits)


def test_the_policy_command_takes_any_registered_policy_and_its_options(mean_gate, tiny_folder, tmp_path):
    out = tmp_path / "gate.json"
    result = run_cli("policy", tiny_folder, "--method", "mean-gate", "--option", "scale=3", "--skip-ratio", "0.2",
                     "--protect-first", 1, "--protect-last", 1, "--sequences", 1, "--length", 32, "-o", out)
    assert result.exception is None, result.output
    policy = skiplm.load_skipper(out)
    assert isinstance(policy, MeanGate) and policy.scale == 3.0 and policy.provenance["sequences"] == 1

    result = run_cli("policy", tiny_folder, "--method", "lac-mlp", "--skip-ratio", "0.2", "--protect-first", 1,
                     "--protect-last", 1, "--sequences", 1, "--length", 32, "-o", tmp_path / "lac-mlp.json")
    assert result.exception is None, result.output
    policy = skiplm.load_skipper(tmp_path / "lac-mlp.json")
    assert isinstance(policy, LAC) and policy.parts == "mlp" and policy.provenance["length"] == 32


@pytest.mark.parametrize("args,message", [
    (("--method", "lac", "--window", 3), "--window is not an option of the 'lac' policy"),
    (("--method", "lac-mlp", "--parts", "layer"), "lac-mlp fixes parts='mlp'"),
    (("--method", "ffn-skip", "--option", "speed=3"), "no option 'speed'"),
    (("--method", "ffn-skip", "--option", "window=many"), "takes a int"),
])
def test_the_policy_command_refuses_options_the_policy_does_not_have(tiny_folder, tmp_path, args, message):
    result = run_cli("policy", tiny_folder, *args, "--skip-ratio", "0.2", "-o", tmp_path / "x.json")
    assert isinstance(result.exception, skiplm.SkipLMError) and message in str(result.exception), result.output
