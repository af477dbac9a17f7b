"""Activation maps: which sublayers ran for which tokens under a policy (``record=True``), and their summary per
layer. The picture of them is :func:`skiplm.report.plots.policies.plot_activation_maps`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from ..plan import PHASES


@dataclasses.dataclass
class ActivationMap:
    """Which sublayers ran for which tokens in one forward (``record=True``): run masks ([batch, tokens] bools) of
    the skippable layers; every other layer ran for every token."""

    phase: str
    start: int
    batch: int
    tokens: int
    mlp: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    attention: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)

    def grid(self, part: str, num_layers: int) -> torch.Tensor:
        """[layers, batch, tokens] bools: True where ``part`` ran."""
        grid = torch.ones(num_layers, self.batch, self.tokens, dtype=torch.bool)
        for layer, mask in getattr(self, part).items():
            grid[layer] = mask
        return grid


def activation_summary(maps: Sequence[ActivationMap], num_layers: int) -> dict[str, Any]:
    """Per phase: share of tokens whose MLP ran at each layer (JSON-ready)."""
    out: dict[str, Any] = {}
    for phase in PHASES:
        chosen = [m for m in maps if m.phase == phase]
        if not chosen:
            continue
        mlp = torch.cat([m.grid("mlp", num_layers).flatten(1) for m in chosen], dim=1).float()  # [layers, tokens]
        attention = torch.cat([m.grid("attention", num_layers).flatten(1) for m in chosen], dim=1).float()
        out[phase] = {"tokens": mlp.shape[1], "mlp_active_by_layer": mlp.mean(1).tolist(),
                      "attention_active_by_layer": attention.mean(1).tolist()}
    return out
