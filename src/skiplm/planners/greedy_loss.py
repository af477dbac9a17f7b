"""SLEB (Song et al. 2024, "SLEB: Streamlining LLMs through Redundancy Verification and Elimination of Transformer
Blocks"): greedy block removal by calibration loss.

Each step removes the block whose removal — on top of the blocks already removed — gives the lowest next-token loss
on the calibration text (:func:`skiplm.analysis.metrics.skip_effect`), so the redundancy of a block is judged in the pruned
model it will live in. Cost: step s tries every one of the L - s remaining blocks, one forward pass over the
calibration text each — O(L^2) passes in all — hence a small default calibration set (4 x 128 tokens; the paper uses
128 x 2048) and a ``progress`` callback. Layer protection: none, as in the paper; a plan keeps at least one block.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import PlanError
from ..analysis.metrics import next_token_loss, skip_effect
from ..plan import SkipPlan
from ..registry import PLANNERS
from .common import (Planned, Planning, Progress, Target, Unit, count_layers, make_plan, max_units, prefixes, rounded,
                     select, skip_set)

METHOD = "greedy-loss"


@torch.inference_mode()
def _full_logits(model: nn.Module, batches) -> torch.Tensor:
    device = next(model.parameters()).device
    logits = [model(ids.to(device), use_cache=False).logits for ids in batches]
    return torch.cat([out.reshape(-1, out.shape[-1]).float().cpu() for out in logits])


def plan_greedy_loss(model: nn.Module, *, speedup: float | None = None, skip: int | None = None,
                     prefill: str = "same", name: str | None = None, calibration=None,
                     progress: Progress | None = None) -> SkipPlan:
    """Remove blocks one at a time, each the one whose removal raises calibration loss least.

    ``calibration``: [1, T] token-id batches, T >= 2 (:func:`skiplm.planners.load_calibration`);
    ``progress(done, total)``: after each forward pass (total: an upper bound for a speedup target).
    """
    job = Planning.start(model, METHOD, speedup=speedup, skip=skip, prefill=prefill, name=name,
                         calibration=calibration, progress=progress, min_length=2)
    batches, num_layers = job.batches, job.num_layers
    pool: list[Unit] = [("block", layer) for layer in range(num_layers)]
    limit = num_layers - 1
    steps = max_units(model, job.target, pool, limit)
    total = 1 + sum(num_layers - s for s in range(steps))
    history: list[dict] = []
    baseline: list[float] = []
    done = 0

    def sequence():  # runs only once select() has checked that the target is in reach
        nonlocal done
        reference = _full_logits(model, batches)
        baseline.append(next_token_loss(reference, batches))
        done = 1
        if progress:
            progress(done, total)
        removed: list[int] = []
        yield []
        while len(removed) < limit:
            trials = {}
            for layer in range(num_layers):
                if layer in removed:
                    continue
                trials[layer] = skip_effect(model, batches, skip_set(("block", b) for b in [*removed, layer]), reference)
                done += 1
                if progress:
                    progress(done, total)
            best = min(trials, key=lambda layer: (trials[layer]["loss"], layer))
            removed.append(best)
            history.append({
                "block": best, "loss": rounded([trials[best]["loss"]])[0], "kl": rounded([trials[best]["kl"]])[0],
                "candidate_loss": rounded([trials[layer]["loss"] if layer in trials else None
                                           for layer in range(num_layers)]),
            })
            yield [("block", b) for b in removed]

    units = job.select(sequence(), pool=pool, limit=limit, what="blocks but one (a plan keeps at least one)")
    return job.plan(units, protection="none: any block may be removed, as in the paper",
                    order=[layer for _, layer in units], baseline_loss=rounded(baseline)[0] if baseline else None,
                    steps=history[: len(units)])


def cut_plan(model: nn.Module, plan: SkipPlan, speedup: float) -> SkipPlan:
    """The greedy-loss plan for a smaller ``speedup`` target, cut from ``plan`` (one made for a larger target).

    Each removal depends only on the removals before it, so the plan for a smaller target is a prefix of a larger
    target's removal order: the same plan as running :func:`plan_greedy_loss` again, without its forward passes.
    """
    record = plan.provenance
    if record.get("method") != METHOD:
        raise PlanError(f"only a {METHOD} plan can be cut to a smaller target, this one is {record.get('method')!r}.")
    target = Target.of(speedup, None)
    num_layers = count_layers(model)
    order = [("block", layer) for layer in record["order"]]
    units = select(model, target, prefixes(order), pool=[("block", layer) for layer in range(num_layers)],
                   limit=len(order), what="blocks of the larger plan")
    rebuilt = ("method", "target", "prefill", "order", "steps", "created", "skiplm_version")
    fields = {key: value for key, value in record.items() if key not in rebuilt}
    return make_plan(
        model, units, method=METHOD, target=target, prefill=record.get("prefill", "same"),
        name=plan.model.name if plan.model else None, **fields,
        order=[layer for _, layer in units], steps=record["steps"][: len(units)],
    )


def plan_targets(model: nn.Module, targets: Sequence[float], **options) -> list[Planned]:
    """Greedy removal is nested: plan once for the largest reachable target and cut that plan for the others
    (every target's ``seconds`` is that one run's)."""
    planned: dict[float, Planned] = {}
    largest, seconds = None, 0.0
    for target in sorted(targets, reverse=True):
        start = time.perf_counter()
        try:
            if largest is None:
                largest = plan_greedy_loss(model, speedup=target, **options)
                seconds = time.perf_counter() - start
                planned[target] = Planned(target, largest, seconds)
            else:
                planned[target] = Planned(target, cut_plan(model, largest, target), seconds)
        except PlanError as exc:
            planned[target] = Planned(target, None, time.perf_counter() - start, str(exc))
    return [planned[target] for target in targets]


PLANNERS.register(METHOD, paper="Song et al. 2024, SLEB (greedy removal by calibration loss)", needs={"calibration"},
                  calibration=(4, 128), nested=True, extra={"plan_targets": plan_targets},
                  summary="removes blocks one at a time, each the one that raises calibration loss least")(
    plan_greedy_loss)
