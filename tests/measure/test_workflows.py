"""The measure-and-write workflows behind `skiplm eval`, `bench` and `agree`, called from Python (the demo's, end to
end: tests/cli/test_demo.py)."""

import json

import skiplm
from skiplm.measure.speed import BenchSettings
from skiplm.measure.workflows import agree_and_report, bench_and_report, evaluate_and_report
from skiplm.models.adapters import count_layers
from skiplm.models.data import Prompt


def _recorder():
    calls = []
    return calls, lambda description, done, total: calls.append((description, done, total))


def test_workflows_measure_write_and_report_progress(tiny_folder, tmp_path):
    model, tokenizer = skiplm.load_model(str(tiny_folder))
    plan = skiplm.SkipPlan.from_layers(count_layers(model), blocks=[1]).for_model(model)
    calls, progress = _recorder()
    quality = evaluate_and_report(model, tokenizer, {"full": None, "plan": plan}, ["pydoc"], 48, 32, 16, tmp_path,
                                  "tiny", "cpu", command="python", progress=progress)
    assert quality["command"] == "python" and quality["model"] == "tiny" and "cpu" in quality["machine"]
    assert json.loads((tmp_path / "eval.json").read_text()) == quality
    assert "| plan |" in (tmp_path / "eval.md").read_text()
    assert calls[-1][1] == calls[-1][2] == 2 * 48  # every scored token of both configurations

    calls, progress = _recorder()
    settings = BenchSettings(batch_sizes=(1,), prompt_tokens=8, decode_prompt_tokens=4, new_tokens=2, repeats=1,
                             warmup=0)
    speed = bench_and_report(model, tokenizer, {"plan": plan}, settings, True, tmp_path, "tiny", "cpu",
                             progress=progress)
    assert set(speed["speed"]) == {"full", "plan", "plan (layers deleted)"}
    assert (tmp_path / "bench.png").stat().st_size > 1000 and "prefill b1" in (tmp_path / "bench.md").read_text()
    assert [done for _, done, _ in calls] == list(range(1, len(calls) + 1)) and calls[-1][1] == calls[-1][2]

    result, paths = agree_and_report(model, tokenizer, [Prompt("Hello"), Prompt("2 + 2 =", "#### 4")], {"plan": plan},
                                     new_tokens=3, batch_size=2, chat=False, source="mine", out=tmp_path / "agree",
                                     model_name="tiny", device="cpu")
    assert result["kind"] == "generation-agreement" and result["settings"]["prompts"] == "mine"
    assert json.loads(paths["json"].read_text())["summary"] == result["summary"]
    assert "| plan |" in paths["markdown"].read_text()
