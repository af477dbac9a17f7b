"""The CLI end to end — plan, eval, bench, generate, compare — and its errors, on a tiny model saved with the real tokenizer."""

import json

import pytest

import skiplm
from skiplm.models.data import load_corpus
from skiplm.errors import DataError

from conftest import run_cli


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
    assert isinstance(result.exception, skiplm.PlanError) and "unknown planner " in str(result.exception)

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
    # the second held-out corpus: GSM8K after the calibration tokens (in-domain), scored for every point
    second = "gsm8k (after the 32 calibration tokens)"
    assert data["settings"]["eval_corpora"] == ["pydoc", second]
    assert data["full_perplexities"]["pydoc"] == data["full_perplexity"]
    for point in points.values():
        if point["error"] is None:
            assert point["perplexities"]["pydoc"] == point["perplexity"] and point["perplexities"][second] > 0
    assert "## Held-out perplexity on every corpus" in (tmp_path / "compare.md").read_text()
