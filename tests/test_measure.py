"""Perplexity, the speed benchmark, physical pruning, corpora, and the CLI — on tiny models."""

import json
import math

import pytest
import torch

import skiplm
from skiplm.measure.speed import BenchSettings, make_configs, run_bench
from skiplm.measure.costs import CostModel
from skiplm.models.data import load_corpus, gsm8k_questions
from skiplm.errors import DataError
from skiplm.measure.perplexity import compare_perplexity, perplexity, tokenize_corpus, windows
from skiplm.export.prune import prune_blocks

from conftest import run_cli, tiny_model


@pytest.mark.parametrize("total,context,stride", [(10, 4, 2), (10, 4, 3), (3, 8, 4), (100, 16, 5), (17, 16, 15)])
def test_windows_score_every_token_once_with_enough_context(total, context, stride):
    scored = []
    for start, end, first in windows(total, context, stride):
        assert end - start <= context
        assert start < first <= end
        if start > 0:
            assert first - start >= context - stride  # every scored token sees at least this much context
        scored.extend(range(first, end))
    assert scored == list(range(1, total))


@pytest.mark.parametrize("stride", [0, 16, 20])
def test_windows_refuse_a_stride_without_overlap(stride):
    with pytest.raises(DataError, match="stride must be"):
        windows(100, 16, stride)


def test_perplexity_equals_direct_cross_entropy_when_one_window_fits():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(1))
    result = perplexity(model, ids, context=64, stride=32)
    with torch.inference_mode():
        logits = model(ids[None]).logits[0]
    direct = torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).item()
    assert result.tokens_scored == 39
    assert math.isclose(result.mean_nll, direct, rel_tol=1e-5)
    assert math.isclose(result.perplexity, math.exp(direct), rel_tol=1e-5)


def test_compare_perplexity_uses_the_decode_skip_set_for_every_token():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (60,), generator=torch.Generator().manual_seed(2))
    plan = skiplm.SkipPlan.from_layers(5, blocks=[2], prefill="full").for_model(model)
    same = skiplm.SkipPlan.from_layers(5, blocks=[2]).for_model(model)
    results = compare_perplexity(model, ids, {"full": None, "plan": plan, "same": same}, context=32, stride=16)
    assert results["full"].perplexity == perplexity(model, ids, context=32, stride=16).perplexity
    assert results["plan"].perplexity == results["same"].perplexity
    assert results["plan"].perplexity != results["full"].perplexity


def test_bootstrap_interval_brackets_the_median():
    from skiplm.measure.speed import bootstrap_median_ci

    values = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6]
    low, high = bootstrap_median_ci(values)
    assert 1.0 <= low <= 1.3 <= high <= 1.6 and low < high
    assert bootstrap_median_ci(values) == (low, high)  # seeded
    assert bootstrap_median_ci([2.0] * 5) == (2.0, 2.0)


def test_corpora_ship_with_packages(tmp_path):
    assert len(gsm8k_questions()) == 1319
    assert "Question:" in load_corpus("gsm8k")[:100]
    assert len(load_corpus("pydoc")) > 100_000
    text_file = tmp_path / "notes.txt"
    text_file.write_text("some words to score")
    assert load_corpus(str(text_file)) == "some words to score"
    with pytest.raises(DataError, match="neither a shipped corpus"):
        load_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        load_corpus(str(tmp_path / "empty.txt"))


def test_tokenize_corpus_refuses_empty_text():
    model, tokenizer = None, _FakeTokenizer()
    with pytest.raises(DataError, match="empty"):
        tokenize_corpus(tokenizer, "   ", 10)


class _FakeTokenizer:
    def __call__(self, text, **kwargs):  # pragma: no cover - never reached for empty text
        raise AssertionError("should refuse before tokenizing")


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "olmo2"])
def test_pruned_copy_equals_planned_model(family):
    model = tiny_model(family)
    plan = skiplm.SkipPlan.from_layers(5, blocks=[1, 3]).for_model(model)
    pruned = prune_blocks(model, plan.decode.blocks)
    ids = torch.randint(3, 128, (2, 14), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        with skiplm.apply(model, plan):
            planned = model(ids).logits
            planned_generation = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert pruned.config.num_hidden_layers == 3
        assert torch.allclose(pruned(ids).logits, planned, atol=1e-5)
        assert torch.equal(pruned.generate(ids, max_new_tokens=6, do_sample=False), planned_generation)
    shared = prune_blocks(model, [1], share_weights=True)
    assert shared.model.embed_tokens.weight is model.model.embed_tokens.weight
    assert len(model.model.layers) == 5  # the original is untouched


def test_bench_measures_every_config_and_reports_ratios():
    model = tiny_model("llama")
    block_plan = skiplm.SkipPlan.from_layers(5, blocks=[1, 3]).for_model(model)
    sublayer_plan = skiplm.SkipPlan.from_layers(5, attention=[2]).for_model(model)
    configs = make_configs(model, {"blocks": block_plan, "attn": sublayer_plan}, compare_pruned=True)
    assert [c.name for c in configs] == ["full", "blocks", "blocks (layers deleted)", "attn"]
    settings = BenchSettings(batch_sizes=(1, 2), prompt_tokens=8, decode_prompt_tokens=4, new_tokens=3, repeats=2, warmup=1)
    seen = []
    result = run_bench(configs, torch.arange(3, 100), settings, progress=seen.append)
    assert len(seen) == (settings.warmup + settings.repeats) * len(configs) * 4
    costs = CostModel.from_parameter_counts(model)
    for name in ["full", "blocks", "blocks (layers deleted)", "attn"]:
        for measure in ["prefill_b1", "decode_b1", "prefill_b2", "decode_b2"]:
            r = result[name][measure]
            assert len(r["samples_s"]) == 2 and all(s > 0 for s in r["samples_s"])
            assert r["median_s"] > 0 and r["tokens_per_s"] > 0
    assert result["full"]["decode_b1"]["speedup"] == 1.0
    low, high = result["blocks"]["decode_b1"]["speedup_ci95"]
    assert low <= result["blocks"]["decode_b1"]["speedup"] <= high
    assert result["blocks"]["decode_b1"]["ideal_speedup"] == pytest.approx(costs.ideal_speedup(block_plan.decode))
    assert result["blocks"]["decode_b1"]["ideal_speedup"] > result["attn"]["decode_b1"]["ideal_speedup"] > 1.0
    assert getattr(model, "_skiplm_handle", None) is None  # no plan left applied


# -- the CLI, on a tiny model saved with the real tokenizer ---------------------------------------------------------



def test_cli_plan_eval_bench_generate(tiny_folder, tmp_path):
    plan_file = tmp_path / "plan.json"
    result = run_cli("plan", tiny_folder, "--skip", 1, "-o", plan_file)
    assert result.exception is None, result.output
    plan = skiplm.SkipPlan.load(plan_file)
    assert plan.decode.blocks == [2] and plan.provenance["method"] == "uniform"

    corpus = tmp_path / "text.txt"
    corpus.write_text(load_corpus("pydoc")[:5000])
    result = run_cli("eval", tiny_folder, "--plan", plan_file, "--corpus", corpus, "--tokens", 64, "--context", 32,
                     "--stride", 16, "-o", tmp_path / "eval")
    assert result.exception is None, result.output
    data = json.loads((tmp_path / "eval" / "eval.json").read_text())
    scores = data["perplexity"]["text.txt"]
    assert scores["full"]["tokens_scored"] == scores["plan"]["tokens_scored"] == 64
    assert scores["full"]["perplexity"] != scores["plan"]["perplexity"]
    assert "| plan |" in (tmp_path / "eval" / "eval.md").read_text()

    result = run_cli("bench", tiny_folder, "--plan", plan_file, "--batch-sizes", "1,2", "--prompt-tokens", 8,
                     "--decode-prompt-tokens", 4, "--new-tokens", 2, "--repeats", 1, "--warmup", 0,
                     "-o", tmp_path / "bench")
    assert result.exception is None, result.output
    speed = json.loads((tmp_path / "bench" / "bench.json").read_text())["speed"]
    assert set(speed) == {"full", "plan", "plan (layers deleted)"}
    assert (tmp_path / "bench" / "bench.png").stat().st_size > 1000
    assert "decode b2" in (tmp_path / "bench" / "bench.md").read_text()

    result = run_cli("generate", tiny_folder, "--plan", plan_file, "--prompt", "Hello", "--max-new-tokens", 4)
    assert result.exception is None, result.output


def test_cli_bad_input_gets_clear_errors(tiny_folder, tmp_path):
    result = run_cli("generate", tiny_folder, "--prompt", "   ")
    assert isinstance(result.exception, DataError) and "prompt is empty" in str(result.exception)

    other = skiplm.SkipPlan.from_layers(7, blocks=[3])
    other_file = other.save(tmp_path / "other.json")
    result = run_cli("eval", tiny_folder, "--plan", other_file, "--tokens", 16)
    assert isinstance(result.exception, skiplm.PlanMismatchError) and "7 layers" in str(result.exception)

    result = run_cli("plan", tiny_folder, "--method", "nope", "--skip", 1, "-o", tmp_path / "x.json")
    assert isinstance(result.exception, skiplm.PlanError) and "unknown planning method" in str(result.exception)

    result = run_cli("plan", tiny_folder, "--speedup", 50, "-o", tmp_path / "x.json")
    assert isinstance(result.exception, skiplm.PlanError) and "out of reach" in str(result.exception)


def test_main_turns_errors_into_messages_and_exit_code_2(tiny_folder, tmp_path, monkeypatch, capsys):
    from skiplm import cli as cli_module

    monkeypatch.setattr("sys.argv", ["skiplm", "generate", str(tiny_folder), "--prompt", ""])
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main()
    assert exit_info.value.code == 2
    assert "prompt is empty" in capsys.readouterr().err


def test_cli_compare_writes_table_json_and_pareto_plot(tiny_folder, tmp_path):
    result = run_cli("compare", tiny_folder, "--methods", "uniform,block-influence,search", "--targets", "1.005,1.01",
                     "--sequences", 2, "--length", 16, "--tokens", 64, "--context", 32, "--stride", 16,
                     "--repeats", 1, "--new-tokens", 2, "-o", tmp_path)
    assert result.exception is None, result.output
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["settings"]["calibration"] == "gsm8k" and data["settings"]["eval"] == "pydoc"
    points = {(p["method"], p["target"]): p for p in data["points"]}
    # (the tiny model's 49k-token head dwarfs its layers, hence the small targets)
    assert set(points) == {(m, t) for m in ("uniform", "block-influence", "search") for t in (1.005, 1.01)}
    for (method, target), point in points.items():
        if method != "search":
            assert point["error"] is None and point["ideal_speedup"] >= target
        if point["error"] is None:
            assert point["perplexity"] > 0 and point["decode_speedup"] > 0
            assert len(point["decode_speedup_ci95"]) == 2
    assert "| search |" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "pareto.png").stat().st_size > 1000
