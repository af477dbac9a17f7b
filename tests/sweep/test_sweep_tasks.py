"""`skiplm bench --sweep --tasks`: the scoreboard's task-accuracy column (offline GSM8K and GPQA through
lm-evaluation-harness, in process), resumed like the rest of the sweep — on the tiny model folder with tiny settings."""

import json
import os

import click
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("lm_eval")

import skiplm  # noqa: E402
import skiplm.sweep.core  # noqa: E402
from skiplm.errors import SweepError  # noqa: E402
from skiplm.plan import SkipPlan  # noqa: E402
from skiplm.sweep.settings import load_points  # noqa: E402

from conftest import run_cli  # noqa: E402

# as in test_sweep.py: the tiny model's settings, small enough for seconds per point
TINY = ["--batch-sizes", "1,2", "--prompt-tokens", 8, "--decode-prompt-tokens", 4, "--new-tokens", 2, "--repeats", 1,
        "--warmup", 0, "--tokens", 64, "--context", 32, "--stride", 16, "--limit", 3, "--agree-tokens", 4,
        "--sequences", 2, "--length", 16]
TASKS = ["--tasks", "skiplm_offline", "--task-limit", 2, "--task-max-tokens", 4]


class Counter:
    """Wraps a function and counts its calls."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


def sweep(folder, out, *extra, methods="uniform", targets="1.005"):
    return run_cli("bench", folder, "--sweep", "--methods", methods, "--targets", targets, *TINY, *extra, "-o", out)


def test_the_sweep_scores_each_point_on_the_offline_tasks_as_the_bridge_does(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = sweep(tiny_folder, tmp_path, *TASKS)
    assert result.exception is None, result.output
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["settings"]["tasks"] == ["skiplm_gsm8k", "skiplm_gpqa_diamond"]  # the tag, expanded
    assert data["settings"]["task_limit"] == 2 and data["settings"]["task_max_tokens"] == 4
    points = data["points"]
    assert [p["method"] for p in points] == ["full", "uniform"]

    for point in points:
        assert set(point["tasks"]) == {"skiplm_gsm8k", "skiplm_gpqa_diamond"}
        for scored in point["tasks"].values():
            assert scored["examples"] == 2 and len(scored["scores"]) == 2
            assert 0.0 <= scored["accuracy"] <= 1.0 and scored["stderr"] >= 0.0
            assert scored["settings"]["limit"] == 2 and scored["settings_hash"]
    # the plan's numbers are what the bridge gives on that plan, run directly on a freshly loaded model (the full
    # model's: see tests/integrations/test_task_accuracy.py)
    from skiplm.integrations.lm_eval import score_task

    model, tokenizer = skiplm.load_model(str(tiny_folder))
    plan = SkipPlan.load(tmp_path / points[1]["plan_file"])
    for task, scored in points[1]["tasks"].items():
        direct = score_task(model, tokenizer, plan, task, limit=2, max_tokens=4)
        assert scored["scores"] == direct["scores"] and scored["accuracy"] == direct["accuracy"]
        assert scored["stderr"] == direct["stderr"]
    assert points[0]["tasks"]["skiplm_gsm8k"]["settings"]["max_tokens"] == 4
    assert "max_tokens" not in points[0]["tasks"]["skiplm_gpqa_diamond"]["settings"]  # multiple choice: no tokens

    # the column, in sweep.md and in the report
    markdown = (tmp_path / "sweep.md").read_text()
    assert "| GSM8K exact match (n=2) | GPQA accuracy (n=2) |" in markdown and "Task accuracy:" in markdown
    gpqa = points[1]["tasks"]["skiplm_gpqa_diamond"]
    cell = f"{100 * gpqa['accuracy']:.1f}% ± {100 * gpqa['stderr']:.1f}"
    row = next(line for line in markdown.splitlines() if line.startswith("| uniform |"))
    assert cell in row
    report = tmp_path / "report.html"
    assert run_cli("report", tmp_path, "-o", report).exception is None
    assert "GSM8K exact match (n=2)" in report.read_text() and cell in report.read_text()

    # run again: nothing to measure, no task scored again
    scored = Counter(skiplm.sweep.core.measure_task)
    monkeypatch.setattr(skiplm.sweep.core, "measure_task", scored)
    assert sweep(tiny_folder, tmp_path, *TASKS).exception is None and scored.calls == 0
    # another number of examples is another measurement: refused like any changed setting
    result = sweep(tiny_folder, tmp_path, *TASKS[:-4], "--task-limit", 3)
    assert isinstance(result.exception, SweepError)
    assert "tasks.skiplm_gsm8k.limit: 2 -> 3" in str(result.exception) and "--fresh" in str(result.exception)
    assert scored.calls == 0


def test_tasks_asked_of_a_finished_sweep_are_scored_alone_and_missing_ones_show_a_dash(tiny_folder, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert sweep(tiny_folder, tmp_path, targets="1.005,5").exception is None  # 5x: out of reach, an error point
    assert "GPQA" not in (tmp_path / "sweep.md").read_text()  # no tasks asked, no column

    speed, perplexity = Counter(skiplm.sweep.core.measure_speed), Counter(skiplm.sweep.core.measure_perplexity)
    scored = Counter(skiplm.sweep.core.measure_task)
    for name, counter in (("measure_speed", speed), ("measure_perplexity", perplexity), ("measure_task", scored)):
        monkeypatch.setattr(skiplm.sweep.core, name, counter)
    result = sweep(tiny_folder, tmp_path, "--tasks", "skiplm_gpqa_diamond", "--task-limit", 2, targets="1.005,5")
    assert result.exception is None, result.output
    assert (speed.calls, perplexity.calls, scored.calls) == (0, 0, 2)  # the full model and uniform @ 1.005: tasks only
    data = json.loads((tmp_path / "sweep.json").read_text())
    before = {p["method"]: p for p in map(json.loads, (tmp_path / "points.jsonl").read_text().splitlines()[:3])}
    full, point, unreachable = data["points"]
    assert set(full["tasks"]) == set(point["tasks"]) == {"skiplm_gpqa_diamond"} and "tasks" not in unreachable
    assert point["finished_at"] == before["uniform"]["finished_at"]  # its other numbers: those measured before
    assert point["speed"] == before["uniform"]["speed"]
    assert len((tmp_path / "points.jsonl").read_text().splitlines()) == 5  # 3, then the 2 completed records
    assert {key: "tasks" in record for key, record in load_points(tmp_path / "points.jsonl").items()} == {
        ("full", "1"): True, ("uniform", "1.005"): True, ("uniform", "5"): False}

    # a target added without --tasks: its point has no task result, shown as a dash beside the others
    result = sweep(tiny_folder, tmp_path, targets="1.005,1.01,5")
    assert result.exception is None, result.output
    lines = (tmp_path / "sweep.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| method |")).split(" | ")
    column = header.index("GPQA accuracy (n=2)")
    cells = {line.split(" | ")[0].strip("| ") + " " + line.split(" | ")[1]: line.split(" | ")[column]
             for line in lines if line.startswith("| ") and not line.startswith(("| method", "|---"))}
    assert cells["uniform 1.01"] == "—" and cells["uniform 5"] == "—"
    assert " ± " in cells["full —"] and " ± " in cells["uniform 1.005"]  # measured: accuracy ± its standard error


def test_bad_task_options_are_refused_before_the_model_loads(tiny_folder, tmp_path):
    result = sweep(tiny_folder, tmp_path, "--tasks", "skiplm_gsm8k,arc_easy")
    assert isinstance(result.exception, SweepError)
    message = str(result.exception)
    assert "unknown task(s) arc_easy" in message
    assert all(name in message for name in ("skiplm_gsm8k", "skiplm_gpqa_diamond", "skiplm_offline"))
    result = sweep(tiny_folder, tmp_path, "--task-limit", 5)
    assert isinstance(result.exception, click.UsageError) and "--task-limit only applies with --tasks" in str(
        result.exception)
    result = sweep(tiny_folder, tmp_path, "--tasks", "skiplm_gsm8k", "--task-limit", 0)
    assert isinstance(result.exception, click.BadParameter)
    result = run_cli("bench", tiny_folder, "--tasks", "skiplm_gsm8k", "-o", tmp_path)
    assert isinstance(result.exception, click.UsageError) and "only applies with --sweep" in str(result.exception)
    assert not (tmp_path / "points.jsonl").exists()
