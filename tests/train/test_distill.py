"""Distillation (skiplm.train.distill) and the trained healing methods (lora, partial, bridge+lora): training lowers
the student's KL to the teacher; the teacher stays the vanilla model, bit for bit, even where a trained layer is also
a bridge's fold; an interrupted run resumed gives the same weights as an uninterrupted one; the heal folder round
trips, merges and exports to vanilla transformers with the healed logits; clear refusals."""

from __future__ import annotations

import json
import os
import signal

import click
import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel

import skiplm
from skiplm import SkipPlan
from skiplm.heal import HealError, cut_layers, export_healed, heal, kept_linears, load_healed, methods
from skiplm.heal.artifact import ADAPTER_FOLDER, ADAPTER_WEIGHTS, peft_quietly
from skiplm.train.distill import Sequences, Student, TrainError, TrainingInterrupted, TrainSettings, distill

from conftest import VOCAB, run_cli, tiny_model

LAYERS = 6
FAST = dict(steps=8, eval_every=4, learning_rate=3e-3, bf16="off", batch_size=4)


def data(sequences=40, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (sequences, length), generator=g)


IDS = data(2, 24, seed=7)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_layers=LAYERS)


@pytest.fixture(scope="module")
def vanilla(model):
    with torch.no_grad():
        return model(IDS).logits


def plan(model, blocks=(2, 3)):
    return SkipPlan.from_layers(LAYERS, blocks=list(blocks)).for_model(model)


def logits(model, skipper=None):
    with torch.no_grad():
        if skipper is None:
            return model(IDS).logits
        with skiplm.apply(model, skipper):
            return model(IDS).logits


@pytest.mark.parametrize("method", ["lora", "partial", "bridge+lora", "bridge+partial"])
def test_training_lowers_the_kl_and_leaves_the_model_unchanged(model, vanilla, method):
    healed = heal(model, plan(model), method, calibration=data(), **FAST)
    record = healed.provenance[methods(method)[-1]]["training"]
    first, best = record["evaluations"][0], record["held_out"]
    assert best["kl"] < first["kl"] * 0.97, record["evaluations"]
    assert best["acceptance"] > first["acceptance"]
    assert record["steps"] == 8 and record["tokens"] == 8 * 4 * 32
    assert [s.method for s in healed.steps] == methods(method)
    assert torch.equal(logits(model), vanilla)  # training left nothing behind
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    unhealed = logits(model, plan(model))
    with skiplm.apply(model, healed) as handle:
        assert not torch.allclose(model(IDS).logits, unhealed)  # the heal does something
        with handle.disabled(), torch.no_grad():
            assert torch.equal(model(IDS).logits, vanilla)  # the teacher is the untouched model
    assert torch.equal(logits(model), vanilla)


def test_the_teacher_stays_vanilla_where_a_trained_layer_is_also_a_bridge_fold(model, vanilla):
    # spans [1] and [3]: the bridge of span [3] folds into layer 2's down projection, and partial trains layer 2
    p = plan(model, blocks=(1, 3))
    assert cut_layers(p, 1) == [2, 4]
    bridged = heal(model, p, "bridge", calibration=[data(4, 32)[i:i + 1] for i in range(4)])
    names = [n for n, _ in model.named_parameters() if n.startswith(("model.layers.2.", "model.layers.4."))]
    student = Student(model, bridged, layers=names)
    try:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in names:
                params[name].add_(0.01)  # "training" moved the trained weights
        moved = {name: params[name].detach().clone() for name in names}
        with student.teacher(), torch.no_grad():
            assert torch.equal(model(IDS).logits, vanilla)
        assert all(torch.equal(params[name], moved[name]) for name in names)  # the trained values came back
    finally:
        student.remove()
    assert torch.equal(logits(model), vanilla)


def test_an_interrupted_run_resumed_gives_the_same_weights(model, tmp_path):
    settings = TrainSettings(steps=10, batch_size=4, eval_every=4, learning_rate=3e-3, patience=0, bf16=False)
    config = lambda: LoraConfig(r=4, lora_alpha=8, target_modules=kept_linears(model, plan(model), "all"))  # noqa: E731
    train, held = data(24), data(6, seed=1)
    whole = distill(model, plan(model), train, held, adapter=config(), settings=settings, run_dir=tmp_path / "a")

    def ctrl_c(step, total, info):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="resume"):
        distill(model, plan(model), train, held, adapter=config(), settings=settings, run_dir=tmp_path / "b",
                progress=ctrl_c)
    assert any(p.name.startswith("checkpoint-") for p in (tmp_path / "b").iterdir())
    resumed = distill(model, plan(model), train, held, adapter=config(), settings=settings, run_dir=tmp_path / "b",
                      resume=True)
    assert resumed.record["steps"] == 10
    assert set(whole.step.state) == set(resumed.step.state)
    assert all(torch.equal(whole.step.state[k], resumed.step.state[k]) for k in whole.step.state)
    assert resumed.record["evaluations"] == whole.record["evaluations"]  # the record continues the interrupted one
    assert resumed.record["losses"] == whole.record["losses"] and resumed.record["tokens"] == whole.record["tokens"]
    # the run folder belongs to that run: another run is refused, and so is a fresh start over it
    with pytest.raises(TrainError, match="different run"):
        distill(model, plan(model), train, held, adapter=config(), settings=TrainSettings(steps=3, bf16=False),
                run_dir=tmp_path / "b", resume=True)
    with pytest.raises(TrainError, match="already holds a training run"):
        distill(model, plan(model), train, held, adapter=config(), settings=settings, run_dir=tmp_path / "b")
    with pytest.raises(TrainError, match="no run to resume"):
        distill(model, plan(model), train, held, adapter=config(), settings=settings, run_dir=tmp_path / "c",
                resume=True)


def test_the_same_seed_repeats_a_run(model):
    first = heal(model, plan(model), "lora", calibration=data(), **{**FAST, "steps": 3})
    again = heal(model, plan(model), "lora", calibration=data(), **{**FAST, "steps": 3})
    state, other = first.step("lora").state, again.step("lora").state
    assert all(torch.equal(state[k], other[k]) for k in state)


@pytest.mark.parametrize("method", ["lora", "bridge+lora", "partial"])
def test_heal_folder_round_trip_merge_and_vanilla_export(model, vanilla, method, tmp_path):
    healed = heal(model, plan(model), method, calibration=data(), **FAST)
    expected = logits(model, healed)
    folder = healed.save(tmp_path / "heal")
    loaded = load_healed(folder)
    assert loaded.method == method
    assert torch.equal(logits(model, loaded), expected)
    if "lora" in method:  # peft's own format: the adapter folder loads with peft alone
        record = json.loads((folder / "heal.json").read_text())
        assert record["steps"][-1]["method"] == "lora"
        fresh = tiny_model("llama", num_layers=LAYERS)
        for step in loaded.steps[:-1]:
            with torch.no_grad():
                for param, value in step.weights(fresh, loaded.plan):
                    param.copy_(value)
        with peft_quietly():
            peft_model = PeftModel.from_pretrained(fresh, str(folder / ADAPTER_FOLDER))
        with skiplm.apply(fresh, loaded.plan, check_model=False), torch.no_grad():
            torch.testing.assert_close(peft_model(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    with skiplm.apply(model, loaded, merge="restorable") as handle, torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)
        assert handle.peft_model is None  # no adapter modules: the plan's own architecture
        with pytest.raises(HealError, match="merged"), handle.disabled():
            pass
    assert torch.equal(logits(model), vanilla)  # restorable: the original weights came back
    if "lora" in method:  # bench measures the adapter's overhead and the merged speed, in the same run
        from skiplm.measure.speed import make_configs

        names = [c.name for c in make_configs(model, {"h": loaded}, compare_pruned=False)]
        assert names == ["full", "h", "h, merged"]
    merged_model = tiny_model("llama", num_layers=LAYERS)
    with skiplm.apply(merged_model, loaded, merge=True), torch.no_grad():
        torch.testing.assert_close(merged_model(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    out = export_healed(model, loaded, tmp_path / "export")
    assert torch.equal(logits(model), vanilla)
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert exported.config.num_hidden_layers == LAYERS - 2
    with torch.no_grad():
        torch.testing.assert_close(exported(IDS).logits, expected, rtol=1e-4, atol=1e-4)


def test_a_damaged_adapter_or_a_foreign_model_is_refused(model, tmp_path):
    healed = heal(model, plan(model), "lora", calibration=data(), **{**FAST, "steps": 2})
    folder = healed.save(tmp_path / "heal")
    weights = folder / ADAPTER_FOLDER / ADAPTER_WEIGHTS
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(HealError, match="truncated"):
        load_healed(folder)
    weights.unlink()
    with pytest.raises(HealError, match="missing"):
        load_healed(folder)
    weights.write_bytes(good)
    other = tiny_model("llama", num_layers=LAYERS, seed=5)
    with pytest.raises(skiplm.PlanMismatchError):
        skiplm.apply(other, load_healed(folder))
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2)
    wider = transformers.LlamaForCausalLM(config).eval()
    with pytest.raises(HealError, match="does not fit this model"):
        skiplm.apply(wider, load_healed(folder), check_model=False)
    assert not hasattr(wider, "peft_config")


def test_bad_requests_are_refused_clearly(model):
    with pytest.raises(HealError, match="skips nothing"):
        heal(model, SkipPlan.from_layers(LAYERS).for_model(model), "lora", calibration=data(), **FAST)
    with pytest.raises(HealError, match="more than held_out"):
        heal(model, plan(model), "lora", calibration=data(8), held_out=8, **FAST)
    with pytest.raises(HealError, match="at most one trained method, last"):
        methods("lora+bridge")
    with pytest.raises(skiplm.errors.SkipLMError, match="no option 'ridge'"):
        heal(model, plan(model), "lora", calibration=data(), ridge=0.1)
    with pytest.raises(HealError, match="block"):
        heal(model, SkipPlan.from_layers(LAYERS, mlp=[2]).for_model(model), "partial", calibration=data(), **FAST)
    with pytest.raises(TrainError, match="batch_size"):
        TrainSettings(batch_size=0)
    with pytest.raises(TrainError, match="tokens >= 2"):
        Sequences(torch.zeros(3, 1, dtype=torch.long))


def test_a_time_bound_stops_the_run(model):
    healed = heal(model, plan(model), "lora", calibration=data(), **{**FAST, "steps": 500, "minutes": 0.001})
    record = healed.provenance["lora"]["training"]
    assert record["stopped"] == "time bound" and record["steps"] < 500


def test_the_heal_command_trains_on_self_generated_text_and_resumes(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPLM_CACHE_DIR", str(tmp_path / "cache"))
    plan_file = tmp_path / "plan.json"
    assert run_cli("plan", tiny_folder, "--method", "uniform", "--skip", "1", "-o", plan_file).exit_code == 0
    out = tmp_path / "healed"
    args = ("heal", tiny_folder, "--plan", plan_file, "--method", "bridge+lora", "-o", out, "--sequences", "12",
            "--length", "120", "--option", "steps=4", "--option", "eval_every=2", "--option", "held_out=4",
            "--option", "bf16=off", "--eval-corpus", "pydoc", "--eval-tokens", "64")
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "the model generated itself" in result.output and "trained 4 steps" in result.output
    assert "held-out perplexity, pydoc" in result.output
    healed = load_healed(out)
    assert [s.method for s in healed.steps] == ["bridge", "lora"]
    assert healed.provenance["lora"]["training"]["data"]["sequences"] == 8  # 12 generated, 4 held out
    assert not (tmp_path / "healed.run").exists()  # the run folder goes once the heal folder is written
    # an interrupted run's folder is kept: the same command without --resume refuses to start over it
    (tmp_path / "again.run").mkdir()
    result = run_cli(*args[:-4], "-o", tmp_path / "again")
    assert isinstance(result.exception, click.UsageError) and "--resume" in str(result.exception)
    result = run_cli("heal", tiny_folder, "--plan", plan_file, "-o", tmp_path / "b", "--resume")
    assert isinstance(result.exception, click.UsageError) and "bridge has none" in str(result.exception)
    result = run_cli("heal", tiny_folder, "--plan", plan_file, "--method", "lora+bridge", "-o", tmp_path / "c")
    assert isinstance(result.exception, click.UsageError) and "at most one trained method" in str(result.exception)


def test_early_stop_keeps_the_best_evaluation(model):
    # a learning rate too small to move the KL by 0.5%: after `patience` evaluations without improvement it stops
    healed = heal(model, plan(model), "lora", calibration=data(),
                  **{**FAST, "steps": 40, "eval_every": 2, "learning_rate": 1e-9, "patience": 2})
    record = healed.provenance["lora"]["training"]
    assert record["stopped"] == "early stop" and record["steps"] == 4
    assert record["best_step"] == 0 and record["held_out"]["kl"] == record["evaluations"][0]["kl"]


def test_a_bridge_fits_on_padded_training_data_without_its_padding(model):
    ids = data(6, 32)
    attention = torch.ones_like(ids, dtype=torch.bool)
    attention[:, 20:] = False  # rows padded after 20 tokens: the pad ids must not enter the fit
    padded = Sequences(ids.masked_fill(~attention, 0), attention_mask=attention)
    trimmed = [ids[i:i + 1, :20] for i in range(6)]
    a = heal(model, plan(model), "bridge", calibration=padded)
    b = heal(model, plan(model), "bridge", calibration=trimmed)
    assert all(torch.equal(a.maps[k], b.maps[k]) for k in b.maps)


def test_planners_calibrate_on_self_generated_text(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPLM_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "plan.json"
    result = run_cli("plan", tiny_folder, "--method", "block-influence", "--skip", "1", "--corpus", "self",
                     "--sequences", "2", "--length", "32", "-o", out)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["provenance"]["calibration"]["source"] == "self"
    assert any((tmp_path / "cache" / "self-generated").iterdir())  # generated once, cached for heal to reuse
    result = run_cli("eval", tiny_folder, "--corpus", "self", "--tokens", "32", "-o", tmp_path / "eval")
    assert "not held-out text" in str(result.exception)
