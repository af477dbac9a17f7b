"""A sweep's results as people read them: the full table (``sweep.md``, the report), the compact one (the
terminal), the sentence that says how everything was measured, and the files ``sweep.json``, ``sweep.md`` and
``pareto.png`` (:func:`skiplm.report.plots.sweep.plot_sweep`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..integrations.tasks import TASKS
from ..models.data import corpus_label
from ..plan import FORMAT_NAME as PLAN_FORMAT
from ..report.files import markdown_table, write_json, write_text
from ..report.plots.sweep import plot_sweep
from .settings import FULL_MODEL, is_full_model, target_label

RESULT_JSON = "sweep.json"
RESULT_MARKDOWN = "sweep.md"
RESULT_PLOT = "pareto.png"


def speed_measures(result: dict[str, Any]) -> list[str]:
    batch_sizes = result["settings"]["bench"]["batch_sizes"]
    return [f"{kind}_b{b}" for b in batch_sizes for kind in ("prefill", "decode")]


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def task_columns(result: dict[str, Any], *, short: bool = False) -> list[tuple[str, str]]:
    """(task, header) of each offline task the sweep asked for or any of its points holds, in :data:`TASKS` order;
    the header says how many examples each point was scored on (``short``: only the task's short name)."""
    asked = set(result["settings"].get("tasks") or ())
    columns = []
    for task in TASKS:
        counts = {p["tasks"][task.name]["examples"] for p in result["points"] if task.name in p.get("tasks", {})}
        if task.name in asked or counts:
            header = task.short if short else task.label + (f" (n={counts.pop()})" if len(counts) == 1 else "")
            columns.append((task.name, header))
    return columns


def _task_cell(point: dict[str, Any], task: str, *, stderr: bool = True) -> str:
    """A point's accuracy on ``task`` (± one standard error), or — where it has none."""
    result = point.get("tasks", {}).get(task)
    if result is None:
        return "—"
    text = _percent(result["accuracy"])
    if stderr and result.get("stderr") is not None:
        text += f" ± {100 * result['stderr']:.1f}"
    return text


def sweep_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per point (the full model first): plan, perplexity, agreement, and each measured speedup."""
    measures = speed_measures(result)
    tasks = task_columns(result)
    headers = ["method", "target", "skipped (decode)", "ideal", "perplexity", "ppl / full", "prefix agreement",
               "exact match", "answer agreement", "accuracy"]
    headers += [header for _, header in tasks]
    headers += [f"{m.replace('_b', ' b')}" for m in measures]
    rows = []
    for point in result["points"]:
        full = is_full_model(point)
        row = [point["method"], "—" if full else target_label(point["target"])]
        if point.get("error"):
            rows.append(row + [f"not planned: {point['error']}"[:80]] + ["—"] * (len(headers) - 3))
            continue
        plan = point.get("plan")
        row.append("nothing" if plan is None else _skipped_cell(plan))
        ideal = point["ideal_speedup"]["decode"]
        row.append("—" if ideal is None else f"{ideal:.3f}x")
        row.append(f"{point['perplexity']['perplexity']:.3f}")
        row.append(f"{point.get('perplexity_ratio', float('nan')):.2f}x")
        a = point["agreement"]
        row += [_percent(a["prefix_agreement"]), _percent(a["exact_match"]), _percent(a["answer_agreement"]),
                _percent(a.get("accuracy"))]
        row += [_task_cell(point, task) for task, _ in tasks]
        for measure in measures:
            r = point["speed"]["plan"][measure]
            if full:  # A/A: the full model against itself, and its absolute speed
                row.append(f"{r['tokens_per_s']:.1f} tok/s (A/A {r['speedup']:.2f}x)")
            else:
                low, high = r["speedup_ci95"]
                row.append(f"{r['speedup']:.2f}x ({low:.2f}–{high:.2f})")
        rows.append(row)
    return headers, rows


def compact_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The table for a terminal: quality and the measured speedups only (sweep.md has everything)."""
    measures = speed_measures(result)
    tasks = task_columns(result, short=True)
    headers = ["point", "ppl / full", "prefix agr.", "answer agr."] + [header for _, header in tasks]
    headers += [m.replace("_b", " b") for m in measures]
    rows = []
    for point in result["points"]:
        name = FULL_MODEL if is_full_model(point) else f"{point['method']} @ {target_label(point['target'])}"
        if point.get("error"):
            rows.append([name, "not planned"] + [""] * (len(headers) - 2))
            continue
        a = point["agreement"]
        rows.append([name, f"{point['perplexity_ratio']:.2f}x", _percent(a["prefix_agreement"]),
                     _percent(a["answer_agreement"])]
                    + [_task_cell(point, task, stderr=False) for task, _ in tasks]
                    + [f"{point['speed']['plan'][m]['speedup']:.2f}x" for m in measures])
    return headers, rows


def _skipped_cell(plan: dict[str, Any]) -> str:
    if plan.get("format") != PLAN_FORMAT:  # one that decides per input says what it does
        return plan["description"]
    decode = plan["decode"]
    parts = []
    for key, label in (("blocks", "blocks"), ("attention", "attn"), ("mlp", "mlp")):
        if decode.get(key):
            parts.append(f"{label} {','.join(map(str, decode[key]))}")
    text = "; ".join(parts) or "nothing"
    return text + (" (prefill differs)" if plan["prefill"] != plan["decode"] else "")


def settings_text(result: dict[str, Any]) -> str:
    s = result["settings"]
    b = s["bench"]
    return (
        f"Perplexity: {s['tokens']} tokens of {corpus_label(s['corpus'])}, context {s['context']}, stride {s['stride']}, "
        f"each plan's decode skip set on every token. Agreement: greedy output on the first {s['limit']} prompts of "
        f"{corpus_label(s['prompts'])}{' (chat template)' if s['chat'] else ''}, up to {s['agree_tokens']} tokens, "
        "compared with the full model's on the same batches (prefix agreement: share of the full model's tokens "
        "reproduced before the first divergence; answer agreement: same final number; accuracy: the reference "
        f"answer). Speed: prefill of {b['prompt_tokens']} tokens and {b['new_tokens']} greedy decode steps after a "
        f"{b['decode_prompt_tokens']}-token prompt at batch {', '.join(map(str, b['batch_sizes']))}; each plan timed "
        f"interleaved with the full model in the same run, {b['repeats']} rounds after {b['warmup']} warm-up; "
        "speedup = full time / plan time, median of per-round ratios (95% bootstrap interval). Calibration of the "
        f"data-driven planners: {s['sequences']} x {s['length']} tokens of {corpus_label(s['calibration_corpus'])}. "
        "Targets are each method's own (ideal by the cost model; `search`: predicted by its measured latency model). "
        "The full model's row compares it with itself: agreement is greedy decoding's determinism, speed an A/A "
        "ratio (the noise floor)." + _tasks_text(result)
    )


def _tasks_text(result: dict[str, Any]) -> str:
    """The sentence on task accuracy, where the sweep has any: how each task was scored, as its results record it."""
    columns = {task for task, _ in task_columns(result)}
    recorded: dict[str, dict[str, Any]] = {}
    for point in result["points"]:
        for task, scored in point.get("tasks", {}).items():
            recorded.setdefault(task, scored)
    described = []
    for task in (t for t in TASKS if t.name in columns):
        scored = recorded.get(task.name, {})
        settings = scored.get("settings", {})
        text = f"{task.name}: {task.how}"
        if "limit" in settings:
            text += f", the first {settings['limit']} examples"
        if scored.get("num_fewshot") is not None:
            text += f", {scored['num_fewshot']}-shot"
        if task.generative and "max_tokens" in settings:
            tokens = settings["max_tokens"]
            text += f", up to {tokens} generated tokens" if tokens else ", the task's own limit on generated tokens"
        described.append(text)
    if not described:
        return ""
    return (" Task accuracy: lm-evaluation-harness on skiplm's offline tasks, scored in process on the loaded model "
            f"with the point's plan applied ({'; '.join(described)}); ± one standard error (sample standard deviation "
            "/ sqrt(n)).")



def write_sweep(result: dict[str, Any], out: Path) -> dict[str, Path]:
    """``sweep.json`` (everything), ``sweep.md`` (the table) and ``pareto.png``."""
    out = Path(out)
    json_path = write_json(out / RESULT_JSON, result)
    headers, rows = sweep_table(result)
    machine = result["machine"]
    md = (f"# Scoreboard sweep, {result['model']}\n\n"
          f"{machine['cpu']}, {machine['torch_threads']} threads, torch {machine['torch']}, {result['dtype']} on "
          f"{result['device']}. {settings_text(result)}\n\n" + markdown_table(headers, rows)
          + f"\n![pareto]({RESULT_PLOT})\n\nCommand: `{result.get('command') or 'not recorded'}`\n")
    md_path = write_text(out / RESULT_MARKDOWN, md)
    plot_path = plot_sweep(result, out / RESULT_PLOT, f"{result['model']}: quality vs measured speed")
    return {"json": json_path, "markdown": md_path, "plot": plot_path}
