"""``search``: skiplm's own planner — any mix of attention and MLP sublayers, chosen for a *measured* speedup at the
least loss of quality.

1. A latency model of a decode step is measured on this device (:class:`~skiplm.measure.latency.LatencyModel`): what
   skipping one attention or one MLP sublayer actually saves, and the fixed cost nothing removes.
2. A greedy search with re-scoring: at every step each candidate — one attention or MLP sublayer, or a whole block
   (which saves more than its halves: norms, adds and call overhead go too) — is scored *on top of what is already
   chosen* by the increase in KL(full model || planned model) on calibration text per second it saves, and the best
   is added. Scores from the previous step order the candidates, and only the most promising ``candidates`` are
   re-scored (all of them on the first step), which keeps the search to minutes.
3. It stops at the target: a measured speedup (by the latency model), a step latency, or a quality budget (the
   largest mean KL allowed).
4. A local refinement (:func:`refine`) then repairs what a greedy path cut at a target gets wrong: a unit the target
   no longer needs is dropped, and a chosen unit is swapped for another where that lowers KL and keeps the target.

Unlike ranking by a proxy once (cosine similarity, Block Influence), every choice is judged by its effect on the
model's output distribution given everything skipped before it, and by its real cost.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..analysis.activations import trace_residuals
from ..models.adapters import count_layers
from ..errors import PlanError
from ..measure.latency import LatencyModel
from ..analysis.metrics import skip_effect
from ..plan import PARTS, SkipPlan, SkipSet, model_identity, provenance
from ..registry import PLANNERS, Option
from .common import Planned


@dataclasses.dataclass(frozen=True)
class SearchStep:
    layer: int
    part: str  # "attention", "mlp" or "block"
    kl: float  # mean KL to the full model after this step
    speedup: float  # by the latency model


Unit = tuple[int, str]  # (layer, "attention" | "mlp" | "block")


class KLScorer:
    """Mean KL(full model || planned model) per token on calibration text; the full model's logits are computed once.
    ``evaluations`` counts the forward passes over the calibration text; ``progress(evaluations, None)`` is called
    after each (the total depends on where the target is met)."""

    def __init__(self, model: nn.Module, calibration: list[torch.Tensor],
                 progress: Callable[[int, int | None], None] | None = None):
        self.model = model
        self.calibration = calibration
        self.reference = trace_residuals(model, calibration, keep_logits=True).logits
        self.num_layers = count_layers(model)
        self.evaluations = 0
        self.progress = progress

    def __call__(self, skips: SkipSet) -> float:
        kl = skip_effect(self.model, self.calibration, skips, self.reference)["kl"]
        self.evaluations += 1
        if self.progress:
            self.progress(self.evaluations, None)
        return kl


def search_path(
    scorer: KLScorer,
    latency: LatencyModel,
    *,
    stop: Callable[[SkipSet, float], bool],
    candidates: int = 12,
    blocks: bool = True,
    scores: dict[Unit, float] | None = None,
) -> list[SearchStep]:
    """Greedy choices until ``stop(skips, kl)`` is true (or nothing is left that leaves a layer running).
    ``blocks``: also consider skipping a whole block in one step. ``scores``: filled with each unit's latest score
    (KL added per second saved, on top of what was chosen when it was scored)."""
    num_layers = scorer.num_layers
    skips, kl, path = SkipSet(), 0.0, []
    parts = (*PARTS, "block") if blocks else PARTS
    priority = scores if scores is not None else {}
    priority.update({(layer, part): 0.0 for layer in range(num_layers) for part in parts})
    while not stop(skips, kl):
        remaining = sorted((c for c in priority if _open(skips, *c)), key=lambda c: priority[c])
        to_score = remaining if not path else remaining[:candidates]
        scored = {}
        for layer, part in to_score:
            trial = _with(skips, layer, part)
            saving = latency.step_s(skips) - latency.step_s(trial)
            if len(trial.blocks) == num_layers:
                continue
            trial_kl = scorer(trial)
            # KL added per second saved; among equal scores the larger saving first
            scored[(layer, part)] = ((trial_kl - kl) / saving if saving > 0 else float("inf"), -saving)
            priority[(layer, part)] = scored[(layer, part)][0]
        if not scored:
            break
        (layer, part) = min(scored, key=scored.get)
        skips = _with(skips, layer, part)
        kl = scorer(skips)
        path.append(SearchStep(layer, part, kl, latency.speedup(skips)))
    return path


def refine(
    scorer: KLScorer,
    skips: SkipSet,
    meets: Callable[[SkipSet], bool],
    scores: dict[Unit, float],
    *,
    kl: float | None = None,
    budget: int = 48,
    relieve: int = 3,
    candidates: int = 8,
) -> tuple[SkipSet, dict]:
    """Local improvement of a skip set that ``meets`` its target, judged by calibration KL, within ``budget``
    forward passes. Each round measures the set without each of its units; if one is not needed for the target, the
    cheapest such removal is taken; else the ``relieve`` units whose removal lowers KL most are each swapped for
    one of the ``candidates`` best-scored open units (``scores`` from :func:`search_path`) where the target is still
    met, and the best swap is taken if it lowers KL. Stops when a round finds nothing better.

    A greedy path adds one unit at a time and is cut where it first reaches a target, so the last unit may overshoot
    and an early choice may have been right only for the sets it was judged on; this repairs both.
    Returns the set and a record of what changed."""
    start_evaluations = scorer.evaluations
    kl = scorer(skips) if kl is None else kl
    record = {"kl_before": kl, "removed": [], "swaps": []}
    while scorer.evaluations - start_evaluations < budget:
        units = _units(skips)
        without = {u: scorer(_without(skips, u)) for u in units}
        removable = [u for u in units if meets(_without(skips, u)) and without[u] < kl]
        if removable:
            unit = min(removable, key=without.get)
            skips, kl = _without(skips, unit), without[unit]
            record["removed"].append(list(unit))
            continue
        best: tuple[float, Unit, Unit, SkipSet] | None = None
        for old in sorted(units, key=without.get)[:relieve]:
            base = _without(skips, old)
            opened = sorted((u for u in scores if u != old and u not in units and _open(base, *u)),
                            key=lambda u: scores[u])
            tried = 0
            for new in opened:
                trial = _with(base, *new)
                if tried == candidates or scorer.evaluations - start_evaluations >= budget:
                    break
                if len(trial.blocks) == scorer.num_layers or not meets(trial):
                    continue
                tried += 1
                trial_kl = scorer(trial)
                if trial_kl < kl and (best is None or trial_kl < best[0]):
                    best = (trial_kl, old, new, trial)
        if best is None:
            break
        kl, old, new, skips = best
        record["swaps"].append([list(old), list(new)])
    record.update(kl_after=kl, evaluations=scorer.evaluations - start_evaluations)
    return skips, record


def plan_search(
    model: nn.Module,
    *,
    calibration: list[torch.Tensor] | None = None,
    speedup: float | None = None,
    latency_ms: float | None = None,
    max_kl: float | None = None,
    skip: int | None = None,
    latency_model: LatencyModel | None = None,
    candidates: int = 12,
    refine_budget: int = 48,
    prefill: str = "same",
    name: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> SkipPlan:
    """Plan for a measured ``speedup``, a step ``latency_ms``, a quality budget ``max_kl``, or ``skip`` sublayers."""
    targets = {k: v for k, v in dict(speedup=speedup, latency_ms=latency_ms, max_kl=max_kl, skip=skip).items() if v is not None}
    if len(targets) != 1:
        raise PlanError("search needs exactly one target: --speedup X, --latency-ms T, --max-kl K or --skip N.")
    if not calibration:
        raise PlanError("search needs calibration text: pass calibration=[token-id batches] (the CLI builds it from --corpus).")
    if speedup is not None and speedup <= 1.0:
        raise PlanError(f"target speedup must be greater than 1, got {speedup}.")
    if latency_model is None:
        _phase(progress, "measuring the latency model")
    latency = latency_model or LatencyModel.measure(model)
    if latency_ms is not None and latency_ms * 1e-3 < latency.fixed_s:
        raise PlanError(f"a {latency_ms} ms step is out of reach: the unskippable part alone takes {latency.fixed_s * 1e3:.1f} ms.")
    stop = _stop_rule(latency, speedup=speedup, latency_ms=latency_ms, max_kl=max_kl, skip=skip)
    _phase(progress, "the full model's reference logits")
    scorer, scores = KLScorer(model, calibration, progress), {}
    _phase(progress, "search path (forward passes, total unknown until the target is met)")
    # a block is two sublayers: with a sublayer count as the target, choose sublayers one at a time
    path = search_path(scorer, latency, stop=stop, candidates=candidates, blocks=skip is None, scores=scores)
    if max_kl is not None:  # the last step crossed the budget: leave it out
        path = [step for step in path if step.kl <= max_kl]
    if speedup is not None and latency.speedup(_skips_of(path)) < speedup:
        raise PlanError(
            f"a {speedup}x measured speedup is out of reach: the search stopped at "
            f"{latency.speedup(_skips_of(path)):.2f}x (every remaining choice would skip all layers)."
        )
    # refinement keeps a target of speed or size met; a quality budget is met by the path as cut
    meets = None if max_kl is not None else (lambda skips: stop(skips, 0.0))
    _phase(progress, f"refining (at most {refine_budget} forward passes)")
    return plan_from_search(scorer, path, latency, targets, scores=scores, meets=meets, refine_budget=refine_budget,
                            prefill=prefill, name=name)


def plan_from_search(scorer: KLScorer, path: list[SearchStep], latency: LatencyModel, target: dict, *,
                     scores: dict[Unit, float] | None = None, meets: Callable[[SkipSet], bool] | None = None,
                     refine_budget: int = 0, prefill: str = "same", name: str | None = None) -> SkipPlan:
    """The plan made of the search steps ``path`` (a prefix of a longer search serves a smaller target), improved
    by :func:`refine` within ``refine_budget`` forward passes when ``meets`` (the target test) is given."""
    skips, refinement = _skips_of(path), None
    if meets is not None and refine_budget > 0 and path:
        skips, refinement = refine(scorer, skips, meets, scores or {}, kl=path[-1].kl, budget=refine_budget)
    return SkipPlan.from_layers(
        latency.num_layers,
        blocks=skips.blocks,
        attention=skips.attention,
        mlp=skips.mlp,
        prefill=prefill,
        model=model_identity(scorer.model, name),
        provenance=provenance(
            "search",
            target=target,
            latency_model=latency.to_json(),
            predicted_speedup=latency.speedup(skips),
            calibration_tokens=sum(ids.numel() for ids in scorer.calibration),
            path=[dataclasses.asdict(step) for step in path],
            refinement=refinement,
        ),
    )


def plan_targets(model: nn.Module, targets: Sequence[float], *, calibration: list[torch.Tensor],
                 latency_model: LatencyModel | None = None, candidates: int = 12, refine_budget: int = 48,
                 prefill: str = "same", name: str | None = None) -> list[Planned]:
    """A plan per target speedup from one search: the path is searched once, to the largest target, and each target
    takes the shortest prefix that reaches it, refined within ``refine_budget`` forward passes (its ``seconds``: the
    one search's, plus its own refinement)."""
    latency = latency_model or LatencyModel.measure(model)
    start = time.perf_counter()
    scorer, scores = KLScorer(model, calibration), {}
    path = search_path(scorer, latency, stop=lambda skips, kl: latency.speedup(skips) >= max(targets),
                       candidates=candidates, scores=scores)
    path_seconds = time.perf_counter() - start  # of the one run that serves every target
    planned = []
    for target in targets:
        prefix = prefix_for_speedup(path, target)
        if prefix is None:
            planned.append(Planned(target, None, path_seconds, "unreachable"))
            continue
        start = time.perf_counter()
        plan = plan_from_search(scorer, prefix, latency, {"speedup": target}, scores=scores,
                                meets=lambda skips, t=target: latency.speedup(skips) >= t,
                                refine_budget=refine_budget, prefill=prefill, name=name)
        planned.append(Planned(target, plan, path_seconds + time.perf_counter() - start))
    return planned


PLANNERS.register(
    "search", paper="skiplm's own (no paper): a KL-greedy search for a measured speedup", nested=True,
    needs={"calibration", "latency"}, calibration=(1, 1024),  # long: skipped attention hurts more with more context
    summary="any mix of attention and MLP sublayers, chosen for a measured speedup at the least KL to the full model",
    options=[Option("latency_ms", float, None, "target decode step time on this device (ms), instead of a speedup"),
             Option("max_kl", float, None, "quality budget: the largest mean KL to the full model allowed"),
             Option("candidates", int, 12, "units re-scored per step"),
             Option("refine_budget", int, 48, "forward passes of the local refinement")],
    extra={"plan_targets": plan_targets, "highlight": True})(plan_search)


def _phase(progress, name: str) -> None:
    """Tell a ``progress`` callback that has a ``phase(name)`` method which phase runs now (the ``(done, None)`` calls
    carry no total); a plain callable is left alone."""
    announce = getattr(progress, "phase", None)
    if callable(announce):
        announce(name)


def prefix_for_speedup(path: list[SearchStep], speedup: float) -> list[SearchStep] | None:
    """The shortest prefix of a search path that reaches ``speedup`` by the latency model, or None."""
    for count, step in enumerate(path, start=1):
        if step.speedup >= speedup:
            return path[:count]
    return None


def _skips_of(path: list[SearchStep]) -> SkipSet:
    skips = SkipSet()
    for step in path:
        skips = _with(skips, step.layer, step.part)
    return skips


def _stop_rule(latency: LatencyModel, *, speedup, latency_ms, max_kl, skip) -> Callable[[SkipSet, float], bool]:
    if speedup is not None:
        return lambda skips, kl: latency.speedup(skips) >= speedup
    if latency_ms is not None:
        return lambda skips, kl: latency.step_s(skips) * 1e3 <= latency_ms
    if max_kl is not None:
        return lambda skips, kl: kl > max_kl
    return lambda skips, kl: len(skips.attention) + len(skips.mlp) >= skip


def _units(skips: SkipSet) -> list[Unit]:
    """A skip set as units: whole blocks, then the attention and MLP sublayers of other layers."""
    blocks = set(skips.blocks)
    return ([(layer, "block") for layer in sorted(blocks)]
            + [(layer, "attention") for layer in sorted(skips.attention - blocks)]
            + [(layer, "mlp") for layer in sorted(skips.mlp - blocks)])


def _without(skips: SkipSet, unit: Unit) -> SkipSet:
    layer, part = unit
    attention = skips.attention - {layer} if part in ("attention", "block") else skips.attention
    mlp = skips.mlp - {layer} if part in ("mlp", "block") else skips.mlp
    return SkipSet(attention, mlp)


def _open(skips: SkipSet, layer: int, part: str) -> bool:
    """Whether choosing (layer, part) adds something: a block only while neither of its halves is skipped."""
    if part == "block":
        return layer not in skips.attention and layer not in skips.mlp
    return not skips.skips(layer, part)


def _with(skips: SkipSet, layer: int, part: str) -> SkipSet:
    if part == "block":
        return SkipSet(skips.attention | {layer}, skips.mlp | {layer})
    if part == "attention":
        return SkipSet(skips.attention | {layer}, skips.mlp)
    return SkipSet(skips.attention, skips.mlp | {layer})
