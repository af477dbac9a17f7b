"""Unified Layer Skipping (Liu et al., 2024): input-independent, balanced skipping of intermediate layers.

Keeps the first and last layers and skips whole blocks at evenly spaced positions in between. The number of blocks
comes from ``skip`` directly, or from a target ``speedup`` through the parameter-count cost model (the output head is
a fixed cost, so a 1.25x target skips more than 20% of the layers).
"""

from __future__ import annotations

import math

from torch import nn

from ..errors import PlanError
from ..plan import SkipPlan
from ..registry import PLANNERS
from .common import Planning


def balanced_positions(num_layers: int, count: int) -> list[int]:
    """``count`` evenly spaced indices among layers 1 .. num_layers-2 (first and last always run)."""
    middle = num_layers - 2
    if not 0 <= count <= middle:
        raise PlanError(f"can skip 0..{middle} intermediate layers of a {num_layers}-layer model, not {count}.")
    return [1 + math.floor((k + 0.5) * middle / count) for k in range(count)]


@PLANNERS.register("uniform", paper="Liu et al. 2024, Unified Layer Skipping",
                   summary="evenly spaced intermediate blocks; no calibration")
def plan_uniform(model: nn.Module, *, speedup: float | None = None, skip: int | None = None, prefill: str = "same",
                 name: str | None = None) -> SkipPlan:
    """A Unified Layer Skipping plan for ``model``: give exactly one of ``speedup`` (ideal, >1) or ``skip`` (blocks)."""
    job = Planning.start(model, "uniform", speedup=speedup, skip=skip, prefill=prefill, name=name)
    middle = list(range(1, job.num_layers - 1))
    sequence = ([("block", b) for b in balanced_positions(job.num_layers, count)] for count in range(len(middle) + 1))
    units = job.select(sequence, pool=[("block", b) for b in middle], limit=len(middle), what="intermediate layers")
    return job.plan(units)
