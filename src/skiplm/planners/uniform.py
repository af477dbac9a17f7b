"""Unified Layer Skipping (Liu et al., 2024): input-independent, balanced skipping of intermediate layers.

Keeps the first and last layers and skips whole blocks at evenly spaced positions in between. The number of blocks
comes from ``skip`` directly, or from a target ``speedup`` through the parameter-count cost model (the output head is
a fixed cost, so a 1.25x target skips more than 20% of the layers).
"""

from __future__ import annotations

import math

from torch import nn

from ..adapters import get_adapter
from ..costs import CostModel
from ..errors import PlanError
from ..plan import SkipPlan, SkipSet, model_identity, provenance


def balanced_positions(num_layers: int, count: int) -> list[int]:
    """``count`` evenly spaced indices among layers 1 .. num_layers-2 (first and last always run)."""
    middle = num_layers - 2
    if not 0 <= count <= middle:
        raise PlanError(f"can skip 0..{middle} intermediate layers of a {num_layers}-layer model, not {count}.")
    return [1 + math.floor((k + 0.5) * middle / count) for k in range(count)]


def plan_uniform(
    model: nn.Module,
    *,
    speedup: float | None = None,
    skip: int | None = None,
    prefill: str = "same",
    name: str | None = None,
) -> SkipPlan:
    """A Unified Layer Skipping plan for ``model``: give exactly one of ``speedup`` (ideal, >1) or ``skip`` (blocks)."""
    if (speedup is None) == (skip is None):
        raise PlanError("give exactly one of a target speedup (e.g. 1.25) or a number of layers to skip.")
    num_layers = len(get_adapter(model).decoder_layers(model))
    if skip is None:
        if not speedup > 1.0:
            raise PlanError(f"target speedup must be greater than 1, got {speedup}.")
        costs = CostModel.from_parameter_counts(model)
        for count in range(num_layers - 1):
            if costs.ideal_speedup(SkipSet.of(balanced_positions(num_layers, count))) >= speedup:
                skip = count
                break
        else:
            best = costs.ideal_speedup(SkipSet.of(range(1, num_layers - 1)))
            raise PlanError(
                f"a {speedup}x target is out of reach: skipping all {num_layers - 2} intermediate layers gives at most "
                f"{best:.2f}x by the cost model."
            )
    blocks = balanced_positions(num_layers, skip)
    target = {"speedup": speedup} if speedup is not None else {"skip": skip}
    return SkipPlan.from_layers(
        num_layers,
        blocks=blocks,
        prefill=prefill,
        model=model_identity(model, name),
        provenance=provenance("uniform", target=target, prefill=prefill, paper="Liu et al. 2024, Unified Layer Skipping"),
    )
