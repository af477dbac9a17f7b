"""Planners side by side: for each method and target, the plan, its held-out perplexity and its measured decode
speedup against the full model — one run, one machine, one JSON + markdown table + Pareto plot.

Calibration text (for the data-driven planners) and evaluation text are different corpora (by default GSM8K and
pydoc), so no planner is scored on the text it was fitted to. Speed is decode at batch 1, each plan paired with the
full model round by round (see :mod:`skiplm.measure.speed`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
from torch import nn

from ..measure.speed import BenchSettings, Config, run_bench
from ..measure.costs import CostModel
from ..errors import PlanError
from ..measure.perplexity import perplexity
from ..measure.latency import LatencyModel
from ..plan import SkipPlan
from ..planners import get_planner
from ..planners.greedy_loss import cut_plan
from ..planners.search import KLScorer, plan_from_search, prefix_for_speedup, search_path
from ..policies.core import is_policy
from ..skipper import apply

# name -> (planner, options)
METHODS: dict[str, tuple[str, dict]] = {
    "uniform": ("uniform", {}),
    "block-influence": ("block-influence", {}),
    "angular": ("angular", {}),
    "similarity-block": ("similarity", {"unit": "block"}),
    "similarity-attention": ("similarity", {"unit": "attention"}),
    "similarity-mlp": ("similarity", {"unit": "mlp"}),
    "similarity-joint": ("similarity", {"unit": "joint"}),
    "greedy-loss": ("greedy-loss", {}),
    "search": ("search", {}),
}
# Input-adaptive policies (skiplm.policies), calibrated per target: name -> (policy method, settings)
POLICY_METHODS: dict[str, tuple[str, dict]] = {
    "ffn-skip": ("ffn-skip", {}),
    "lac": ("lac", {"parts": "layer"}),
    "lac-mlp": ("lac", {"parts": "mlp"}),
}


@dataclasses.dataclass
class Point:
    method: str
    target: float
    plan: SkipPlan | None
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
    """One plan per (method, target). ``search`` and ``greedy-loss`` choose nested sets, so each runs once, to the
    largest target, and is cut for the others (``seconds_to_plan`` is that one run's; for ``search``, plus the
    refinement of that target's cut, within ``refine_budget`` forward passes)."""
    points = []
    for method in methods:
        if method not in METHODS and method not in POLICY_METHODS:
            raise PlanError(f"unknown method {method!r}; available: {', '.join([*METHODS, *POLICY_METHODS])}.")
        if progress:
            progress(f"planning: {method}")
        if method in POLICY_METHODS:
            latency = latency or LatencyModel.measure(model)
            points += _policy_points(model, method, targets, calibration, latency)
            continue
        if method == "search":
            latency = latency or LatencyModel.measure(model)
            start = time.perf_counter()
            scorer, scores = KLScorer(model, calibration), {}
            path = search_path(scorer, latency, stop=lambda skips, kl: latency.speedup(skips) >= max(targets),
                               scores=scores)
            path_seconds = time.perf_counter() - start  # of the one run that serves every target
            for target in targets:
                prefix = prefix_for_speedup(path, target)
                if prefix is None:
                    points.append(Point(method, target, None, path_seconds, "unreachable"))
                    continue
                start = time.perf_counter()
                plan = plan_from_search(scorer, prefix, latency, {"speedup": target}, scores=scores,
                                        meets=lambda skips, t=target: latency.speedup(skips) >= t,
                                        refine_budget=refine_budget, name="search")
                points.append(Point(method, target, plan, path_seconds + time.perf_counter() - start))
            continue
        planner_name, options = METHODS[method]
        planner = get_planner(planner_name)
        if getattr(planner, "calibration_defaults", None) is not None:  # data-driven planners
            options = {**options, "calibration": calibration}
        if method == "greedy-loss":
            points += _greedy_loss_points(model, planner, targets, options)
            continue
        for target in targets:
            start = time.perf_counter()
            try:
                plan = planner(model, speedup=target, **options)
                points.append(Point(method, target, plan, time.perf_counter() - start))
            except PlanError as exc:
                points.append(Point(method, target, None, time.perf_counter() - start, str(exc)))
    return points


def _policy_points(model, method, targets, calibration, latency: LatencyModel) -> list[Point]:
    """A policy per target: the share of token-MLPs the latency model says reaches the target decode speedup,
    calibrated on the calibration text (the policy then decides per token; its measured speed is what counts)."""
    from ..policies.core import calibrate, skip_ratio_for_speedup

    policy_method, settings = POLICY_METHODS[method]
    points = []
    for target in targets:
        start = time.perf_counter()
        try:
            ratio = skip_ratio_for_speedup(latency, latency.num_layers, target)
            policy = calibrate(model, policy_method, calibration, ratio, **settings)
            policy.provenance.update({"target_speedup": target, "name": method})
            points.append(Point(method, target, policy, time.perf_counter() - start))
        except PlanError as exc:
            points.append(Point(method, target, None, time.perf_counter() - start, str(exc)))
    return points


def _greedy_loss_points(model, planner, targets, options) -> list[Point]:
    """Greedy removal is nested: plan once for the largest reachable target and cut that plan for the others."""
    points: dict[float, Point] = {}
    largest, seconds = None, 0.0
    for target in sorted(targets, reverse=True):
        start = time.perf_counter()
        try:
            if largest is None:
                largest = planner(model, speedup=target, **options)
                seconds = time.perf_counter() - start
                points[target] = Point("greedy-loss", target, largest, seconds)
            else:
                points[target] = Point("greedy-loss", target, cut_plan(model, largest, target), seconds)
        except PlanError as exc:
            points[target] = Point("greedy-loss", target, None, time.perf_counter() - start, str(exc))
    return [points[target] for target in targets]


def evaluate_points(
    model: nn.Module,
    points: list[Point],
    eval_ids: torch.Tensor,
    corpus_ids: torch.Tensor,
    *,
    context: int,
    stride: int,
    bench: BenchSettings,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Held-out perplexity and measured decode speedup of every planned point, plus the full model's."""
    full_ppl = perplexity(model, eval_ids, context=context, stride=stride).perplexity
    costs = CostModel.from_parameter_counts(model)
    rows = []
    for point in points:
        row = {"method": point.method, "target": point.target, "seconds_to_plan": point.seconds_to_plan,
               "error": point.error}
        if point.plan is not None:
            if progress:
                progress(f"evaluating {point.method} @ {point.target}")
            with apply(model, point.plan.teacher_forced(), check_model=False):
                row["perplexity"] = perplexity(model, eval_ids, context=context, stride=stride).perplexity
            speed = run_bench([Config("full", model), Config("plan", model, point.plan)], corpus_ids, bench)
            row["decode_speedup"] = speed["plan"]["decode_b1"]["speedup"]
            row["decode_speedup_ci95"] = speed["plan"]["decode_b1"]["speedup_ci95"]
            row["ideal_speedup"] = (speed["plan"]["decode_b1"]["ideal_speedup"] if is_policy(point.plan)
                                    else costs.ideal_speedup(point.plan.decode))
            row["plan"] = point.plan.describe()
            row["plan_json"] = point.plan.to_json()
        rows.append(row)
    return {"full_perplexity": full_ppl, "points": rows}


def pareto_table(result: dict, targets: list[float]) -> tuple[list[str], list[list[str]]]:
    """Rows: methods; columns: targets; cells: held-out perplexity (measured decode speedup)."""
    headers = ["method"] + [f"target {t}x: ppl (measured speedup)" for t in targets]
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


def plot_pareto(result: dict, path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_method: dict[str, list[dict]] = {}
    for row in result["points"]:
        if "perplexity" in row:
            by_method.setdefault(row["method"], []).append(row)
    for method, rows in by_method.items():
        rows.sort(key=lambda r: r["target"])  # in target order: measured speedups are noisy
        ax.plot([r["decode_speedup"] for r in rows], [r["perplexity"] for r in rows], marker="o",
                linewidth=2.5 if method == "search" else 1, label=method)
    ax.scatter([1.0], [result["full_perplexity"]], marker="*", s=150, color="black", label="full model", zorder=3)
    ax.set_yscale("log")
    ax.set_xlabel("measured decode speedup, batch 1 (x)")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
