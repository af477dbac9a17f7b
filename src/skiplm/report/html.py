"""`skiplm report`: one self-contained HTML page from result folders and files.

Reads what the other commands write — ``demo.json`` (``skiplm demo``), ``sweep.json`` (``skiplm bench --sweep``),
``compare.json``, ``bench.json``, ``eval.json``, ``agreement.json`` and ``speculative.json`` (``skiplm
bench-speculative``) — and renders, per result: the command that produced it (where recorded), its
tables, its plots (the PNGs next to the JSON, embedded as base64 ``data:`` URIs), a layer x {attention, MLP} grid for
every plan it measured, its settings and the machine. The page has no scripts and no references outside itself: it
opens offline, and can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ReportError
from ..files import check_output, write_text_atomic
from ..plan import FORMAT_NAME as PLAN_FORMAT
from ..registry import PLANNERS, POLICIES
from ..sweep.settings import is_full_model, point_problem, target_label
from .shapes import SHAPES, shape_problem
from ..sweep.tables import settings_text, sweep_table

# file name -> kind written in it
RESULT_FILES = {
    "demo.json": "demo",
    "speculative.json": "speculative-bench",
    "sweep.json": "sweep",
    "compare.json": "planner-comparison",
    "bench.json": "speed",
    "eval.json": "perplexity",
    "agreement.json": "generation-agreement",
}
TITLES = {
    "demo": "skiplm demo",
    "sweep": "Scoreboard sweep",
    "planner-comparison": "Planners compared",
    "speed": "Speed",
    "perplexity": "Perplexity",
    "generation-agreement": "Generation agreement",
    "speculative-bench": "Self-speculative decoding vs plain greedy",
}
# the plots each kind of result writes next to its JSON
PLOTS = {"sweep": ("pareto.png",), "planner-comparison": ("pareto.png",), "speed": ("bench.png",),
         "speculative-bench": ("speculative.png",)}


class Result:
    """One result file: its path, its data and its kind."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path, self.data = path, data
        self.kind = data.get("kind")

    @property
    def title(self) -> str:
        model = self.data.get("model") or _settings(self.data).get("model") or "unknown model"
        return f"{TITLES[self.kind]}, {model}"


def find_results(paths: Sequence[str | Path]) -> list[Result]:
    """The result files named by ``paths``: JSON files, or folders (their result files; if a folder has none at its
    top level, those in its sub-folders)."""
    if not paths:
        raise ReportError("give at least one result folder or JSON file, e.g. `skiplm report results/sweep`.")
    files: list[Path] = []
    for given in map(Path, paths):
        if given.is_dir():
            found = [given / name for name in RESULT_FILES if (given / name).is_file()]
            if not found:
                found = sorted(p for name in RESULT_FILES for p in given.rglob(name) if p.is_file())
            if not found:
                raise ReportError(f"{given} holds no skiplm results (looked for {', '.join(RESULT_FILES)}, also in "
                                  "its sub-folders).")
            files += found
        elif given.is_file():
            files.append(given)
        else:
            raise ReportError(f"{given} does not exist.")
    results, seen = [], set()
    for path in files:
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        results.append(read_result(path))
    return results


def read_result(path: Path) -> Result:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ReportError(f"{path} is not a text file; give the JSON a skiplm command wrote.") from None
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); it may be truncated: "
                          "re-run the command that wrote it.") from None
    if not isinstance(data, dict) or data.get("kind") not in TITLES:
        kind = data.get("kind") if isinstance(data, dict) else None
        raise ReportError(f"{path} is not a result `skiplm report` knows (kind {kind!r}); it renders "
                          f"{', '.join(RESULT_FILES)} as written by skiplm demo, bench --sweep, compare, bench, eval, "
                          "agree and bench-speculative.")
    kind = data["kind"]
    problem = shape_problem(data, SHAPES[kind])
    if problem is None and kind == "sweep":
        problem = next(filter(None, (point_problem(point, f"points[{i}]") for i, point in enumerate(data["points"]))),
                       None)
    if problem is not None:
        raise _shape_error(path, kind, problem)
    return Result(path, data)


def _shape_error(path: Path, kind: str, problem: str) -> ReportError:
    return ReportError(f"{path} says it is a {kind} result but is not shaped like one: {problem}. It was edited, cut "
                       "short, or written by another tool or skiplm version; re-run the command that wrote it.")


# -- HTML pieces --------------------------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def html_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], css_class: str = "data") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def embedded_png(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}"><figcaption>{_e(path.name)}</figcaption></figure>'


def plan_grid(name: str, plan: dict[str, Any]) -> str:
    """A plan as a grid: one column per layer, one row per sublayer (attention, MLP); a second pair of rows for
    prefill when it skips differently from decode. Each cell is marked skipped or kept."""
    layers = int(plan["num_layers"])
    phases = ["decode"] if plan["prefill"] == plan["decode"] else ["decode", "prefill"]
    header = "<th></th>" + "".join(f"<th>{layer}</th>" for layer in range(layers))
    rows = []
    for phase in phases:
        skips = plan[phase]
        for part, label in (("attention", "attn"), ("mlp", "mlp")):
            skipped = set(skips.get("blocks", [])) | set(skips.get(part, []))
            row_label = label if len(phases) == 1 else f"{label} ({phase})"
            cells = "".join(
                f'<td class="{"skip" if layer in skipped else "keep"}" data-phase="{phase}" data-part="{part}" '
                f'data-layer="{layer}" title="layer {layer} {part} ({phase}): '
                f'{"skipped" if layer in skipped else "runs"}"></td>'
                for layer in range(layers))
            rows.append(f"<tr><th>{_e(row_label)}</th>{cells}</tr>")
    description = plan.get("description", "")
    return (f'<div class="plan" data-plan="{_e(name)}"><div class="plan-name">{_e(name)}'
            f'<span class="muted"> — {_e(description)}</span></div><table class="grid"><thead><tr>{header}</tr>'
            f'</thead><tbody>{"".join(rows)}</tbody></table></div>')


def _details(summary: str, content: str) -> str:
    return f"<details><summary>{_e(summary)}</summary>{content}</details>"


def _key_values(data: dict[str, Any]) -> str:
    rows = [[key, json.dumps(value) if isinstance(value, (dict, list)) else value] for key, value in data.items()]
    return html_table(["", ""], rows, "kv")


def _settings(data: dict[str, Any]) -> dict[str, Any]:
    settings = data.get("settings")
    return settings if isinstance(settings, dict) else {}


def _command(data: dict[str, Any]) -> str:
    command = data.get("command") or _settings(data).get("command")  # (bench-speculative keeps it in its settings)
    if isinstance(command, list):
        command = " ".join(command)
    if not command:
        return '<p class="muted">command: not recorded in this result file</p>'
    return f'<div class="command"><span class="muted">command</span><pre><code>{_e(command)}</code></pre></div>'


def _percent(value: Any) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


# -- per kind: tables and plans -----------------------------------------------------------------------------------------
def methods_table(names: Iterable[str]) -> str:
    """What each method of a result is, as the planner and policy registries describe it: its kind, paper, what it
    does and what it needs (a method no longer registered is said to be so)."""
    rows = []
    for name in dict.fromkeys(names):
        registry = next((r for r in (PLANNERS, POLICIES) if name in r), None)
        if registry is None:
            rows.append([name, "—", "—", "not registered in this skiplm", "—"])
            continue
        spec = registry.get(name)
        fixed = ", ".join(f"{key}={value}" for key, value in spec.defaults.items())
        rows.append([name, spec.kind, spec.paper or "—", spec.summary + (f" ({fixed})" if fixed else ""),
                     ", ".join(sorted(spec.needs)) or "—"])
    return _details("methods", html_table(["method", "kind", "paper", "what it does", "needs"], rows))


def _sweep_body(data: dict[str, Any]) -> tuple[str, list[tuple[str, dict]]]:
    headers, rows = sweep_table(data)
    body = f"<p>{_e(settings_text(data))}</p>" + html_table(headers, rows)
    body += methods_table(p["method"] for p in data["points"] if not is_full_model(p) and not p.get("healed"))
    if data.get("resumed_points"):
        body += (f'<p class="muted">{data["resumed_points"]} of these points were measured by an earlier run of '
                 "the same command (same settings) and loaded from its points.jsonl.</p>")
    plans = [(f"{p['method']} @ {target_label(p['target'])}", p["plan"]) for p in data["points"]
             if not is_full_model(p) and p.get("plan")]
    return body, plans


def _compare_body(data: dict[str, Any]) -> tuple[str, list[tuple[str, dict]]]:
    headers = ["method", "target", "plan", "perplexity", "measured decode speedup (95% CI)", "ideal", "error"]
    rows = [["full model", "—", "nothing", f"{data['full_perplexity']:.3f}", "1.00x", "1.000x", ""]]
    plans = []
    for p in data["points"]:
        if "perplexity" in p:
            low, high = p.get("decode_speedup_ci95", (float("nan"), float("nan")))
            rows.append([p["method"], f"{p['target']:g}", p.get("plan", ""), f"{p['perplexity']:.3f}",
                         f"{p['decode_speedup']:.2f}x ({low:.2f}–{high:.2f})", f"{p['ideal_speedup']:.3f}x", ""])
        else:
            rows.append([p["method"], f"{p['target']:g}", "—", "—", "—", "—", p.get("error") or "not run"])
        if p.get("plan_json"):
            plans.append((f"{p['method']} @ {p['target']:g}", p["plan_json"]))
    return html_table(headers, rows) + methods_table(p["method"] for p in data["points"] if not p.get("healed")), plans


def _bench_body(data: dict[str, Any]) -> tuple[str, list[tuple[str, dict]]]:
    from .files import settings_line, speed_rows

    headers, rows = speed_rows(data["speed"], data["settings"])
    body = f"<p>{_e(settings_line(data['settings']))}.</p>" + html_table(headers, rows)
    return body, [(name, plan) for name, plan in data.get("plans", {}).items() if plan]


def _eval_body(data: dict[str, Any]) -> tuple[str, list[tuple[str, dict]]]:
    corpora = list(data["perplexity"])
    headers = ["config"] + [f"perplexity, {c}" for c in corpora]
    rows = []
    for name in data["plans"]:
        cells = []
        for corpus in corpora:
            value = data["perplexity"][corpus][name]["perplexity"]
            full = data["perplexity"][corpus].get("full", {}).get("perplexity")
            cells.append(f"{value:.3f}" + (f" ({value / full:.2f}x)" if full and name != "full" else ""))
        rows.append([name, *cells])
    s = data["settings"]
    body = f"<p>{s['tokens']} tokens per corpus, context {s['context']}, stride {s['stride']}.</p>"
    return body + html_table(headers, rows), [(name, plan) for name, plan in data["plans"].items() if plan]


def _agreement_body(data: dict[str, Any]) -> tuple[str, list[tuple[str, dict]]]:
    from ..measure.agreement import summary_rows

    headers, rows = summary_rows(data)
    s = data["settings"]
    body = (f"<p>{s['count']} prompts from {_e(s['prompts'])}, up to {s['new_tokens']} new tokens, "
            f"{_e(s['decoding'])}.</p>")
    return body + html_table(headers, rows), [(name, plan) for name, plan in data.get("plans", {}).items() if plan]


def _demo_body(data: dict[str, Any]) -> tuple[str, list[tuple[str, dict]]]:
    from .files import demo_rows

    headers, rows = demo_rows(data)
    spec, total = data["speculative"], data["seconds"]["total"]
    notes = "".join(f"<li>{_e(line)}</li>" for line in data["notes"])
    steps = "".join(f"<li><code>{_e(command)}</code> — {_e(why)}</li>" for command, why in data["next"])
    body = (html_table(headers, rows) + f"<p>Speculative output identical to plain greedy: {spec['identical_rows']} of "
            f"{spec['rows']} generations, token for token. Wall time {total:.0f} s.</p><ul>{notes}</ul>"
            f"<h3>What to try next</h3><ul>{steps}</ul>")
    return body, []


def _speculative_body(data: dict[str, Any]) -> tuple[str, list[tuple[str, dict]]]:
    from ..speculative.bench import table_rows

    headers, rows = table_rows(data, data["settings"])
    drafts = "".join(f"<li><code>{_e(name)}</code>: {_e(text)}</li>" for name, text in data["drafts"].items())
    s = data["settings"]
    body = (f"<p>{s['new_tokens']} new tokens per row, greedy; {s['repeats']} round(s), every batch decoded plainly "
            "and by each draft in alternating order; speedup = plain time / draft time (median over rounds); identical "
            f"rows: speculative output equal to plain greedy, token for token.</p><ul>{drafts}</ul>")
    return body + html_table(headers, rows), []


BODIES = {"demo": _demo_body, "speculative-bench": _speculative_body, "sweep": _sweep_body, "planner-comparison": _compare_body, "speed": _bench_body, "perplexity": _eval_body,
          "generation-agreement": _agreement_body}

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       color: #1d1d1f; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05em; }
.muted { color: #6e6e73; font-size: 0.9em; }
table.data { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
table.data th, table.data td { border: 1px solid #d2d2d7; padding: 3px 6px; text-align: right; }
table.data th { background: #f5f5f7; }
table.data td:first-child, table.data th:first-child { text-align: left; }
table.kv { border-collapse: collapse; font-size: 0.8em; } table.kv td { padding: 1px 8px; border-bottom: 1px solid #eee; }
table.kv thead { display: none; }
pre { background: #f5f5f7; padding: 0.6em; overflow-x: auto; white-space: pre-wrap; word-break: break-all; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.8em; color: #6e6e73; }
.plans { display: flex; flex-wrap: wrap; gap: 1em 2em; }
.plan-name { font-size: 0.85em; font-weight: 600; margin-bottom: 2px; }
table.grid { border-collapse: separate; border-spacing: 1px; font-size: 0.65em; }
table.grid th { font-weight: normal; color: #6e6e73; padding: 0 3px; }
table.grid td { width: 12px; height: 12px; padding: 0; border-radius: 2px; }
td.skip { background: #d9534f; } td.keep { background: #cfe8cf; }
.legend span { display: inline-block; width: 12px; height: 12px; border-radius: 2px; vertical-align: middle; }
"""


def render(results: Sequence[Result], title: str = "skiplm report") -> str:
    """The whole page."""
    generated = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    contents = "".join(f'<li><a href="#r{i}">{_e(r.title)}</a> <span class="muted">{_e(r.path)}</span></li>'
                       for i, r in enumerate(results))
    sections = []
    for i, result in enumerate(results):
        data = result.data
        try:
            body, plans = BODIES[result.kind](data)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:  # a field the checks missed
            detail = f"no field {exc.args[0]!r}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
            raise _shape_error(result.path, result.kind, detail) from None
        plans = [(name, plan) for name, plan in plans if plan.get("format") == PLAN_FORMAT]  # grids: static plans
        images = "".join(embedded_png(result.path.parent / name, f"{result.title}: {name}")
                         for name in PLOTS.get(result.kind, ()) if (result.path.parent / name).is_file())
        grids = ""
        if plans:
            legend = ('<p class="legend muted"><span class="skip" style="background:#d9534f"></span> skipped '
                      '<span class="keep" style="background:#cfe8cf"></span> runs; columns are layers</p>')
            grids = "<h3>Plans</h3>" + legend + '<div class="plans">' + "".join(
                plan_grid(name, plan) for name, plan in plans) + "</div>"
        machine = data.get("machine")
        extra = ""
        if machine:
            extra += _details("machine", _key_values(machine))
        if data.get("settings"):
            extra += _details("settings", f"<pre>{_e(json.dumps(data['settings'], indent=2))}</pre>")
        sections.append(
            f'<section id="r{i}"><h2>{_e(result.title)}</h2><p class="muted">{_e(result.path)}'
            f'{" — " + _e(machine.get("cpu", "")) + ", torch " + _e(machine.get("torch", "")) if machine else ""}</p>'
            f"{_command(data)}{body}{images}{grids}{extra}</section>"
        )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{_e(title)}</h1>"
        f'<p class="muted">generated {generated} by skiplm report from {len(results)} result file(s)</p>'
        f"<ul>{contents}</ul>{''.join(sections)}</body></html>\n"
    )


def write_report(paths: Sequence[str | Path], out: str | Path, title: str = "skiplm report") -> Path:
    """Render the results in ``paths`` (folders or JSON files) to the HTML file ``out`` (checked first, written whole
    or not at all)."""
    out = check_output(out, kind="file", what="report file")
    results = find_results(paths)
    return write_text_atomic(out, render(results, title))
