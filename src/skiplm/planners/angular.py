"""Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers": remove a contiguous run of blocks.

For a run of n blocks the start is l* = argmin over l of the angular distance arccos(cos(h_l, h_{l+n})) / pi between
the residual stream entering layer l and entering layer l+n (:func:`skiplm.analysis.metrics.angular_distance`, averaged over
every calibration token; the paper measures it at the last token of each sequence, which needs many more sequences
for a steady estimate), and blocks l*..l*+n-1 are removed. Layer protection, as in the paper: the last layer's
block is never removed (a run ends at layer L-2 at the latest); the first may be. For a speedup target the smallest n
that reaches it is used. (The paper then heals the cut with QLoRA fine-tuning; skiplm does not fine-tune.)
"""

from __future__ import annotations

import torch
from torch import nn

from ..analysis.metrics import angular_distance
from ..plan import SkipPlan
from ..registry import PLANNERS
from .common import Planning, Progress, Unit, rounded, trace


def best_runs(residuals, num_layers: int):
    """For n = 1 .. L-1: (l*, distances of every start l = 0 .. L-1-n), the run never touching the last layer."""
    for span in range(1, num_layers):
        distances = angular_distance(residuals, span)[: num_layers - span]  # starts whose run ends before layer L-1
        yield int(torch.argmin(distances)), distances  # argmin: the first start on ties


@PLANNERS.register("angular", paper="Gromov et al. 2024, The Unreasonable Ineffectiveness of the Deeper Layers",
                   needs={"calibration"}, calibration=(8, 256),
                   summary="the contiguous run of blocks whose input and output are closest in angular distance")
def plan_angular(model: nn.Module, *, speedup: float | None = None, skip: int | None = None, prefill: str = "same",
                 name: str | None = None, calibration=None, progress: Progress | None = None) -> SkipPlan:
    """Skip the contiguous run of ``skip`` blocks (or the shortest run reaching an ideal ``speedup``) whose input and
    output are closest in angular distance.

    ``calibration``: [1, T] token-id batches (:func:`skiplm.planners.load_calibration`).
    """
    job = Planning.start(model, "angular", speedup=speedup, skip=skip, prefill=prefill, name=name,
                         calibration=calibration, progress=progress)
    num_layers = job.num_layers
    chosen: dict[str, object] = {}

    def sequence():  # runs only once select() has checked that the target is in reach
        residuals = trace(model, job.batches)
        if progress:
            progress(1, 1)
        yield []
        for span, (start, distances) in enumerate(best_runs(residuals, num_layers), start=1):
            chosen.update(start=start, distances=distances)
            yield [("block", layer) for layer in range(start, start + span)]

    pool: list[Unit] = [("block", layer) for layer in range(num_layers - 1)]
    units = job.select(sequence(), pool=pool, limit=num_layers - 1, what="blocks before the last one")
    fields = {}
    if units:
        fields = {"start": chosen["start"], "length": len(units),
                  "scores": {"angular_distance": rounded(chosen["distances"])}}
    return job.plan(units, protection="the last layer's block is never removed, as in the paper", **fields)
