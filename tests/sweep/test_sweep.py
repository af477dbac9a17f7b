"""`skiplm bench --sweep`: the scoreboard's points, files, resume after an interruption, and refusal of stale results —
on the tiny model folder with tiny settings."""

import json

import click
import pytest

import skiplm
import skiplm.sweep.core
from skiplm.errors import SweepError
from skiplm.measure.perplexity import compare_perplexity, tokenize_corpus
from skiplm.models.data import load_corpus
from skiplm.plan import SkipPlan
from skiplm.sweep.settings import append_point, differences, load_points

from conftest import run_cli

# (the tiny model's 49k-token head dwarfs its layers, hence the small targets: 1 and 2 of its 4 blocks)
TINY = ["--batch-sizes", "1,2", "--prompt-tokens", 8, "--decode-prompt-tokens", 4, "--new-tokens", 2, "--repeats", 1,
        "--warmup", 0, "--tokens", 64, "--context", 32, "--stride", 16, "--limit", 3, "--agree-tokens", 4,
        "--sequences", 2, "--length", 16]


def sweep(folder, out, *extra, methods="uniform,greedy-loss", targets="1.005,1.01"):
    return run_cli("bench", folder, "--sweep", "--methods", methods, "--targets", targets, *TINY, *extra, "-o", out)


class Counter:
    """Wraps a function, counts calls, and raises KeyboardInterrupt at call number ``interrupt_at``."""

    def __init__(self, function, interrupt_at=None):
        self.function, self.interrupt_at, self.calls = function, interrupt_at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        return self.function(*args, **kwargs)


def test_sweep_writes_one_record_per_point_plus_the_full_model(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["skiplm", "bench", "--sweep", "(the test's command)"])
    result = sweep(tiny_folder, tmp_path)
    assert result.exception is None, result.output
    assert "finished uniform @ 1.005 (2 of 5, eta " in " ".join(result.output.split())  # a line per point
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["kind"] == "sweep" and data["command"] == "skiplm bench --sweep '(the test'\"'\"'s command)'"
    assert {"cpu", "torch_threads", "torch", "transformers"} <= set(data["machine"])
    assert {"python", "torch", "transformers", "skiplm"} <= set(data["versions"])
    assert data["seeds"]["torch"] == 0 and data["settings"]["tokens"] == 64 and data["resumed_points"] == 0
    points = data["points"]
    assert [(p["method"], p["target"]) for p in points] == [("full", 1.0)] + [
        (m, t) for m in ("uniform", "greedy-loss") for t in (1.005, 1.01)]
    measures = {"prefill_b1", "decode_b1", "prefill_b2", "decode_b2"}
    for point in points:
        assert point["error"] is None
        assert set(point["speed"]) == {"full", "plan"} and set(point["speed"]["plan"]) == measures
        assert all(len(r["samples_s"]) == 1 for r in point["speed"]["plan"].values())
        assert point["perplexity"]["tokens_scored"] == 64 and point["agreement"]["prompts"] == 3
    full = points[0]
    # the full model against itself: greedy decoding is deterministic, so agreement is total
    assert full["agreement"]["prefix_agreement"] == 1.0 and full["agreement"]["exact_match"] == 1.0
    assert full["agreement"]["positional_match"] == 1.0 and full["perplexity_ratio"] == 1.0
    for point in points[1:]:
        assert point["ideal_speedup"]["decode"] >= point["target"]
        assert 0.0 <= point["agreement"]["prefix_agreement"] <= 1.0
        saved = SkipPlan.load(tmp_path / point["plan_file"])
        assert saved.to_json()["decode"] == point["plan"]["decode"]
        assert saved.provenance["sweep"]["settings_hash"]
    # one block of four skipped for 1.005, two for 1.01
    assert [len(p["plan"]["decode"]["blocks"]) for p in points[1:]] == [1, 2, 1, 2]

    # the perplexity of a point is the plan's, measured with its decode set on every token
    model, tokenizer = skiplm.load_model(str(tiny_folder))
    ids = tokenize_corpus(tokenizer, load_corpus("pydoc"), 64)
    plan = SkipPlan.load(tmp_path / points[2]["plan_file"])
    expected = compare_perplexity(model, ids, {"full": None, "plan": plan}, context=32, stride=16)
    assert points[2]["perplexity"]["perplexity"] == pytest.approx(expected["plan"].perplexity, rel=1e-5)
    assert full["perplexity"]["perplexity"] == pytest.approx(expected["full"].perplexity, rel=1e-5)
    assert points[2]["perplexity_ratio"] == pytest.approx(expected["plan"].perplexity / expected["full"].perplexity,
                                                          rel=1e-5)

    lines = (tmp_path / "points.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line)["settings_hash"] for line in lines)
    markdown = (tmp_path / "sweep.md").read_text()
    assert "| full | — | nothing |" in markdown and "| greedy-loss | 1.01 |" in markdown and "A/A" in markdown
    assert (tmp_path / "pareto.png").stat().st_size > 5000


def test_an_interrupted_sweep_keeps_finished_points_and_resumes_without_recomputing(tiny_folder, tmp_path,
                                                                                   monkeypatch):
    speed = Counter(skiplm.sweep.core.measure_speed, interrupt_at=3)  # full model, uniform @ 1.005, then Ctrl-C
    monkeypatch.setattr(skiplm.sweep.core, "measure_speed", speed)
    result = sweep(tiny_folder, tmp_path)
    assert isinstance(result.exception, (KeyboardInterrupt, click.exceptions.Abort))
    finished = [json.loads(line) for line in (tmp_path / "points.jsonl").read_text().splitlines()]
    assert [(p["method"], p["target"]) for p in finished] == [("full", 1.0), ("uniform", 1.005)]
    assert sorted(p.name for p in (tmp_path / "plans").iterdir()) == [
        "greedy-loss-1.005.json", "greedy-loss-1.01.json", "uniform-1.005.json", "uniform-1.01.json"]
    assert not (tmp_path / "sweep.json").exists()

    speed = Counter(skiplm.sweep.core.measure_speed.function)
    perplexity = Counter(skiplm.sweep.core.measure_perplexity)
    planned = Counter(skiplm.sweep.core.make_plans)
    monkeypatch.setattr(skiplm.sweep.core, "measure_speed", speed)
    monkeypatch.setattr(skiplm.sweep.core, "measure_perplexity", perplexity)
    monkeypatch.setattr(skiplm.sweep.core, "make_plans", planned)
    result = sweep(tiny_folder, tmp_path)
    assert result.exception is None, result.output
    assert (speed.calls, perplexity.calls, planned.calls) == (3, 3, 0)  # only the three unfinished points
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["resumed_points"] == 2 and len(data["points"]) == 5
    assert data["points"][1]["finished_at"] == finished[1]["finished_at"]  # loaded, not measured again
    assert data["points"][0]["agreement"]["exact_match"] == 1.0
    assert len((tmp_path / "points.jsonl").read_text().splitlines()) == 5

    # nothing left to do: a third run measures nothing and writes the same points
    speed.calls = 0
    assert sweep(tiny_folder, tmp_path).exception is None and speed.calls == 0


def test_a_changed_setting_is_refused_and_fresh_starts_over(tiny_folder, tmp_path, monkeypatch):
    assert sweep(tiny_folder, tmp_path, methods="uniform", targets="1.005").exception is None
    result = sweep(tiny_folder, tmp_path, "--tokens", 48, methods="uniform", targets="1.005")
    assert isinstance(result.exception, SweepError)
    message = str(result.exception)
    assert "--fresh" in message and "perplexity.tokens: 64 -> 48" in message

    # a setting only data-driven planners use does not invalidate a uniform plan, nor the full model
    speed = Counter(skiplm.sweep.core.measure_speed)
    monkeypatch.setattr(skiplm.sweep.core, "measure_speed", speed)
    result = sweep(tiny_folder, tmp_path, "--sequences", 3, methods="uniform", targets="1.005")
    assert result.exception is None, result.output
    assert speed.calls == 0
    # ... but it does invalidate a data-driven one
    assert sweep(tiny_folder, tmp_path, methods="greedy-loss", targets="1.005").exception is None
    result = sweep(tiny_folder, tmp_path, "--sequences", 3, methods="greedy-loss", targets="1.005")
    assert isinstance(result.exception, SweepError) and "plan.calibration.sequences: 2 -> 3" in str(result.exception)

    speed.calls = 0
    result = sweep(tiny_folder, tmp_path, "--tokens", 48, "--fresh", methods="uniform", targets="1.005")
    assert result.exception is None, result.output
    assert speed.calls == 2  # the full model and the one point, measured again
    lines = [json.loads(line) for line in (tmp_path / "points.jsonl").read_text().splitlines()]
    assert [p["settings"]["perplexity"]["tokens"] for p in lines] == [48, 48]
    assert not (tmp_path / "plans" / "greedy-loss-1.005.json").exists()


def test_a_plan_saved_with_other_settings_is_not_reused(tiny_folder, tmp_path, monkeypatch):
    speed = Counter(skiplm.sweep.core.measure_speed, interrupt_at=2)  # the plan is saved, its point is not finished
    monkeypatch.setattr(skiplm.sweep.core, "measure_speed", speed)
    result = sweep(tiny_folder, tmp_path, methods="greedy-loss", targets="1.005")
    assert isinstance(result.exception, (KeyboardInterrupt, click.exceptions.Abort))
    assert (tmp_path / "plans" / "greedy-loss-1.005.json").exists()
    result = sweep(tiny_folder, tmp_path, "--length", 12, methods="greedy-loss", targets="1.005")
    assert isinstance(result.exception, SweepError)
    assert "plan greedy-loss-1.005.json" in str(result.exception) and "length: 16 -> 12" in str(result.exception)


def test_points_file_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "points.jsonl"
    append_point(path, {"method": "full", "target": 1.0, "settings_hash": "a"})
    append_point(path, {"method": "uniform", "target": 1.1, "settings_hash": "a"})
    with open(path, "ab") as handle:
        handle.write(b'{"method": "uniform", "targ')  # killed in the middle of a write
    points = load_points(path)
    assert set(points) == {("full", "1"), ("uniform", "1.1")}
    assert path.read_text().endswith("}\n") and len(path.read_text().splitlines()) == 2
    append_point(path, {"method": "search", "target": 1.2, "settings_hash": "a"})
    assert set(load_points(path)) == {("full", "1"), ("uniform", "1.1"), ("search", "1.2")}

    path.write_text('{"method": "full", "target": 1.0, "settings_hash": "a"}\nnot json\n{"method": "x"}\n')
    with pytest.raises(SweepError, match="line 2 is not a JSON record"):
        load_points(path)


def test_differences_name_the_changed_settings():
    old = {"perplexity": {"tokens": 64, "corpus": "pydoc"}, "speed": {"repeats": 3}, "model": {"w": list(range(40))}}
    new = {"perplexity": {"tokens": 64, "corpus": "gsm8k"}, "speed": {"repeats": 5}, "model": {"w": list(range(41))}}
    assert differences(old, new) == ['model.w: (changed) -> (changed)', 'perplexity.corpus: "pydoc" -> "gsm8k"',
                                     "speed.repeats: 3 -> 5"]
    assert differences(old, old) == []


def test_sweep_options_are_checked(tiny_folder, tmp_path):
    result = run_cli("bench", tiny_folder, "--methods", "uniform", "--tokens", 64, "-o", tmp_path)
    assert isinstance(result.exception, click.UsageError)
    assert "--methods, --tokens only apply with --sweep" in str(result.exception)
    plan_file = tmp_path / "p.json"
    assert run_cli("plan", tiny_folder, "--skip", 1, "-o", plan_file).exception is None
    result = run_cli("bench", tiny_folder, "--sweep", "--plan", plan_file, "-o", tmp_path)
    assert isinstance(result.exception, click.UsageError) and "--plan does not apply with --sweep" in str(result.exception)
    result = sweep(tiny_folder, tmp_path, methods="uniform,nope")
    assert isinstance(result.exception, SweepError) and "unknown method(s) nope" in str(result.exception)
    result = sweep(tiny_folder, tmp_path, targets="1.1,0.9")
    assert isinstance(result.exception, SweepError) and "greater than 1" in str(result.exception)
    result = sweep(tiny_folder, tmp_path, targets="1.1,x")
    assert isinstance(result.exception, click.BadParameter)
    assert not (tmp_path / "points.jsonl").exists()


def test_an_unreachable_target_is_a_finished_point_with_an_error(tiny_folder, tmp_path, monkeypatch):
    speed = Counter(skiplm.sweep.core.measure_speed)
    monkeypatch.setattr(skiplm.sweep.core, "measure_speed", speed)
    result = sweep(tiny_folder, tmp_path, methods="uniform", targets="1.005,5")
    assert result.exception is None, result.output
    data = json.loads((tmp_path / "sweep.json").read_text())
    unreachable = data["points"][2]
    assert unreachable["target"] == 5.0 and "out of reach" in unreachable["error"]
    assert speed.calls == 2  # the full model and uniform @ 1.005; nothing to time for 5x
    assert "not planned" in (tmp_path / "sweep.md").read_text()


def test_policies_are_swept_like_plans(tiny_folder, tmp_path, monkeypatch):
    """ffn-skip and lac points: calibrated per target to the skip ratio a latency model gives (fixed here: timing
    the tiny model would be noise), saved as policy files, measured like plans, with what they skipped recorded."""
    from skiplm.measure.latency import LatencyModel
    from skiplm.policies import HaltingPolicy
    from skiplm import load_skipper

    fixed = LatencyModel(fixed_s=0.004, attention_s=0.0005, mlp_s=0.001, num_layers=4, batch_size=1, context=64)
    monkeypatch.setattr(LatencyModel, "measure", classmethod(lambda cls, model, **kw: fixed))
    result = sweep(tiny_folder, tmp_path, methods="ffn-skip,lac", targets="1.1,3")
    assert result.exception is None, result.output
    points = json.loads((tmp_path / "sweep.json").read_text())["points"]
    by_key = {(p["method"], p["target"]): p for p in points}
    assert "out of reach" in by_key[("lac", 3.0)]["error"]  # more MLPs than the unprotected layers have
    for method in ("ffn-skip", "lac"):
        point = by_key[(method, 1.1)]
        assert point["error"] is None
        policy = load_skipper(tmp_path / point["plan_file"])
        assert isinstance(policy, HaltingPolicy) and policy.method == method
        # the ratio for 1.1x by the fixed latency model: (1 - 1/1.1) * 10 ms step / (4 layers * 1 ms per MLP)
        assert policy.provenance["target_skip_ratio"] == pytest.approx((1 - 1 / 1.1) * 10 / 4)
        decode = point["speed"]["plan"]["decode_b1"]
        assert decode["policy"]["skipped_mlps_per_token"] >= 0 and decode["ideal_speedup"] >= 1.0
        assert point["ideal_speedup"]["decode"] == decode["ideal_speedup"]
        assert 0.0 <= point["agreement"]["prefix_agreement"] <= 1.0
    assert "ffn-skip (prefill threshold" in (tmp_path / "sweep.md").read_text()


# -- heal folders beside the planned points --------------------------------------------------------------------------
def test_a_sweep_measures_heal_folders_as_healed_points(tiny_folder, tiny_heal, tmp_path):
    from skiplm.heal import load_healed
    from skiplm.measure.costs import CostModel
    from skiplm.measure.perplexity import perplexity
    from skiplm.models.loading import load_model
    from skiplm.report.plots.sweep import frontier

    model, tokenizer = load_model(str(tiny_folder))
    healed = load_healed(tiny_heal.folder)
    ok = sweep(tiny_folder, tmp_path, "--heal", tiny_heal.folder, methods="uniform", targets="1.005")
    assert ok.exception is None, ok.output
    result = json.loads((tmp_path / "sweep.json").read_text())
    point = next(p for p in result["points"] if p["method"] == "b1 (healed)")
    assert point["healed"] is True and "plan_file" not in point and point["plan"]["format"] == "skiplm.heal"
    assert not any(p.get("healed") for p in result["points"] if p is not point)
    ids = tokenize_corpus(tokenizer, load_corpus("pydoc"), 64)
    with skiplm.apply(model, healed):
        expected = perplexity(model, ids, context=32, stride=16).perplexity
    assert point["perplexity"]["perplexity"] == pytest.approx(expected, rel=1e-5)
    ideal = CostModel.from_parameter_counts(model).ideal_speedup(healed.plan.decode)
    assert point["ideal_speedup"]["decode"] == pytest.approx(ideal) and point["target"] == pytest.approx(ideal)
    assert "b1 (healed)" in (tmp_path / "sweep.md").read_text()
    # run again: the healed point is resumed like the others, not measured again
    again = sweep(tiny_folder, tmp_path, "--heal", tiny_heal.folder, methods="uniform", targets="1.005")
    assert again.exception is None, again.output
    assert json.loads((tmp_path / "sweep.json").read_text())["resumed_points"] == 3
    # the frontier the plots draw: the points no other beats on speed and quality both
    assert frontier([(1.1, 5.0), (1.2, 4.0), (1.3, 6.0), (1.25, 7.0)], lower_is_better=True) == [(1.2, 4.0), (1.3, 6.0)]
    assert frontier([(1.1, 90.0), (1.2, 95.0), (1.3, 80.0)], lower_is_better=False) == [(1.2, 95.0), (1.3, 80.0)]
