"""L2 Adaptive Computation ("Void in Language Models"): a token halts once the change of its residual's L2 norm across
a layer falls under ``alpha x (max - min)`` of its earlier per-layer changes. ``parts="layer"`` drops the whole
layer's contribution for halted tokens (attention and MLP), ``parts="mlp"`` only the MLP (the preset ``lac-mlp``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import PlanError
from ..registry import POLICIES, Option
from .base import HaltingPolicy, register_policy

HALTED_SKIPS = ("layer", "mlp")  # what a halted token skips


@register_policy(
    "lac",
    paper="Shemiranifar & Dehghani 2023 (LAC); Void in Language Models 2025",
    summary="L2 Adaptive Computation: a token halts once the L2-norm change of its residual settles",
    options=[Option("parts", str, "layer", "what a halted token skips (layer: attention contribution and MLP)",
                    choices=HALTED_SKIPS)],
)
@dataclasses.dataclass
class LAC(HaltingPolicy):
    """L2 Adaptive Computation: a token halts once the L2-norm change of its residual across a layer,
    | ||h_out|| - ||h_in|| |, falls under ``alpha x (max - min)`` of its changes at the earlier layers. Halted tokens
    skip the remaining skippable layers (``parts="layer"``: attention contribution and MLP; ``"mlp"``: the MLP)."""

    parts: str = "layer"

    threshold_name = "alpha"
    threshold_range = (0.0, 1.0)  # a share of the range of earlier changes
    more_skips_with_larger = True  # a larger alpha: more changes count as settled
    observes_mlp_input = False

    def __post_init__(self):
        super().__post_init__()
        if self.parts not in HALTED_SKIPS:
            raise PlanError(f"lac: parts must be 'layer' or 'mlp', got {self.parts!r}.")

    @property
    def skips_attention(self) -> bool:  # type: ignore[override]
        return self.parts == "layer"

    def _begin_signal(self) -> None:
        self._state.update(norm=None, low=None, high=None, seen=0)

    def _signal(self, layer, layer_input, mlp_input, layer_output, alpha) -> torch.Tensor | bool:
        state = self._state
        before = state["norm"] if state["norm"] is not None else self._values(_norm(layer_input))
        after = state["norm"] = self._values(_norm(layer_output))
        change = abs(after - before)
        low, high = state["low"], state["high"]
        settled = state["seen"] >= 2 and change < alpha * (high - low)  # a range needs two earlier changes
        if state["scalar"]:
            state["low"] = change if low is None else min(low, change)
            state["high"] = change if high is None else max(high, change)
        else:
            settled = settled if state["seen"] >= 2 else torch.zeros_like(state["halted"])
            state["low"] = change if low is None else torch.minimum(low, change)
            state["high"] = change if high is None else torch.maximum(high, change)
        state["seen"] += 1
        return settled

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "parts": self.parts}


POLICIES.preset("lac-mlp", "lac", parts="mlp",
                summary="L2 Adaptive Computation, halted tokens skipping only their MLPs (attention always runs)")


def _norm(hidden: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(hidden, dim=-1)  # half the time of Tensor.norm on one token
