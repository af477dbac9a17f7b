"""The ideal speedup of a plan, from what each sublayer costs.

At decode, a small model on a CPU or GPU is memory-bandwidth bound: a step's time is close to proportional to the
weight bytes it reads. So the cost of a sublayer is its parameter count, and the fixed cost of a step is the output
head (the embedding lookup reads one row). The *ideal* speedup of a plan is total cost / cost kept; the measured
speedup is compared against it to show the runtime's overhead. Attention over the cache is not counted: at long
contexts it grows, and measured ratios will move away from this estimate.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..models.adapters import get_adapter
from ..plan import PARTS, SkipSet


@dataclasses.dataclass(frozen=True)
class CostModel:
    attention: tuple[int, ...]  # parameters of each layer's attention branch
    mlp: tuple[int, ...]
    fixed: int  # the output head

    @classmethod
    def from_parameter_counts(cls, model: nn.Module) -> CostModel:
        adapter = get_adapter(model)
        per_part = {part: [] for part in PARTS}
        for layer in adapter.decoder_layers(model):
            for part in PARTS:
                core, norms = adapter.branch_modules(layer, part)
                per_part[part].append(sum(p.numel() for m in (core, *norms) for p in m.parameters()))
        head = model.get_output_embeddings()
        fixed = head.weight.numel() if head is not None else 0
        return cls(tuple(per_part["attention"]), tuple(per_part["mlp"]), fixed)

    @property
    def total(self) -> int:
        return sum(self.attention) + sum(self.mlp) + self.fixed

    def kept(self, skips: SkipSet) -> int:
        skipped = sum(self.attention[i] for i in skips.attention) + sum(self.mlp[i] for i in skips.mlp)
        return self.total - skipped

    def ideal_speedup(self, skips: SkipSet) -> float:
        return self.total / self.kept(skips)

    def ideal_speedup_of_skipped_mlps(self, per_token: float) -> float:
        """Ideal speedup of skipping ``per_token`` MLP sublayers per token on average (an input-adaptive policy)."""
        return self.total / (self.total - per_token * sum(self.mlp) / len(self.mlp))
