"""`skiplm report`: one self-contained HTML page from sweep, compare, bench, eval and agree results — embedded plots,
tables, plan grids with the right cells, the commands, the machine, and nothing fetched from a network."""

import base64
import html
import json
import re
import shlex

import pytest

from skiplm.errors import ReportError
from skiplm.plan import SkipPlan
from skiplm.report.html import find_results, plan_grid, write_report

from conftest import run_cli

TINY_SWEEP = ["--batch-sizes", "1", "--prompt-tokens", 8, "--decode-prompt-tokens", 4, "--new-tokens", 2,
              "--repeats", 1, "--warmup", 0, "--tokens", 48, "--context", 32, "--stride", 16, "--limit", 2,
              "--agree-tokens", 3, "--sequences", 2, "--length", 16]
SWEEP_ARGV = ["skiplm", "bench", "tiny", "--sweep", "--methods", "uniform,greedy-loss", "--note", "<&'quoted'>"]


@pytest.fixture(scope="module")
def results(tiny_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", SWEEP_ARGV)  # what the sweep records as its command
        result = run_cli("bench", tiny_folder, "--sweep", "--methods", "uniform,greedy-loss", "--targets", "1.005,1.01",
                         *TINY_SWEEP, "-o", root / "sweep")
    assert result.exception is None, result.output
    plan_file = root / "prefill-full.json"  # a plan whose prefill differs from its decode
    assert run_cli("plan", tiny_folder, "--skip", 1, "--prefill", "full", "-o", plan_file).exception is None
    for args in (["eval", "--plan", plan_file, "--tokens", 48, "--context", 32, "--stride", 16],
                 ["bench", "--plan", plan_file, "--batch-sizes", "1", "--prompt-tokens", 8, "--decode-prompt-tokens",
                  4, "--new-tokens", 2, "--repeats", 1, "--warmup", 0],
                 ["agree", "--plan", plan_file, "--limit", 2, "--new-tokens", 3],
                 ["compare", "--methods", "uniform", "--targets", "1.005", "--sequences", 2, "--length", 16,
                  "--tokens", 48, "--context", 32, "--stride", 16, "--repeats", 1, "--new-tokens", 2]):
        folder = root / args[0]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("sys.argv", command_argv(args[0]))
            result = run_cli(args[0], tiny_folder, *args[1:], "-o", folder)
        assert result.exception is None, result.output
    return root


def command_argv(command: str) -> list[str]:
    """What a result file of ``command`` records as the command line that made it (set as sys.argv)."""
    return ["skiplm", command, "tiny", "--made-by", f"{command} <test>"]


def sweep_command() -> str:
    return html.escape(shlex.join(SWEEP_ARGV), quote=True)


def cells(page: str, plan_name: str) -> dict[tuple[str, str], set[int]]:
    """The skipped cells of one plan's grid: (phase, part) -> layers."""
    start = page.index(f'<div class="plan" data-plan="{html.escape(plan_name, quote=True)}">')
    grid = page[start:page.index("</table>", start)]
    skipped: dict[tuple[str, str], set[int]] = {}
    found = re.findall(r'<td class="(skip|keep)" data-phase="(\w+)" data-part="(\w+)" data-layer="(\d+)"', grid)
    assert found
    for state, phase, part, layer in found:
        skipped.setdefault((phase, part), set())
        if state == "skip":
            skipped[(phase, part)].add(int(layer))
    return skipped


def test_report_is_one_self_contained_page(results, tmp_path):
    out = tmp_path / "report.html"
    result = run_cli("report", results / "sweep", results / "compare", results / "bench", results / "eval",
                     results / "agree" / "agreement.json", "-o", out, "--title", "tiny scoreboard")
    assert result.exception is None, result.output
    page = out.read_text()
    assert "<title>tiny scoreboard</title>" in page

    # nothing outside the page: no scripts, no stylesheets or images fetched from anywhere
    assert "<script" not in page and "<link" not in page and "url(" not in page
    assert "http://" not in page and "https://" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources)
    # the plots, embedded byte for byte
    embedded = {base64.b64decode(src.split(",", 1)[1]) for src in sources}
    for png in (results / "sweep" / "pareto.png", results / "compare" / "pareto.png", results / "bench" / "bench.png"):
        assert png.read_bytes() in embedded

    # the command that made the sweep, escaped; the machine it ran on
    assert sweep_command() in page
    for command in ("eval", "bench", "agree", "compare"):  # every result file records its command
        assert html.escape(shlex.join(command_argv(command)), quote=True) in page
    sweep = json.loads((results / "sweep" / "sweep.json").read_text())
    assert sweep["command"] == shlex.join(SWEEP_ARGV)
    assert html.escape(sweep["machine"]["cpu"]) in page

    # tables of every kind
    assert "<td>uniform</td><td>1.01</td><td>blocks 1,2</td>" in page
    for title in ("Scoreboard sweep", "Planners compared", "Speed", "Perplexity", "Generation agreement"):
        assert f"<h2>{title}," in page

    # a grid per plan, each cell skipped exactly where the plan skips
    for point in sweep["points"][1:]:
        plan = point["plan"]
        decode = plan["decode"]
        grid = cells(page, f"{point['method']} @ {point['target']:g}")
        assert set(grid) == {("decode", "attention"), ("decode", "mlp")}  # prefill = decode: one pair of rows
        assert grid[("decode", "attention")] == set(decode["blocks"]) | set(decode["attention"])
        assert grid[("decode", "mlp")] == set(decode["blocks"]) | set(decode["mlp"])
    prefill_full = SkipPlan.load(results / "prefill-full.json")
    grid = cells(page, "prefill-full")
    assert grid[("decode", "attention")] == grid[("decode", "mlp")] == set(prefill_full.decode.blocks)
    assert len(prefill_full.decode.blocks) == 1
    assert grid[("prefill", "attention")] == grid[("prefill", "mlp")] == set()


def test_plan_grid_marks_sublayers_and_phases():
    plan = SkipPlan.from_layers(5, blocks=[1], attention=[3], mlp=[4], prefill="full").to_json()
    page = plan_grid("p", plan)
    grid = cells(page, "p")
    assert grid == {("decode", "attention"): {1, 3}, ("decode", "mlp"): {1, 4}, ("prefill", "attention"): set(),
                    ("prefill", "mlp"): set()}
    assert page.count("<td ") == 4 * 5


def test_report_explains_bad_input(tmp_path, results):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="holds no skiplm results"):
        find_results([empty])
    with pytest.raises(ReportError, match="does not exist"):
        find_results([tmp_path / "nope"])
    broken = tmp_path / "sweep.json"
    broken.write_text('{"kind": "sweep", "poi')
    with pytest.raises(ReportError, match="not valid JSON"):
        find_results([broken])
    other = tmp_path / "other.json"
    other.write_text('{"kind": "something else"}')
    with pytest.raises(ReportError, match="kind 'something else'"):
        find_results([other])
    # a folder of folders: the results in its sub-folders, each once
    out = write_report([results, results / "sweep"], tmp_path / "all.html")
    page = out.read_text()
    assert page.count("<h2>Scoreboard sweep,") == 1 and page.count("<h2>Speed,") == 1
    result = run_cli("report", empty, "-o", tmp_path / "r.html")
    assert isinstance(result.exception, ReportError)
