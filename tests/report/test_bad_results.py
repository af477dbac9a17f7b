"""Result files read by `skiplm report` and by a resumed sweep are checked before they are used: a file of the wrong
shape, cut short or from another tool is refused by name, with what is missing — never a KeyError from a table."""

import json

import pytest

from skiplm.errors import ReportError, SweepError
from skiplm.report.html import find_results, write_report
from skiplm.report.shapes import SHAPES, shape_problem
from skiplm.sweep.settings import load_points, point_problem

from conftest import run_cli

MEASURE = {"median_s": 0.1, "samples_s": [0.1], "tokens_per_s": 10.0, "speedup": 1.0, "speedup_ci95": [1.0, 1.0],
           "speedup_of_medians": 1.0, "ideal_speedup": 1.0}
GOOD = {
    "speed": {"kind": "speed", "settings": {"batch_sizes": [1], "prompt_tokens": 8, "decode_prompt_tokens": 4,
                                            "new_tokens": 2, "repeats": 1, "warmup": 0},
              "plans": {}, "speed": {"full": {"prefill_b1": MEASURE, "decode_b1": MEASURE}}},
    "perplexity": {"kind": "perplexity", "settings": {"tokens": 48, "context": 32, "stride": 16, "corpora": ["pydoc"]},
                   "plans": {"full": None}, "perplexity": {"pydoc": {"full": {"perplexity": 3.0}}}},
}

# (file name, content, phrase the error must contain)
BROKEN = [
    ("sweep.json", {"kind": "sweep", "points": []}, "settings is missing"),  # was KeyError: 'settings'
    ("sweep.json", {"kind": "sweep", "settings": {"bench": {}}, "points": []}, "settings.bench.batch_sizes is missing"),
    ("sweep.json", {"kind": "sweep", "settings": [], "points": []}, "settings is a list, not an object"),
    ("compare.json", {"kind": "planner-comparison", "points": []}, "full_perplexity is missing"),
    ("compare.json", {"kind": "planner-comparison", "full_perplexity": "low", "points": []},
     "full_perplexity is a string, not a number"),
    ("compare.json", {"kind": "planner-comparison", "full_perplexity": 3.0, "points": [{"method": "x"}]},
     "points[0].target is missing"),
    ("bench.json", {"kind": "speed", "settings": GOOD["speed"]["settings"]}, "speed is missing"),
    ("bench.json", {**GOOD["speed"], "speed": {"full": {"decode_b1": {"median_s": 0.1}}}},
     "speed['full']['decode_b1'].tokens_per_s is missing"),
    ("eval.json", {"kind": "perplexity", "settings": {"tokens": 48}}, "settings.context is missing"),
    ("eval.json", {**GOOD["perplexity"], "perplexity": {"pydoc": {"full": {"perplexity": None}}}},
     "perplexity['pydoc']['full'].perplexity is null, not a number"),
    ("agreement.json", {"kind": "generation-agreement", "settings": {"count": 2, "prompts": "gsm8k",
                                                                     "new_tokens": 3, "decoding": "greedy"}},
     "summary is missing"),
    ("agreement.json", {"kind": "generation-agreement"}, "settings is missing"),
]


def _sweep(points):
    settings = {"bench": {"batch_sizes": [1], "prompt_tokens": 8, "decode_prompt_tokens": 4, "new_tokens": 2,
                          "repeats": 1, "warmup": 0},
                "tokens": 48, "context": 32, "stride": 16, "limit": 2, "agree_tokens": 3, "sequences": 2,
                "length": 16, "corpus": "pydoc", "prompts": "gsm8k", "calibration_corpus": "gsm8k", "chat": True}
    return {"kind": "sweep", "settings": settings, "points": points}


@pytest.mark.parametrize("name, content, phrase", BROKEN, ids=[f"{n}:{p}" for n, _, p in BROKEN])
def test_a_wrong_shape_result_is_named_with_what_is_missing(tmp_path, name, content, phrase):
    path = tmp_path / name
    path.write_text(json.dumps(content))
    for given in (path, tmp_path):  # the file, or the folder it is in
        with pytest.raises(ReportError) as caught:
            find_results([given])
        message = str(caught.value)
        assert str(path) in message and phrase in message and content["kind"] in message


def test_report_cli_refuses_a_wrong_shape_sweep_with_a_clear_error(tmp_path):
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "sweep.json").write_text(json.dumps({"kind": "sweep", "points": []}))
    result = run_cli("report", folder, "-o", tmp_path / "r.html")
    assert isinstance(result.exception, ReportError) and "settings is missing" in str(result.exception)
    assert not (tmp_path / "r.html").exists()


def test_a_sweep_point_missing_its_measurements_is_named(tmp_path):
    full = {"method": "full", "target": 1.0, "settings_hash": "h", "error": None, "perplexity": {"perplexity": 3.0}}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(_sweep([full])))
    with pytest.raises(ReportError, match=r"points\[0\]: agreement is missing"):
        find_results([path])
    errored = {"method": "uniform", "target": 1.5, "settings_hash": "h", "error": "unreachable"}
    assert point_problem(errored) is None  # a point that could not be planned has no measurements


def test_a_field_the_shape_does_not_list_is_still_a_clear_error(tmp_path):
    # eval.json whose plans name a row its perplexity table lacks: passes the shape, fails while rendering
    data = {**GOOD["perplexity"], "plans": {"full": None, "ghost": None}}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError, match="no field 'ghost'") as caught:
        write_report([path], tmp_path / "r.html")
    assert str(path) in str(caught.value)
    assert not (tmp_path / "r.html").exists()


def test_good_minimal_results_render(tmp_path):
    for kind, data in GOOD.items():
        assert shape_problem(data, SHAPES[kind]) is None
        (tmp_path / f"{kind}.json").write_text(json.dumps(data))
    page = write_report([tmp_path / "speed.json", tmp_path / "perplexity.json"], tmp_path / "r.html").read_text()
    assert "<h2>Speed," in page and "<h2>Perplexity," in page


def test_report_output_is_checked_before_reading_results(tmp_path):
    from skiplm.files import OutputError

    (tmp_path / "folder.html").mkdir()
    with pytest.raises(OutputError, match="existing folder"):
        write_report([tmp_path / "nothing-here"], tmp_path / "folder.html")


@pytest.mark.parametrize("line, phrase", [
    ('{"method": "full", "target": 1.0}', "settings_hash is missing"),
    ('{"method": 3, "target": 1.0, "settings_hash": "h", "error": "x"}', "method is an integer, not a string"),
    ('{"method": "full", "target": "1", "settings_hash": "h", "error": "x"}', "target is a string, not a number"),
    ('["method", "target", "settings_hash"]', "not an object"),
    ('{"method": "full", "target": 1.0, "settings_hash": "h", "error": null}', "perplexity is missing"),
    ('{"method": "full", "target": 1.0, "settings_hash": "h", "error": null, "perplexity": {"perplexity": 3.0}, '
     '"agreement": {}, "speed": {"plan": {"decode_b1": 1}}, "ideal_speedup": {}}',
     "speed.plan['decode_b1'] is an integer, not an object"),
])
def test_a_foreign_points_file_is_refused_with_what_is_missing(tmp_path, line, phrase):
    path = tmp_path / "points.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(SweepError) as caught:
        load_points(path)
    message = str(caught.value)
    assert str(path) in message and "line 1" in message and phrase in message and "--fresh" in message
