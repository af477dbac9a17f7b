"""Task accuracy in process (`score_task`: an offline task on a model already loaded, full model vs a plan), the include
path for the plain harness, and the refusal of unknown task names — offline, on the tiny model folder."""

import math
import os
import random

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

import torch  # noqa: E402

import skiplm  # noqa: E402
from skiplm.errors import DataError  # noqa: E402
from skiplm.integrations.lm_eval import offline_task_manager, score_task  # noqa: E402
from skiplm.integrations.tasks import OFFLINE_TASKS, TASKS_DIR, resolve_tasks  # noqa: E402

from conftest import run_cli  # noqa: E402


@pytest.fixture(scope="module")
def loaded(tiny_folder, tmp_path_factory):
    model, tokenizer = skiplm.load_model(str(tiny_folder))
    plan = skiplm.SkipPlan.from_layers(4, blocks=[1, 2]).for_model(model, str(tiny_folder))
    plan_file = plan.save(tmp_path_factory.mktemp("plan") / "p.json")
    return model, tokenizer, plan, plan_file


def _logits(model):
    with torch.no_grad():
        return model(torch.tensor([[5, 6, 7, 8]])).logits


def test_score_task_under_a_plan_is_a_direct_harness_run_and_leaves_the_model_as_it_was(loaded, tiny_folder,
                                                                                         monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer, plan, plan_file = loaded
    manager = offline_task_manager()
    before = _logits(model)
    random.seed(11)
    torch.manual_seed(11)
    expected_draws = (random.random(), torch.rand(1).item())
    random.seed(11)
    torch.manual_seed(11)

    planned = score_task(model, tokenizer, plan, "skiplm_gpqa_diamond", limit=2, task_manager=manager)
    # the harness seeds the global generators; score_task gives them back as they were
    assert (random.random(), torch.rand(1).item()) == expected_draws
    # the plan is off again: the model computes what it did before
    assert getattr(model, "_skiplm_handle", None) is None
    assert torch.equal(_logits(model), before)

    assert planned["task"] == "skiplm_gpqa_diamond" and planned["metric"] == "acc,none"
    assert planned["examples"] == 2 and planned["num_fewshot"] == 0 and len(planned["scores"]) == 2
    assert set(planned["scores"]) <= {0.0, 1.0} and 0.0 <= planned["accuracy"] <= 1.0
    assert planned["accuracy"] == pytest.approx(sum(planned["scores"]) / 2)
    p = planned["accuracy"]
    assert planned["stderr"] == pytest.approx(math.sqrt(2 * p * (1 - p)) / math.sqrt(2))  # sample sd / sqrt(n)
    assert {"acc,none", "acc_norm,none", "acc_stderr,none"} <= set(planned["metrics"])

    # the same numbers as the harness running model type skiplm itself, the model and plan loaded from files
    direct = lm_eval.simple_evaluate(model="skiplm", model_args=f"pretrained={tiny_folder},device=cpu,plan={plan_file}",
                                     tasks=["skiplm_gpqa_diamond"], limit=2, batch_size=8, task_manager=manager,
                                     log_samples=True)
    samples = sorted(direct["samples"]["skiplm_gpqa_diamond"], key=lambda s: s["doc_id"])
    assert [s["acc"] for s in samples] == planned["scores"]
    assert direct["results"]["skiplm_gpqa_diamond"]["acc,none"] == planned["accuracy"]

    gsm8k = score_task(model, tokenizer, plan, "skiplm_gsm8k", limit=2, max_tokens=4, task_manager=manager)
    assert gsm8k["metric"] == "exact_match,strict-match" and gsm8k["examples"] == 2 and gsm8k["num_fewshot"] == 5
    assert len(gsm8k["scores"]) == 2 and 0.0 <= gsm8k["accuracy"] <= 1.0
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(gsm8k["metrics"])


def test_unknown_tasks_and_bad_limits_are_refused(loaded):
    model, tokenizer, _, _ = loaded
    assert resolve_tasks(["skiplm_offline", "skiplm_gsm8k", " "]) == OFFLINE_TASKS
    assert resolve_tasks(["skiplm_gpqa_diamond"]) == ("skiplm_gpqa_diamond",)
    with pytest.raises(DataError) as error:
        resolve_tasks(["skiplm_gsm8k", "gsm8k", "arc_easy"])
    message = str(error.value)
    assert "unknown task(s) gsm8k, arc_easy" in message
    assert "skiplm_gsm8k" in message and "skiplm_gpqa_diamond" in message and "skiplm_offline" in message
    with pytest.raises(DataError, match="unknown task"):
        score_task(model, tokenizer, None, "hellaswag", limit=2)
    with pytest.raises(DataError, match="at least 1"):
        score_task(model, tokenizer, None, "skiplm_gsm8k", limit=0)


def test_the_include_path_is_printed_and_works_with_the_plain_harness(loaded, tiny_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli("lm-eval", "--print-include-path")
    assert result.exception is None, result.output
    printed = result.output.strip()
    assert printed == str(TASKS_DIR) and (TASKS_DIR / "skiplm_gsm8k.yaml").is_file()
    refused = run_cli("lm-eval", "--print-include-path", "--tasks", "skiplm_gsm8k")
    assert isinstance(refused.exception, SystemExit) and "takes no other arguments" in str(refused.exception)

    # the plain harness with its own `hf` model type, told only where the tasks are (`lm_eval --include_path`):
    # the full model's numbers, as score_task gives them
    from lm_eval.tasks import TaskManager

    model, tokenizer, _, _ = loaded
    plain = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny_folder},dtype=float32,device=cpu",
                                    tasks=["skiplm_gpqa_diamond"], limit=2, batch_size=8, log_samples=True,
                                    task_manager=TaskManager(include_path=printed, include_defaults=False))
    samples = sorted(plain["samples"]["skiplm_gpqa_diamond"], key=lambda s: s["doc_id"])
    mine = score_task(model, tokenizer, None, "skiplm_gpqa_diamond", limit=2)
    assert [s["acc"] for s in samples] == mine["scores"]
