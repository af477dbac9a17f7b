"""The lm-evaluation-harness bridge: model type ``skiplm`` on a small local task, offline, against the harness's own
``hf`` model type."""

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

import skiplm  # noqa: E402
import skiplm.integrations.lm_eval  # noqa: E402,F401 - registers the model type
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from skiplm.errors import ModelLoadError  # noqa: E402
from skiplm.integrations.lm_eval import SkipLM  # noqa: E402

from conftest import run_cli  # noqa: E402

TASKS = Path(__file__).parents[1] / "data" / "lm_eval_tasks"  # tests/data
TASK = "skiplm_tiny_mc"
QUESTIONS = 12


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=str(TASKS), include_defaults=False)  # only the local task: no index of 14k tasks


def _evaluate(model_type, model_args, task_manager):
    result = lm_eval.simple_evaluate(model=model_type, model_args=model_args, tasks=[TASK], task_manager=task_manager,
                                     batch_size=4, bootstrap_iters=0, log_samples=True)
    samples = sorted(result["samples"][TASK], key=lambda s: s["doc_id"])
    loglikelihoods = [ll for s in samples for ll, _ in s["filtered_resps"]]  # every choice of every question
    assert len(loglikelihoods) == 3 * QUESTIONS
    return result, loglikelihoods


def test_the_model_type_is_registered():
    assert get_model("skiplm") is SkipLM


def test_empty_plan_scores_exactly_like_the_harness_hf_model(tiny_folder, task_manager, tmp_path):
    reference, reference_ll = _evaluate("hf", f"pretrained={tiny_folder},dtype=float32,device=cpu", task_manager)
    plan = skiplm.SkipPlan.empty(4).save(tmp_path / "empty.json")
    result, ll = _evaluate("skiplm", f"pretrained={tiny_folder},plan={plan},device=cpu", task_manager)
    assert result["results"][TASK]["sample_len"] == QUESTIONS
    assert result["results"][TASK]["acc,none"] == reference["results"][TASK]["acc,none"]
    assert ll == pytest.approx(reference_ll, abs=1e-5)
    assert result["config"]["skiplm_plan"]["decode"]["blocks"] == []
    assert result["config"]["skiplm_model"] == str(tiny_folder)


def test_a_plan_is_applied_and_matches_the_pruned_checkpoint(tiny_folder, task_manager, tmp_path):
    model, tokenizer = skiplm.load_model(str(tiny_folder))
    plan = skiplm.SkipPlan.from_layers(4, blocks=[1, 2]).for_model(model, str(tiny_folder))
    plan_file = plan.save(tmp_path / "plan.json")
    pruned = skiplm.export_pruned(model, plan, tmp_path / "pruned", tokenizer=tokenizer)
    _, full_ll = _evaluate("hf", f"pretrained={tiny_folder},dtype=float32,device=cpu", task_manager)
    result, ll = _evaluate("skiplm", f"pretrained={tiny_folder},plan={plan_file}", task_manager)
    # The harness's own hf model on a checkpoint with those blocks deleted: the same computation.
    _, pruned_ll = _evaluate("hf", f"pretrained={pruned},dtype=float32,device=cpu", task_manager)
    assert 0.0 <= result["results"][TASK]["acc,none"] <= 1.0
    assert ll == pytest.approx(pruned_ll, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(ll, full_ll)) > 1e-3  # the plan changed the scores
    assert result["config"]["skiplm_plan"]["decode"]["blocks"] == [1, 2]


def test_python_objects_and_plan_removal(tiny_folder):
    model, tokenizer = skiplm.load_model(str(tiny_folder))
    plan = skiplm.SkipPlan.from_layers(4, blocks=[3])
    lm = SkipLM(pretrained=model, tokenizer=tokenizer, plan=plan, batch_size=2)
    assert lm.skip_plan is plan and getattr(model, "_skiplm_handle", None) is lm.skip_handle
    [(with_plan, _)] = lm.loglikelihood([_request("Question: What do bees make?\nAnswer:", " honey")])
    [text] = lm.generate_until([_request("Question: What do bees make?\nAnswer:", {"until": ["\n\n"], "max_gen_toks": 4},
                                         "generate_until")])
    assert isinstance(text, str)
    lm.remove_plan()
    lm.remove_plan()  # twice is fine
    assert getattr(model, "_skiplm_handle", None) is None
    [(without_plan, _)] = lm.loglikelihood([_request("Question: What do bees make?\nAnswer:", " honey")])
    assert with_plan != pytest.approx(without_plan, abs=1e-4)


def _request(context, argument, request_type="loglikelihood"):
    from lm_eval.api.instance import Instance

    return Instance(request_type=request_type, doc={}, arguments=(context, argument), idx=0)


def test_bad_model_args_get_clear_errors(tiny_folder, tmp_path):
    with pytest.raises(ModelLoadError, match="does not take peft"):
        SkipLM(pretrained=str(tiny_folder), peft="some/adapter")
    with pytest.raises(ModelLoadError, match="tokenizer="):
        SkipLM(pretrained=skiplm.load_model(str(tiny_folder))[0])
    with pytest.raises(ModelLoadError, match="neither a model folder"):
        SkipLM(pretrained=str(tmp_path / "missing") + "/x/y")
    with pytest.raises(skiplm.PlanError, match="does not exist"):
        SkipLM(pretrained=str(tiny_folder), plan=str(tmp_path / "nope.json"))
    wrong = skiplm.SkipPlan.from_layers(7, blocks=[1]).save(tmp_path / "wrong.json")
    with pytest.raises(skiplm.PlanMismatchError, match="7 layers"):
        SkipLM(pretrained=str(tiny_folder), plan=str(wrong))


def test_skiplm_lm_eval_runs_the_harness_command_line(tiny_folder, tmp_path):
    """`skiplm lm-eval ...` forwards to lm-eval's own CLI (which indexes all its built-in tasks: ~10 s)."""
    plan = skiplm.SkipPlan.from_layers(4, blocks=[2]).save(tmp_path / "plan.json")
    out = tmp_path / "out"
    result = run_cli("lm-eval", "--model", "skiplm", "--model_args", f"pretrained={tiny_folder},plan={plan}",
                     "--tasks", TASK, "--include_path", TASKS, "--batch_size", 4, "--output_path", out)
    assert result.exception is None or (isinstance(result.exception, SystemExit) and result.exception.code == 0), \
        result.output
    [results_file] = out.rglob("results_*.json")
    data = json.loads(results_file.read_text())
    assert data["results"][TASK]["sample_len"] == QUESTIONS
    assert data["config"]["model"] == "skiplm" and data["config"]["skiplm_plan"]["decode"]["blocks"] == [2]
