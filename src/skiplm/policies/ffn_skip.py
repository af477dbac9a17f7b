"""FFN-SkipLLM (Jaiswal et al. 2024): a token's MLPs stop running once the MLP has saturated — cos(MLP input, MLP
output) of its residual stream stayed above the threshold for ``window`` consecutive layers. Attention always runs."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import PlanError
from ..registry import Option
from .base import HaltingPolicy, register_policy


@register_policy(
    "ffn-skip",
    paper="Jaiswal et al. 2024, FFN-SkipLLM",
    summary="FFN-SkipLLM: a token skips the remaining MLPs once they have saturated (cosine of MLP input and output)",
    options=[Option("window", int, 2, "consecutive saturated layers before a token halts")],
)
@dataclasses.dataclass
class FFNSkip(HaltingPolicy):
    """FFN-SkipLLM: a token skips the MLPs of the remaining skippable layers once cos(MLP input, MLP output) of its
    residual stream has been above the threshold for ``window`` consecutive layers. Attention always runs."""

    window: int = 2

    threshold_range = (-1.0, 1.0)  # a cosine
    more_skips_with_larger = False  # a larger cosine threshold: fewer layers count as saturated

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise PlanError(f"ffn-skip: window must be a positive integer, got {self.window!r}.")

    def _first_observed(self) -> int:
        # a decision that takes effect needs the `window` layers before the first skippable one, no earlier ones
        return max(0, self.protect_first - self.window)

    def _begin_signal(self) -> None:
        self._state["streak"] = 0 if self._state["scalar"] else torch.zeros_like(self._state["halted"], dtype=torch.int32)

    def _signal(self, layer, layer_input, mlp_input, layer_output, threshold) -> torch.Tensor | bool:
        saturated = _cosine(mlp_input, layer_output, self._state["scalar"]) > threshold
        streak = self._state["streak"] = (self._state["streak"] + 1) * saturated  # reset to 0 when not saturated
        return streak >= self.window

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "window": self.window}


def _cosine(a: torch.Tensor, b: torch.Tensor, scalar: bool) -> torch.Tensor | float:
    """Per-token cosine of two [batch, tokens, hidden] tensors; a float for one token (one 2x2 Gram matrix: on CPU,
    half the time of F.cosine_similarity)."""
    if not scalar:
        return F.cosine_similarity(a, b, dim=-1)
    pair = torch.cat((a, b)).view(2, -1)
    (aa, ab), (_, bb) = torch.mm(pair, pair.t()).tolist()
    return ab / max(math.sqrt(aa * bb), 1e-8)
