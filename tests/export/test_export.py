"""Exported checkpoints load in vanilla transformers and compute what the planned model computes."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import skiplm
from skiplm.export.pruned import PLAN_FILENAME, export_pruned

from conftest import FAMILIES, NUM_LAYERS, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_block_export_reloads_with_vanilla_transformers(family, tmp_path):
    model = tiny_model(family)
    plan = skiplm.SkipPlan.from_layers(NUM_LAYERS, blocks=[1, 3]).for_model(model)
    export_pruned(model, plan, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == NUM_LAYERS - 2
    layer_types = getattr(reloaded.config, "layer_types", None)
    if layer_types is not None:
        assert len(layer_types) == NUM_LAYERS - 2
        assert layer_types == [model.config.layer_types[i] for i in (0, 2, 4)]
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        with skiplm.apply(model, plan):
            planned = model(ids).logits
            planned_generation = model.generate(ids, max_new_tokens=8, do_sample=False)
        assert torch.allclose(reloaded(ids).logits, planned, atol=1e-5)
        assert torch.equal(reloaded.generate(ids, max_new_tokens=8, do_sample=False), planned_generation)
        assert not torch.allclose(model(ids).logits, planned, atol=1e-3)  # the plan changed the model
    record = json.loads((tmp_path / PLAN_FILENAME).read_text())
    assert record["export"]["deleted_blocks"] == [1, 3]


@pytest.mark.parametrize("family", ["llama", "gemma2", "olmo2", "phi3"])
def test_sublayer_export_zeroes_branches_and_matches(family, tmp_path):
    model = tiny_model(family)
    plan = skiplm.SkipPlan.from_layers(NUM_LAYERS, blocks=[2], attention=[1], mlp=[3]).for_model(model)
    with pytest.raises(skiplm.PlanError, match="zero_sublayers"):
        export_pruned(model, plan, tmp_path / "refused")
    export_pruned(model, plan, tmp_path / "zeroed", zero_sublayers=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "zeroed").eval()
    ids = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        with skiplm.apply(model, plan):
            planned = model(ids).logits
        assert torch.allclose(reloaded(ids).logits, planned, atol=1e-5)
    assert all(float(p.detach().abs().sum()) > 0 for p in model.parameters() if p.dim() > 1)  # the original is untouched


def test_export_refuses_phase_dependent_plans(tmp_path):
    model = tiny_model("llama")
    plan = skiplm.SkipPlan.from_layers(NUM_LAYERS, blocks=[2], prefill="full").for_model(model)
    with pytest.raises(skiplm.PlanError, match="same sublayers in prefill and decode"):
        export_pruned(model, plan, tmp_path)


# -- export --heal: the healed weights in a vanilla checkpoint -----------------------------------------------------
def test_export_heal_gives_the_healed_logits_in_vanilla_transformers(tiny_folder, tiny_heal, tmp_path):
    from skiplm.heal import load_healed
    from skiplm.models.loading import load_model

    from conftest import run_cli

    model, _ = load_model(str(tiny_folder))
    healed = load_healed(tiny_heal.folder)
    result = run_cli("export", tiny_folder, "--heal", tiny_heal.folder, "-o", tmp_path / "out")
    assert result.exception is None, result.output
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert exported.config.num_hidden_layers == 3
    record = json.loads((tmp_path / "out" / PLAN_FILENAME).read_text())
    assert record["provenance"]["healed"]["method"] == "bridge"
    ids = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        with skiplm.apply(model, healed):
            expected = model(ids).logits
        torch.testing.assert_close(exported(ids).logits, expected, rtol=1e-4, atol=1e-4)
        with skiplm.apply(model, healed.plan):  # healed, not only pruned
            assert not torch.allclose(exported(ids).logits, model(ids).logits, atol=1e-4)
