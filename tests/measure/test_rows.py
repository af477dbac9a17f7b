"""Result rows cannot be impersonated: the full model's row is reserved, a plan file named full.json is reported under
its own name next to the real full model, and same-named plan files from different folders stay distinct rows —
through the library and through the CLI."""

import json

import pytest
import torch

import skiplm
from skiplm.errors import DataError
from skiplm.measure.perplexity import compare_perplexity, tokenize_corpus
from skiplm.measure.rows import FULL, check_row_names, plan_names
from skiplm.measure.speed import BenchSettings, Config, make_configs, run_bench
from skiplm.measure.workflows import bench_and_report, evaluate_and_report
from skiplm.models.adapters import count_layers

from conftest import run_cli

TINY_BENCH = BenchSettings(batch_sizes=(1,), prompt_tokens=8, decode_prompt_tokens=4, new_tokens=2, repeats=1,
                           warmup=0)
BENCH_ARGS = ["--batch-sizes", "1", "--prompt-tokens", 8, "--decode-prompt-tokens", 4, "--new-tokens", 2,
              "--repeats", 1, "--warmup", 0]
EVAL_ARGS = ["--corpus", "pydoc", "--tokens", 48, "--context", 32, "--stride", 16]


def _touch(root, *names):
    paths = []
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
        paths.append(path)
    return paths


def test_plan_names_are_file_stems_where_unique(tmp_path):
    a, b = _touch(tmp_path, "one.json", "sub/two.json")
    assert plan_names([a, b]) == {"one": a, "two": b}


def test_same_named_plans_get_the_shortest_distinguishing_suffix(tmp_path):
    a, b, c = _touch(tmp_path, "a/plan.json", "b/plan.json", "x/a/plan.json")
    assert list(plan_names([a, b])) == ["a/plan", "b/plan"]
    names = list(plan_names([a, b, c]))
    assert names[1:] == ["b/plan", "x/a/plan"] and names[0].endswith("/a/plan") and len(set(names)) == 3


def test_a_plan_file_named_full_never_takes_the_full_models_name(tmp_path):
    full, other, bare = _touch(tmp_path, "full.json", "x/full.json", "y/full")
    assert list(plan_names([full])) == ["full.json"]
    assert FULL not in plan_names([full, other]) and len(plan_names([full, other])) == 2
    assert list(plan_names([bare])) == ["y/full"]
    assert list(plan_names([full], reserved=())) == ["full"]  # agree refuses it by that name


def test_the_same_plan_file_twice_is_refused(tmp_path):
    (plan,) = _touch(tmp_path, "p.json")
    with pytest.raises(DataError, match="given twice"):
        plan_names([plan, tmp_path / "." / "p.json"])


def test_row_names_reserve_the_full_model_and_derived_rows():
    check_row_names(["a", "b"])
    check_row_names([FULL, "a"], full_included=True)
    with pytest.raises(DataError, match="full model's row"):
        check_row_names([FULL])
    with pytest.raises(DataError, match="layers deleted"):
        check_row_names(["a", "a (layers deleted)"])


@pytest.fixture(scope="module")
def loaded(tiny_folder):
    model, tokenizer = skiplm.load_model(str(tiny_folder))
    layers = count_layers(model)
    plans = [skiplm.SkipPlan.from_layers(layers, blocks=[block]).for_model(model) for block in (1, 2)]
    return model, tokenizer, plans


def test_eval_keeps_the_full_model_row_and_refuses_a_plan_in_its_place(loaded, tmp_path):
    model, tokenizer, (one, two) = loaded
    with pytest.raises(DataError, match="full model's row"):
        evaluate_and_report(model, tokenizer, {FULL: one}, ["pydoc"], 48, 32, 16, tmp_path, "tiny", "cpu")
    with pytest.raises(DataError, match="full model"):
        evaluate_and_report(model, tokenizer, {"baseline": None}, ["pydoc"], 48, 32, 16, tmp_path, "tiny", "cpu")
    assert not (tmp_path / "eval.json").exists()
    ids = tokenize_corpus(tokenizer, "hello world " * 40, 40)
    with pytest.raises(DataError, match="full model's row"):
        compare_perplexity(model, ids, {FULL: one}, context=16, stride=8)

    result = evaluate_and_report(model, tokenizer, {"full.json": one, "a/plan": one, "b/plan": two}, ["pydoc"], 48,
                                 32, 16, tmp_path, "tiny", "cpu")
    scores = result["perplexity"]["pydoc"]
    assert list(result["plans"]) == [FULL, "full.json", "a/plan", "b/plan"] and result["plans"][FULL] is None
    alone = evaluate_and_report(model, tokenizer, {}, ["pydoc"], 48, 32, 16, tmp_path / "alone", "tiny", "cpu")
    assert scores[FULL] == alone["perplexity"]["pydoc"][FULL]  # the real full model, not the plan
    assert scores["full.json"] == scores["a/plan"] != scores[FULL] and scores["b/plan"] != scores["a/plan"]


def test_bench_rows_are_keyed_so_nothing_replaces_another(loaded, tmp_path):
    model, tokenizer, (one, two) = loaded
    with pytest.raises(DataError, match="full model's row"):
        bench_and_report(model, tokenizer, {FULL: one}, TINY_BENCH, False, tmp_path, "tiny", "cpu")
    with pytest.raises(DataError, match="layers deleted"):
        make_configs(model, {"a": one, "a (layers deleted)": two}, compare_pruned=True)
    with pytest.raises(DataError, match="distinctly named"):
        run_bench([Config(FULL, model), Config("p", model, one), Config("p", model, two)], torch.arange(3, 100), TINY_BENCH)
    result = bench_and_report(model, tokenizer, {"full.json": one, "a/plan": one, "b/plan": two}, TINY_BENCH, True,
                              tmp_path, "tiny", "cpu")
    assert list(result["speed"]) == [FULL, "full.json", "full.json (layers deleted)", "a/plan",
                                     "a/plan (layers deleted)", "b/plan", "b/plan (layers deleted)"]
    assert result["speed"][FULL]["decode_b1"]["ideal_speedup"] == 1.0
    assert result["speed"]["full.json"]["decode_b1"]["ideal_speedup"] > 1.0


def _save_plans(tiny_folder, root):
    model, _ = skiplm.load_model(str(tiny_folder))
    layers = count_layers(model)
    paths = {}
    for name, block in (("full.json", 1), ("a/plan.json", 1), ("b/plan.json", 2)):
        paths[name] = skiplm.SkipPlan.from_layers(layers, blocks=[block]).for_model(model).save(root / name)
    return paths


def test_cli_eval_and_bench_report_full_json_and_same_named_plans_as_their_own_rows(tiny_folder, tmp_path):
    paths = _save_plans(tiny_folder, tmp_path)
    plan_args = [arg for path in paths.values() for arg in ("--plan", path)]
    result = run_cli("eval", tiny_folder, *plan_args, *EVAL_ARGS, "-o", tmp_path / "eval")
    assert result.exception is None, result.output
    scores = json.loads((tmp_path / "eval" / "eval.json").read_text())["perplexity"]["pydoc"]
    assert list(scores) == [FULL, "full.json", "a/plan", "b/plan"]
    result = run_cli("eval", tiny_folder, *EVAL_ARGS, "-o", tmp_path / "eval-full")
    assert result.exception is None, result.output
    alone = json.loads((tmp_path / "eval-full" / "eval.json").read_text())["perplexity"]["pydoc"]
    assert scores[FULL] == alone[FULL] and scores["full.json"] != scores[FULL]

    result = run_cli("bench", tiny_folder, *plan_args, *BENCH_ARGS, "--no-compare-pruned", "-o", tmp_path / "bench")
    assert result.exception is None, result.output
    speed = json.loads((tmp_path / "bench" / "bench.json").read_text())["speed"]
    assert list(speed) == [FULL, "full.json", "a/plan", "b/plan"]
    assert speed[FULL]["decode_b1"]["ideal_speedup"] == 1.0


def test_folders_are_named_whole_even_with_dots_in_their_names(tmp_path):
    # heal folders such as `plan-1.1-bridge` have no extension: their stems would all be `plan-1`
    a, b = tmp_path / "plan-1.1-bridge", tmp_path / "plan-1.1-lora"
    assert plan_names([a, b], folders=True) == {"plan-1.1-bridge": a, "plan-1.1-lora": b}
