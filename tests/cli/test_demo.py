"""`skiplm demo` (the main job) end to end on a tiny model: speculative decoding checked identical to plain greedy,
the plan, its healed row and the uniform comparison measured, the result files and the HTML report written; the
shipped plans belong to the default model."""

import dataclasses
import json

import pytest

import skiplm
from skiplm import demo as demo_module
from skiplm.demo import SHIPPED_TARGETS, DemoSettings, SpeculativeMismatch, run_demo, shipped_plan_path
from skiplm.models.adapters import count_layers

from conftest import run_cli

# what fits a tiny model in seconds (the defaults are sized for the default model)
SMALL = dict(prompts=2, new_tokens=8, heal_steps=2, heal_minutes=1.0, sequences=6, length=128, held_out=2, tokens=64,
             context=32, stride=16, repeats=1, uniform_speedup=1.01)


def _small_settings(monkeypatch):
    """The CLI's DemoSettings, with the small sizes as defaults (what its options do not set)."""

    def settings(**given):
        return DemoSettings(**{**given, **SMALL})

    monkeypatch.setattr(demo_module, "DemoSettings", settings)


def test_demo_end_to_end_on_a_tiny_model(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPLM_CACHE_DIR", str(tmp_path / "cache"))
    _small_settings(monkeypatch)
    model, _ = skiplm.load_model(str(tiny_folder))
    plan_file = skiplm.SkipPlan.from_layers(count_layers(model), blocks=[2]).for_model(model).save(
        tmp_path / "mine.json")
    out = tmp_path / "demo"
    result = run_cli("demo", "--model", tiny_folder, "--plan", plan_file, "--speedup", 1.01, "-o", out)
    assert result.exception is None, result.output

    data = json.loads((out / "demo.json").read_text())
    assert data["kind"] == "demo"
    names = [row["name"] for row in data["rows"]]
    assert names == ["full", "speculative", "mine", "mine (healed)", "uniform-1.01x"]
    spec = data["speculative"]
    assert spec["rows"] == SMALL["prompts"] and spec["identical_rows"] == spec["rows"]  # token for token
    assert spec["speedup"] > 0 and spec["warmup_generations"] == 1 and spec["warmup_seconds"]["plain"] > 0
    rows = {row["name"]: row for row in data["rows"]}
    assert rows["speculative"]["lossless"] and rows["speculative"]["perplexity"] == rows["full"]["perplexity"]
    healed, plain = rows["mine (healed)"], rows["mine"]
    assert set(healed["perplexity"]) == {"pydoc", "gsm8k"} and healed["perplexity"] != plain["perplexity"]
    assert healed["speed"]["kind"] == "decode" and healed["speed"]["speedup"] > 0
    assert data["healing"]["steps"] == SMALL["heal_steps"] and len(data["healing"]["held_out_kl"]) == 2
    assert all(command.startswith("skiplm ") for command, _ in data["next"])

    speed = json.loads((out / "bench.json").read_text())["speed"]
    assert {"full", "mine", "mine (healed)", "mine (healed), merged", "uniform-1.01x"} == set(speed)
    quality = json.loads((out / "eval.json").read_text())["perplexity"]
    assert set(quality["pydoc"]) == {"full", "mine", "mine (healed)", "uniform-1.01x"}
    assert skiplm.heal.load_healed(out / "healed").plan.decode.blocks == [2]
    assert skiplm.SkipPlan.load(out / "plans" / "uniform-1.01x.json").provenance["method"] == "uniform"
    page = (out / "report.html").read_text()
    for section in ("skiplm demo", "Self-speculative decoding vs plain greedy", "Perplexity", "Speed",
                    "What to try next", "data:image/png;base64"):
        assert section in page, section
    summary = (out / "summary.md").read_text()
    assert "| mine (healed) |" in summary and "What to try next" in summary
    assert "what to try next" in result.output and "wall time" in result.output
    assert "identical to plain greedy in 2/2" in result.output


def test_demo_fails_loudly_when_speculative_text_differs(tiny_folder, tmp_path, monkeypatch):
    import skiplm.speculative.bench as bench

    model, tokenizer = skiplm.load_model(str(tiny_folder))
    plan = skiplm.SkipPlan.from_layers(count_layers(model), blocks=[2]).for_model(model)
    real = bench.plain_generate
    monkeypatch.setattr(bench, "plain_generate", lambda *a, **k: [row + [3] for row in real(*a, **k)])
    with pytest.raises(SpeculativeMismatch, match="other text than plain greedy decoding in 2 of 2"):
        run_demo(model, tokenizer, tmp_path / "demo", plan, plan_name="p", settings=DemoSettings(**SMALL),
                 model_name="tiny", cache_dir=tmp_path / "cache")
    assert (tmp_path / "demo" / "speculative.json").is_file()  # what went wrong is kept to look at
    assert not (tmp_path / "demo" / "demo.json").exists()


def test_demo_refuses_a_plan_for_other_weights(tiny_folder, tmp_path):
    result = run_cli("demo", "--model", tiny_folder, "-o", tmp_path / "demo")  # the shipped plan: default model's
    assert isinstance(result.exception, skiplm.errors.PlanError), result.output
    assert not (tmp_path / "demo" / "speculative.json").exists()  # refused before any work


def test_shipped_plans_are_search_plans_of_the_default_model():
    for target in SHIPPED_TARGETS:
        plan = skiplm.SkipPlan.load(shipped_plan_path(target))
        assert plan.provenance["method"] == "search" and plan.provenance["target"] == {"speedup": target}
        assert plan.num_layers == 30 and plan.model.fingerprint == "8756bdccfda3af77"
    with pytest.raises(skiplm.errors.PlanError, match="no shipped plan for 1.4x"):
        shipped_plan_path(1.4)
    assert dataclasses.asdict(DemoSettings())["draft_dtype"] == "int8-dynamic"


def test_the_command_line_defaults_are_the_demo_settings():
    from skiplm.cli.run import demo
    from skiplm.demo import DEFAULT_TARGET

    given = {param.name: param.default for param in demo.params}
    settings = DemoSettings()
    assert float(given["target"]) == DEFAULT_TARGET and given["speedup"] == settings.uniform_speedup
    for name in ("tokens", "repeats", "prompts", "new_tokens", "heal_steps", "heal_minutes"):
        assert given[name] == getattr(settings, name), name


@pytest.mark.slow
def test_shipped_plans_fit_the_default_models_weights():
    model, _ = skiplm.load_model("smollm2-135m")
    for target in SHIPPED_TARGETS:
        skiplm.SkipPlan.load(shipped_plan_path(target)).check_model(model)  # fingerprint and sampled weights
