"""A measured latency model of one decode step: what skipping each attention / MLP sublayer saves on this device.

Fitted by timing real decode steps (interleaved, medians) of the full model and of three probe plans that skip the
attention sublayers, the MLP sublayers, or whole blocks, of every layer but the first and last. Decoder layers of one
model have the same shapes, so the per-layer saving is (full - probe) / number of layers probed, and the rest of a
step is a fixed cost (embedding, the output head, Python). A whole skipped block saves more than its two halves (its
norms, residual adds and call overhead go too), so it has its own saving. The model predicts a plan's step time as
full - its savings, and its speedup as full / that. A fourth probe it is not fitted on (attention of every other
middle layer, MLPs of the others) checks it: ``check_error``.
"""

from __future__ import annotations

import dataclasses
import statistics

import torch
from torch import nn

from ..models.adapters import count_layers
from .speed import time_decode
from ..plan import SkipPlan, SkipSet
from ..skipper import apply


@dataclasses.dataclass(frozen=True)
class LatencyModel:
    fixed_s: float
    attention_s: float  # saved per skipped attention sublayer
    mlp_s: float  # saved per skipped MLP sublayer
    num_layers: int
    batch_size: int
    context: int
    block_s: float | None = None  # saved per skipped whole block; None: attention_s + mlp_s
    # relative error of the model's prediction for a probe it was not fitted on (a mix of single sublayers)
    check_error: float = 0.0

    @property
    def full_s(self) -> float:
        return self.fixed_s + self.num_layers * (self.attention_s + self.mlp_s)

    def step_s(self, skips: SkipSet) -> float:
        blocks = set(skips.blocks)
        block_s = self.attention_s + self.mlp_s if self.block_s is None else self.block_s
        return (self.full_s - len(blocks) * block_s - len(skips.attention - blocks) * self.attention_s
                - len(skips.mlp - blocks) * self.mlp_s)

    def speedup(self, skips: SkipSet) -> float:
        return self.full_s / self.step_s(skips)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def measure(
        cls, model: nn.Module, *, batch_size: int = 1, context: int = 64, steps: int = 32, repeats: int = 7
    ) -> LatencyModel:
        num_layers = count_layers(model)
        middle = range(1, num_layers - 1)
        probes = {
            "attention": SkipSet.of(attention=middle),
            "mlp": SkipSet.of(mlp=middle),
            "block": SkipSet.of(blocks=middle),
            "check": SkipSet.of(attention=middle[::2], mlp=middle[1::2]),
        }
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(0)
        vocab = model.get_input_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab, (batch_size, context), generator=generator).to(device)
        times: dict[str, list[float]] = {"full": [], **{name: [] for name in probes}}
        for round_index in range(repeats + 1):  # round 0 is warm-up
            for name in times:
                handle = None
                if name != "full":
                    handle = apply(model, SkipPlan(num_layers, probes[name], probes[name]), check_model=False)
                try:
                    seconds = time_decode(model, ids, steps) / steps
                finally:
                    if handle:
                        handle.remove()
                if round_index:
                    times[name].append(seconds)
        median = {name: statistics.median(values) for name, values in times.items()}
        attention = max(median["full"] - median["attention"], 0.0) / len(middle)
        mlp = max(median["full"] - median["mlp"], 0.0) / len(middle)
        block = max(median["full"] - median["block"], 0.0) / len(middle)
        fixed = max(median["full"] - num_layers * (attention + mlp), 0.0)
        fitted = cls(fixed, attention, mlp, num_layers, batch_size, context, block_s=block)
        error = abs(fitted.step_s(probes["check"]) - median["check"]) / median["check"]
        return dataclasses.replace(fitted, check_error=error)
