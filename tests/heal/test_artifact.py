"""The heal folder: round trip (save, load, apply == freshly fitted), refusals (another model, missing or truncated
weights, a newer or foreign record), merge, a vanilla export that gives the healed logits, and the CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import skiplm
from skiplm import PlanMismatchError, SkipPlan
from skiplm.heal import BRIDGE_FILE, HEAL_FILE, HealError, export_healed, fit_bridge, load_healed
from skiplm.skipper import is_skipper

from conftest import VOCAB, run_cli, tiny_model

LAYERS = 6


def tokens(sequences=4, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (1, length), generator=g) for _ in range(sequences)]


IDS = tokens(1, 24, seed=42)[0]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_layers=LAYERS)


@pytest.fixture(scope="module")
def healed(model):
    return fit_bridge(model, SkipPlan.from_layers(LAYERS, blocks=[2, 3, 5]).for_model(model), calibration=tokens())


@torch.inference_mode()
def run(model, skipper=None, **options):
    if skipper is None:
        return model(IDS).logits
    with skiplm.apply(model, skipper, **options):
        return model(IDS).logits


def test_the_folder_loads_back_and_applies_as_the_fresh_fit(model, healed, tmp_path):
    folder = healed.save(tmp_path / "heal")
    assert sorted(p.name for p in folder.iterdir()) == [BRIDGE_FILE, HEAL_FILE]
    record = json.loads((folder / HEAL_FILE).read_text())
    assert record["format"] == "skiplm.heal" and record["schema_version"] == 1 and record["method"] == "bridge"
    assert record["plan"]["model"]["fingerprint"] == healed.plan.model.fingerprint
    step = record["steps"][0]
    assert [s["blocks"] for s in step["spans"]] == [[2, 3], [5]]
    assert {"residual_before", "residual_after", "tokens"} <= set(step["spans"][0])
    assert record["provenance"]["calibration"]["tokens"] == 128 and record["provenance"]["seconds"] >= 0
    loaded = load_healed(folder)
    assert loaded.plan == healed.plan and is_skipper(loaded)
    assert all(torch.equal(loaded.maps[k], healed.maps[k]) for k in healed.maps)
    assert torch.equal(run(model, loaded), run(model, healed))
    assert load_healed(folder / HEAL_FILE).plan == healed.plan  # the record's path works too
    healed.save(folder)  # an earlier heal folder is replaced


def test_a_heal_folder_for_another_model_is_refused(healed, tmp_path):
    loaded = load_healed(healed.save(tmp_path / "heal"))
    other = tiny_model("llama", num_layers=LAYERS, seed=1)
    with pytest.raises(PlanMismatchError, match="heal folder"):
        skiplm.apply(other, loaded)
    with pytest.raises(PlanMismatchError):
        export_healed(other, loaded, tmp_path / "export")
    with pytest.raises(skiplm.PlanError, match="layers"):
        skiplm.apply(tiny_model("llama", num_layers=5), loaded)


def test_damaged_folders_are_refused(healed, tmp_path):
    folder = healed.save(tmp_path / "heal")
    data = (folder / BRIDGE_FILE).read_bytes()
    (folder / BRIDGE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(HealError, match="truncated"):
        load_healed(folder)
    (folder / BRIDGE_FILE).write_bytes(data[:-4] + b"\0\0\0\0")
    with pytest.raises(HealError, match="checksum"):
        load_healed(folder)
    (folder / BRIDGE_FILE).unlink()
    with pytest.raises(HealError, match="missing"):
        load_healed(folder)
    with pytest.raises(HealError, match="not a heal folder"):
        load_healed(tmp_path / "nowhere")


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(schema_version=2), "newer"),
    (lambda r: r.update(format="skiplm.plan"), "not a skiplm heal record"),
    (lambda r: r["steps"].append({"method": "retrofit", "files": {}}), "upgrade skiplm"),
    (lambda r: r["steps"].append({"method": "lora"}), "step without files"),
    (lambda r: r["steps"][0]["files"].update({"../x": {}}), "outside the heal folder"),
    (lambda r: r["steps"][0]["spans"].pop(), "do not match"),
    (lambda r: r.pop("plan"), "malformed"),
])
def test_foreign_newer_or_edited_records_are_refused(healed, tmp_path, edit, message):
    folder = healed.save(tmp_path / "heal")
    record = json.loads((folder / HEAL_FILE).read_text())
    edit(record)
    (folder / HEAL_FILE).write_text(json.dumps(record))
    with pytest.raises(HealError, match=message):
        load_healed(folder)
    (folder / HEAL_FILE).write_text('{"format": "skiplm.he')
    with pytest.raises(HealError, match="not valid JSON"):
        load_healed(folder)


def test_merge_bakes_the_bridge_in_for_good(healed):
    model = tiny_model("llama", num_layers=LAYERS)
    expected = run(model, healed)
    with pytest.raises(HealError, match="merged"), skiplm.apply(model, healed, merge=True) as handle:
        assert torch.equal(model(IDS).logits, expected)
        with handle.disabled():
            pass
    assert not torch.equal(run(model), run(tiny_model("llama", num_layers=LAYERS)))  # the weights stay healed
    assert torch.equal(run(model, healed.plan), expected)
    with pytest.raises(HealError, match="already merged"):
        skiplm.apply(model, healed)
    fresh = tiny_model("llama", num_layers=LAYERS)
    healed.merge(fresh)
    assert torch.equal(run(fresh, healed.plan), expected)


def test_the_export_gives_the_healed_logits_in_vanilla_transformers(model, healed, tmp_path):
    full = run(model)
    expected = run(model, healed)
    out = export_healed(model, healed, tmp_path / "export")
    assert torch.equal(run(model), full)  # the model passed in keeps its weights
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert exported.config.num_hidden_layers == LAYERS - 3
    with torch.inference_mode():
        assert torch.allclose(exported(IDS).logits, expected, atol=1e-5)
    record = json.loads((out / "skiplm_plan.json").read_text())
    assert record["provenance"]["healed"]["method"] == "bridge"


def test_the_heal_command_runs_end_to_end(tiny_folder, tmp_path):
    import skiplm.cli.heal  # noqa: F401  (registers `skiplm heal` until skiplm.cli imports it)

    plan_file = tmp_path / "plan.json"
    result = run_cli("plan", tiny_folder, "--method", "uniform", "--skip", "1", "-o", plan_file)
    assert result.exception is None, result.output
    out = tmp_path / "heal"
    result = run_cli("heal", tiny_folder, "--plan", plan_file, "-o", out, "--sequences", "2", "--length", "48",
                     "--option", "ridge=1e-3", "--eval-corpus", "pydoc", "--eval-corpus", "gsm8k",
                     "--eval-tokens", "64")
    assert result.exception is None, result.output
    assert "held-out perplexity, pydoc" in result.output, result.output
    assert "gsm8k (64 tokens after the 96 tokens healing read)" in result.output, result.output
    healed = load_healed(out)
    assert healed.provenance["options"]["ridge"] == 1e-3 and healed.provenance["calibration"]["tokens"] == 96
    result = run_cli("heal", tiny_folder, "--plan", plan_file, "-o", tmp_path / "other", "--option", "bogus=1")
    assert "no option 'bogus'" in str(result.exception)
