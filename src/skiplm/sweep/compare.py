"""Planners and policies side by side: for each method and target, the plan, its held-out perplexity and its measured
decode speedup against the full model — one run, one machine, one JSON + markdown table + Pareto plot.

A *method* here is any name in :data:`~skiplm.registry.PLANNERS` (presets included) or
:data:`~skiplm.registry.POLICIES`; what it needs (calibration text, a latency model) and whether one run serves
every target (``nested``) come from its spec, so a newly registered method is compared with no change here.

Calibration text (for the data-driven methods) and evaluation text are different corpora (by default GSM8K and
pydoc), so no planner is scored on the text it was fitted to. Speed is decode at batch 1, each plan paired with the
full model round by round (see :mod:`skiplm.measure.speed`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PlanError
from ..measure.latency import LatencyModel
from ..measure.perplexity import perplexity, tokenize_corpus
from ..measure.speed import BenchSettings, Config, run_bench
from ..models.data import corpus_label, load_corpus
from ..planners.common import Planned, load_calibration, plan_each
from ..policies import calibrate, skip_ratio_for_speedup
from ..registry import PLANNERS, POLICIES, Spec
from ..report.files import machine_info, markdown_table, write_json, write_text
from ..report.plots.sweep import plot_pareto
from ..skipper import Skipper, apply, is_healed
from .measurements import healed_target, ideal_speedups

RESULT_JSON = "compare.json"
RESULT_MARKDOWN = "compare.md"
RESULT_PLOT = "pareto.png"


# -- the methods ----------------------------------------------------------------------------------------------------
def method_names() -> list[str]:
    """Every name :func:`make_plans` takes: the planners (presets included), then the policies."""
    return [*PLANNERS.names(), *POLICIES.names()]


def default_methods() -> list[str]:
    """The planners compared when none are named: each once — a planner with presets by its presets (``similarity``
    by ``similarity-block``, ``-attention``, ...), which are its variants worth comparing."""
    with_presets = {spec.target for spec in PLANNERS if spec.defaults}
    return [spec.name for spec in PLANNERS if spec.defaults or spec.target not in with_presets]


def method_spec(name: str) -> Spec:
    """The spec of a planner or policy ``name``; unknown names are a :class:`PlanError` listing the known ones."""
    for registry in (PLANNERS, POLICIES):
        if name in registry:
            return registry.get(name)
    raise PlanError(f"unknown method {name!r}; available: {', '.join(method_names())}.")


def is_data_driven(name: str) -> bool:
    """Whether ``name`` is fitted on calibration text here (every policy is: it is calibrated per target)."""
    spec = method_spec(name)
    return spec.data_driven or spec.kind == POLICIES.kind


# -- planning -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Point:
    method: str
    target: float
    plan: Skipper | None
    seconds_to_plan: float
    error: str | None = None


def make_plans(
    model: nn.Module,
    methods: list[str],
    targets: list[float],
    calibration: list[torch.Tensor],
    *,
    latency: LatencyModel | None = None,
    refine_budget: int = 48,
    progress: Callable[[str], None] | None = None,
) -> list[Point]:
    """One plan (or policy) per (method, target). A ``nested`` planner (``search``, ``greedy-loss``) runs once, to
    the largest target, and serves the others from that run (``seconds_to_plan`` is that one run's; for ``search``,
    plus the refinement of that target's cut, within ``refine_budget`` forward passes). ``latency``: the latency
    model the methods that need one share (measured once, when first needed)."""
    specs = [method_spec(method) for method in methods]
    measured = [latency]

    def latency_model() -> LatencyModel:
        if measured[0] is None:
            measured[0] = LatencyModel.measure(model)
        return measured[0]

    points = []
    for spec in specs:
        if progress:
            progress(f"planning: {spec.name}")
        planned = _POINTS[spec.kind](model, spec, targets, calibration, latency_model, refine_budget)
        points += [Point(spec.name, p.target, p.plan, p.seconds, p.error) for p in planned]
    return points


def _planner_points(model, spec: Spec, targets, calibration, latency_model, refine_budget) -> list[Planned]:
    """A planner's plans for every target: from its ``plan_targets`` if it offers one (a nested planner), else one
    call per target. It is given what its spec needs, and a preset's fixed options."""
    options: dict[str, Any] = dict(spec.defaults)
    if spec.data_driven:
        options["calibration"] = calibration
    if "latency" in spec.needs:
        options["latency_model"] = latency_model()
    plan_targets = spec.extra.get("plan_targets")
    if plan_targets is None:
        return plan_each(spec.target, model, targets, **options)
    if "refine_budget" in {option.name for option in spec.options}:
        options["refine_budget"] = refine_budget
    return plan_targets(model, targets, **options)


def _policy_points(model, spec: Spec, targets, calibration, latency_model, refine_budget) -> list[Planned]:
    """A policy per target: the share of token-MLPs the latency model says reaches the target decode speedup,
    calibrated on the calibration text (the policy then decides per token; its measured speed is what counts)."""
    latency = latency_model()
    planned = []
    for target in targets:
        start = time.perf_counter()
        try:
            ratio = skip_ratio_for_speedup(latency, latency.num_layers, target)
            policy = calibrate(model, spec.name, calibration, ratio)
            policy.provenance.update({"target_speedup": target, "name": spec.name})
            planned.append(Planned(target, policy, time.perf_counter() - start))
        except PlanError as exc:
            planned.append(Planned(target, None, time.perf_counter() - start, str(exc)))
    return planned


# how each kind of method makes its points
_POINTS = {PLANNERS.kind: _planner_points, POLICIES.kind: _policy_points}


# -- measuring and reporting ----------------------------------------------------------------------------------------
def evaluate_points(
    model: nn.Module,
    points: list[Point],
    eval_ids: torch.Tensor | dict[str, torch.Tensor],
    corpus_ids: torch.Tensor,
    *,
    context: int,
    stride: int,
    bench: BenchSettings,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Held-out perplexity (on each corpus of ``eval_ids``, by label; the first is the table's and the plot's) and
    measured decode speedup of every planned point, plus the full model's."""
    texts = eval_ids if isinstance(eval_ids, dict) else {"held-out": eval_ids}
    scores = {label: perplexity(model, ids, context=context, stride=stride).perplexity for label, ids in texts.items()}
    full_ppl = next(iter(scores.values()))
    rows = []
    for point in points:
        row = {"method": point.method, "target": point.target, "seconds_to_plan": point.seconds_to_plan,
               "error": point.error}
        if point.plan is not None:
            if progress:
                progress(f"evaluating {point.method} @ {point.target}")
            with apply(model, point.plan.teacher_forced(), check_model=False):
                row["perplexities"] = {label: perplexity(model, ids, context=context, stride=stride).perplexity
                                       for label, ids in texts.items()}
            row["perplexity"] = next(iter(row["perplexities"].values()))
            speed = run_bench([Config("full", model), Config("plan", model, point.plan)], corpus_ids, bench)
            row["decode_speedup"] = speed["plan"]["decode_b1"]["speedup"]
            row["decode_speedup_ci95"] = speed["plan"]["decode_b1"]["speedup_ci95"]
            ideal = ideal_speedups(model, point.plan)  # None: it decides per input; its ideal was measured
            row["ideal_speedup"] = speed["plan"]["decode_b1"]["ideal_speedup"] if ideal is None else ideal[0]
            row["plan"] = point.plan.describe()
            row["plan_json"] = point.plan.to_json()
            if is_healed(point.plan):
                row["healed"] = True  # a heal folder's point: its own series and frontier on the plot
        rows.append(row)
    return {"full_perplexity": full_ppl, "full_perplexities": scores, "points": rows}


def corpora_table(result: dict) -> tuple[list[str], list[list[str]]] | None:
    """Every point's held-out perplexity on every corpus, as a multiple of the full model's (None: one corpus)."""
    full = result.get("full_perplexities") or {}
    if len(full) < 2:
        return None
    headers = ["method", "target", *[f"{label}: ppl (x full)" for label in full]]
    rows = [["full model", "", *[f"{value:.2f} (1.00x)" for value in full.values()]]]
    for row in result["points"]:
        if "perplexities" in row:
            rows.append([row["method"], f"{row['target']:g}x", *[
                f"{row['perplexities'][label]:.2f} ({row['perplexities'][label] / full[label]:.2f}x)" for label in full]])
    return headers, rows


def held_out_texts(tokenizer, corpora: list[str], tokens: int, calibration_corpus: str,
                   calibration_tokens: int) -> dict[str, torch.Tensor]:
    """``tokens`` tokens of each corpus, by label; the calibration corpus is scored on the tokens after the
    calibration text (so it is held out too: in-domain beside the other corpora's out-of-domain)."""
    texts = {}
    for corpus in corpora:
        skip = calibration_tokens if corpus == calibration_corpus else 0
        label = corpus_label(corpus) + (f" (after the {skip} calibration tokens)" if skip else "")
        texts[label] = tokenize_corpus(tokenizer, load_corpus(corpus), skip + tokens)[skip:]
    return texts


def pareto_table(result: dict, targets: list[float]) -> tuple[list[str], list[list[str]]]:
    """Rows: methods, then heal folders; columns: targets (and any healed point's other target); cells: held-out
    perplexity (measured decode speedup)."""
    targets = sorted({*targets, *(row["target"] for row in result["points"] if row.get("healed"))})
    headers = ["method"] + [f"target {t:g}x: ppl (measured speedup)" for t in targets]
    by_method: dict[str, dict[float, dict]] = {}
    for row in result["points"]:
        by_method.setdefault(row["method"], {})[row["target"]] = row
    rows = [["full model", *[f"{result['full_perplexity']:.2f} (1.00x)"] * len(targets)]]
    for method, cells in by_method.items():
        rendered = []
        for target in targets:
            row = cells.get(target, {})
            if "perplexity" in row:
                rendered.append(f"{row['perplexity']:.2f} ({row['decode_speedup']:.2f}x)")
            else:
                rendered.append(f"— ({row.get('error') or 'not run'})"[:60])
        rows.append([method, *rendered])
    return headers, rows


def run_compare(model: nn.Module, tokenizer, methods: list[str], targets: list[float], *, model_name: str,
                calibration_corpus: str = "gsm8k", eval_corpus: str | list[str] = ("pydoc", "gsm8k"),
                sequences: int = 1, length: int = 1024,
                tokens: int = 4096, context: int = 1024, stride: int = 512, repeats: int = 5, new_tokens: int = 32,
                device: str = "cpu", command: str | None = None, healed: dict[str, Skipper] | None = None,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """`skiplm compare`: plan every method at every target on ``calibration_corpus`` and measure each plan's held-out
    perplexity on each ``eval_corpus`` (the first is the table's and the plot's; the calibration corpus, if listed, is
    scored after the calibration text) and its decode speedup; returns the result :func:`write_compare` writes.
    ``healed``: heal folders by name (:func:`skiplm.heal.load_healed`), each measured as one more point (``"healed":
    true``) at :func:`~.measurements.healed_target`."""
    method_spec_list = [method_spec(method) for method in methods]  # unknown names fail before anything runs
    calibration = load_calibration(tokenizer, calibration_corpus, sequences, length, model=model)
    corpora = [eval_corpus] if isinstance(eval_corpus, str) else list(eval_corpus)
    eval_ids = held_out_texts(tokenizer, corpora, tokens, calibration_corpus, sequences * length)
    corpus_ids = tokenize_corpus(tokenizer, load_corpus("gsm8k"), 4096)
    bench = BenchSettings(batch_sizes=(1,), decode_prompt_tokens=64, new_tokens=new_tokens, repeats=repeats, warmup=1)
    started = time.perf_counter()
    points = make_plans(model, [spec.name for spec in method_spec_list], targets, calibration, progress=progress)
    points += [Point(name, healed_target(model, skipper), skipper, 0.0) for name, skipper in (healed or {}).items()]
    result = evaluate_points(model, points, eval_ids, corpus_ids, context=context, stride=stride, bench=bench,
                             progress=progress)
    result.update({
        "kind": "planner-comparison",
        "command": command,
        "model": model_name,
        "machine": machine_info(device),
        "settings": {"methods": list(methods), "targets": list(targets), "calibration": corpus_label(calibration_corpus),
                     "calibration_tokens": sequences * length, "eval": next(iter(eval_ids)), "eval_corpora": list(eval_ids),
                     "eval_tokens": tokens, "context": context, "stride": stride,
                     "timing": dataclasses.asdict(bench), "sequences": sequences, "length": length},
        "seconds": time.perf_counter() - started,
    })
    return result


def _corpora_section(result: dict[str, Any]) -> str:
    table = corpora_table(result)
    if table is None:
        return ""
    return ("\n## Held-out perplexity on every corpus\n\nA plan that holds up on one corpus and not on another "
            "over-fits a domain.\n\n" + markdown_table(*table))


def highlighted_methods() -> list[str]:
    """The methods a plot draws bold: those whose spec asks for it (skiplm's own ``search``)."""
    return [spec.name for spec in PLANNERS if spec.extra.get("highlight")]


def write_compare(result: dict[str, Any], out: str | Path) -> str:
    """``compare.json``, ``compare.md`` (the table, with what was measured how) and ``pareto.png`` in ``out``;
    returns the markdown table."""
    out = Path(out)
    s = result["settings"]
    write_json(out / RESULT_JSON, result)
    table = markdown_table(*pareto_table(result, s["targets"]))
    timing = s["timing"]
    write_text(
        out / RESULT_MARKDOWN,
        f"# Planners compared, {result['model']}\n\nCalibration: {s['sequences']} x {s['length']} tokens of "
        f"{s['calibration']}. Held-out perplexity: {s['eval_tokens']} tokens of {s['eval']}, context "
        f"{s['context']}, stride {s['stride']}. Measured decode speedup: batch 1, {timing['new_tokens']} steps, paired "
        f"with the full model over {timing['repeats']} rounds. Targets are each method's own (ideal by the cost "
        "model; `search`: predicted by its measured latency model)."
        + (" Heal folders (healed): at the target their plan was made for, else its ideal speedup."
           if any(row.get("healed") for row in result["points"]) else "")
        + "\n\n" + table + f"\n![pareto]({RESULT_PLOT})\n" + _corpora_section(result))
    plot_pareto(result, out / RESULT_PLOT, f"{result['model']}: held-out perplexity vs measured decode speedup",
                highlight=highlighted_methods())
    return table


__all__ = ["Point", "corpora_table", "default_methods", "held_out_texts", "evaluate_points", "highlighted_methods", "is_data_driven", "make_plans",
           "method_names", "method_spec", "pareto_table", "run_compare", "write_compare"]
