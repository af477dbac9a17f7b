"""``search``: skiplm's own planner — any mix of attention and MLP sublayers, chosen for a *measured* speedup at the
least loss of quality.

1. A latency model of a decode step is measured on this device (:class:`~skiplm.latency.LatencyModel`): what
   skipping one attention or one MLP sublayer actually saves, and the fixed cost nothing removes.
2. A greedy search with re-scoring: at every step each candidate — one attention or MLP sublayer, or a whole block
   (which saves more than its halves: norms, adds and call overhead go too) — is scored *on top of what is already
   chosen* by the increase in KL(full model || planned model) on calibration text per second it saves, and the best
   is added. Scores from the previous step order the candidates, and only the most promising ``candidates`` are
   re-scored (all of them on the first step), which keeps the search to minutes.
3. It stops at the target: a measured speedup (by the latency model), a step latency, or a quality budget (the
   largest mean KL allowed).

Unlike ranking by a proxy once (cosine similarity, Block Influence), every choice is judged by its effect on the
model's output distribution given everything skipped before it, and by its real cost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from ..activations import trace_residuals
from ..adapters import count_layers
from ..errors import PlanError
from ..latency import LatencyModel
from ..metrics import skip_effect
from ..plan import PARTS, SkipPlan, SkipSet, model_identity, provenance
from .common import calibrated


@dataclasses.dataclass(frozen=True)
class SearchStep:
    layer: int
    part: str  # "attention", "mlp" or "block"
    kl: float  # mean KL to the full model after this step
    speedup: float  # by the latency model


def search_path(
    model: nn.Module,
    calibration: list[torch.Tensor],
    latency: LatencyModel,
    *,
    stop: Callable[[SkipSet, float], bool],
    candidates: int = 12,
    blocks: bool = True,
    progress: Callable[[int, int | None], None] | None = None,
) -> list[SearchStep]:
    """Greedy choices until ``stop(skips, kl)`` is true (or nothing is left that leaves a layer running).
    ``blocks``: also consider skipping a whole block in one step."""
    reference = trace_residuals(model, calibration, keep_logits=True).logits
    num_layers = count_layers(model)
    skips, kl, path, evaluations = SkipSet(), 0.0, [], 0
    parts = (*PARTS, "block") if blocks else PARTS
    priority: dict[tuple[int, str], float] = {(layer, part): 0.0 for layer in range(num_layers) for part in parts}
    while not stop(skips, kl):
        remaining = sorted((c for c in priority if _open(skips, *c)), key=lambda c: priority[c])
        to_score = remaining if not path else remaining[:candidates]
        scored = {}
        for layer, part in to_score:
            trial = _with(skips, layer, part)
            saving = latency.step_s(skips) - latency.step_s(trial)
            if len(trial.blocks) == num_layers:
                continue
            trial_kl = skip_effect(model, calibration, trial, reference)["kl"]
            # KL added per second saved; among equal scores the larger saving first
            scored[(layer, part)] = ((trial_kl - kl) / saving if saving > 0 else float("inf"), -saving)
            priority[(layer, part)] = scored[(layer, part)][0]
            evaluations += 1
            if progress:
                progress(evaluations, None)  # forward passes so far; the total depends on where the target is met
        if not scored:
            break
        (layer, part) = min(scored, key=scored.get)
        skips = _with(skips, layer, part)
        kl = skip_effect(model, calibration, skips, reference)["kl"]
        path.append(SearchStep(layer, part, kl, latency.speedup(skips)))
    return path


@calibrated(sequences=2, length=512)  # long sequences: skipped attention hurts more the more context there is
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
    latency = latency_model or LatencyModel.measure(model)
    if latency_ms is not None and latency_ms * 1e-3 < latency.fixed_s:
        raise PlanError(f"a {latency_ms} ms step is out of reach: the unskippable part alone takes {latency.fixed_s * 1e3:.1f} ms.")
    stop = _stop_rule(latency, speedup=speedup, latency_ms=latency_ms, max_kl=max_kl, skip=skip)
    # a block is two sublayers: with a sublayer count as the target, choose sublayers one at a time
    path = search_path(model, calibration, latency, stop=stop, candidates=candidates, blocks=skip is None,
                       progress=progress)
    if max_kl is not None:  # the last step crossed the budget: leave it out
        path = [step for step in path if step.kl <= max_kl]
    if speedup is not None and latency.speedup(_skips_of(path)) < speedup:
        raise PlanError(
            f"a {speedup}x measured speedup is out of reach: the search stopped at "
            f"{latency.speedup(_skips_of(path)):.2f}x (every remaining choice would skip all layers)."
        )
    return plan_from_path(model, path, latency, targets, calibration, prefill=prefill, name=name)


def plan_from_path(model, path, latency, target, calibration, *, prefill="same", name=None) -> SkipPlan:
    """The plan made of the search steps ``path`` (a prefix of a longer search serves a smaller target)."""
    skips = _skips_of(path)
    return SkipPlan.from_layers(
        latency.num_layers,
        blocks=skips.blocks,
        attention=skips.attention,
        mlp=skips.mlp,
        prefill=prefill,
        model=model_identity(model, name),
        provenance=provenance(
            "search",
            target=target,
            latency_model=latency.to_json(),
            predicted_speedup=latency.speedup(skips),
            calibration_tokens=sum(ids.numel() for ids in calibration),
            path=[dataclasses.asdict(step) for step in path],
        ),
    )


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
