"""LLM-Drop (He et al. 2024, "What Matters in Transformers? Not All Attention is Needed").

A unit whose output is most similar to its input, cos(X, X + F(X)) averaged over calibration tokens
(:func:`skiplm.analysis.metrics.cosine_similarity`), changes the representation least and is dropped first. ``unit``:

* ``attention`` — Attention Drop: attention sublayers only (the paper's recommendation: many can go cheaply);
* ``mlp`` — MLP Drop; ``block`` — Block Drop (one-shot, this is ShortGPT's ranking);
* ``joint`` — Joint Layer Drop: attention and MLP sublayers ranked together by the same score.

One-shot ranks every unit once on the full model. ``iterative=True`` drops one unit at a time and re-scores the rest
with the units dropped so far skipped (the model is traced under the partial plan). Layer protection: none, as in
the paper — any unit may be dropped; a plan keeps at least one block running.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ..errors import PlanError
from ..analysis.metrics import cosine_similarity
from ..plan import SkipPlan
from ..registry import PLANNERS, Option
from .common import Planning, Progress, Unit, max_units, prefixes, rounded, trace, unit_label

UNITS = ("attention", "mlp", "block", "joint")
_PARTS = {"attention": ("attention",), "mlp": ("mlp",), "block": ("block",), "joint": ("attention", "mlp")}
_WHAT = {"attention": "attention sublayers", "mlp": "MLP sublayers", "block": "blocks but one",
         "joint": "sublayers but one"}


def _scores(residuals, parts) -> dict[Unit, float]:
    return {(part, layer): value
            for part in parts for layer, value in enumerate(cosine_similarity(residuals, part).tolist())}


def _most_similar(scores: dict[Unit, float], exclude=()) -> list[Unit]:
    """Units by decreasing similarity (ties: lower layer first, attention before MLP)."""
    return sorted((u for u in scores if u not in exclude), key=lambda u: (-scores[u], u[1], u[0]))


@PLANNERS.register(
    "similarity", paper="He et al. 2024, What Matters in Transformers? Not All Attention is Needed (LLM-Drop)",
    needs={"calibration"}, calibration=(8, 256),
    summary="the units whose output is most similar to their input (LLM-Drop)",
    options=[Option("unit", str, "block", "attention, mlp, block or joint (attention and MLP ranked together)",
                    choices=UNITS),
             Option("iterative", bool, False, "re-score the remaining units after each drop")])
def plan_similarity(model: nn.Module, *, speedup: float | None = None, skip: int | None = None, prefill: str = "same",
                    name: str | None = None, calibration=None, unit: str = "block", iterative: bool = False,
                    progress: Progress | None = None) -> SkipPlan:
    """Drop the ``skip`` most input/output-similar units (or as many as an ideal ``speedup`` needs).

    ``unit``: attention, mlp, block or joint (``skip`` then counts sublayers for attention / mlp / joint);
    ``iterative``: re-score after each drop; ``calibration``: [1, T] token-id batches
    (:func:`skiplm.planners.load_calibration`); ``progress(done, total)`` after each pass over the calibration text.
    """
    if unit not in UNITS:
        raise PlanError(f"unknown unit {unit!r} for the similarity planner; use one of {', '.join(UNITS)}.")
    job = Planning.start(model, "similarity", speedup=speedup, skip=skip, prefill=prefill, name=name,
                         calibration=calibration, progress=progress)
    batches, num_layers, parts = job.batches, job.num_layers, _PARTS[unit]
    pool: list[Unit] = [(part, layer) for part in parts for layer in range(num_layers)]
    limit = len(pool) - 1 if unit in ("block", "joint") else len(pool)  # skipping all of them would skip every block
    steps: list[dict] = []

    scores: dict[Unit, float] = {}
    if not iterative:
        def rank() -> Iterator[list[Unit]]:  # runs only once select() has checked that the target is in reach
            scores.update(_scores(trace(model, batches), parts))
            if progress:
                progress(1, 1)
            yield from prefixes(_most_similar(scores))

        sequence = rank()
    else:
        total = max(1, max_units(model, job.target, pool, limit))  # passes at most: one per drop

        def iterate() -> Iterator[list[Unit]]:
            dropped: list[Unit] = []
            yield []
            while len(dropped) < len(pool):
                now = _scores(trace(model, batches, dropped), parts)
                if progress:
                    progress(len(dropped) + 1, total)
                best = _most_similar(now, exclude=dropped)[0]
                steps.append({"dropped": unit_label(best), "score": rounded([now[best]])[0],
                              "scores": {p: rounded([now[(p, l)] for l in range(num_layers)]) for p in parts}})
                dropped.append(best)
                yield list(dropped)

        sequence = iterate()

    units = job.select(sequence, pool=pool, limit=limit, what=_WHAT[unit])
    order = [unit_label(u) if unit == "joint" else u[1] for u in units]
    if iterative:
        record = {"steps": steps[: len(units)]}
    else:
        record = {"scores": {f"cosine_{p}": rounded([scores[(p, l)] for l in range(num_layers)]) for p in parts}}
    return job.plan(units, unit=unit, iterative=bool(iterative),
                    protection="none: any unit may be dropped, as in the paper", order=order, **record)


# LLM-Drop's four variants, each compared as a method of its own
PLANNERS.preset("similarity-block", "similarity", unit="block", summary="Block Drop (LLM-Drop), one-shot")
PLANNERS.preset("similarity-attention", "similarity", unit="attention", summary="Attention Drop (LLM-Drop), one-shot")
PLANNERS.preset("similarity-mlp", "similarity", unit="mlp", summary="MLP Drop (LLM-Drop), one-shot")
PLANNERS.preset("similarity-joint", "similarity", unit="joint",
                summary="Joint Layer Drop (LLM-Drop): attention and MLP ranked together, one-shot")
