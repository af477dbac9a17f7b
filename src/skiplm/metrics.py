"""Layer-importance metrics from the literature, computed from a :class:`~skiplm.activations.ResidualTrace`.

Every function returns one value per layer (or per layer pair), averaged over calibration tokens. Planners and
``skiplm analyze`` share these; each has a test against a direct computation.
"""

from __future__ import annotations

import math
import torch
from torch import nn

from .activations import ResidualTrace
from .adapters import get_adapter
from .plan import SkipPlan, SkipSet
from .runtime import apply

BRANCHES = ("attention", "mlp", "block")


def cosine_similarity(trace: ResidualTrace, part: str) -> torch.Tensor:
    """Mean cos(input, output) of ``part`` per layer: [L]. LLM-Drop drops the most similar (least changing) units;
    ShortGPT's Block Influence is 1 - this for ``part="block"``."""
    return torch.stack([
        torch.nn.functional.cosine_similarity(*trace.branch_io(layer, part), dim=-1).mean()
        for layer in range(trace.num_layers)
    ])


def block_influence(trace: ResidualTrace) -> torch.Tensor:
    """ShortGPT's Block Influence, 1 - cos(block input, block output): [L]. Low = removable."""
    return 1.0 - cosine_similarity(trace, "block")


def angular_distance(trace: ResidualTrace, span: int) -> torch.Tensor:
    """Gromov et al.: mean arccos(cos(h_l, h_{l+span})) / pi for every start l = 0..L-span: [L - span + 1].
    A small distance means blocks l..l+span-1 change the representation little (a candidate contiguous cut)."""
    states = trace.block_in
    distances = []
    for start in range(trace.num_layers - span + 1):
        cos = torch.nn.functional.cosine_similarity(states[start], states[start + span], dim=-1).clamp(-1.0, 1.0)
        distances.append((torch.arccos(cos) / math.pi).mean())
    return torch.stack(distances)


def relative_contribution(trace: ResidualTrace, part: str) -> torch.Tensor:
    """Csordás et al.: mean ||output - input|| / ||input|| of ``part`` per layer: [L] (how much it writes)."""
    values = []
    for layer in range(trace.num_layers):
        inputs, outputs = trace.branch_io(layer, part)
        values.append(((outputs - inputs).norm(dim=-1) / inputs.norm(dim=-1).clamp_min(1e-12)).mean())
    return torch.stack(values)


@torch.inference_mode()
def skip_effect(
    model: nn.Module, batches: list[torch.Tensor], skips: SkipSet, reference_logits: torch.Tensor
) -> dict[str, float]:
    """Mean next-token loss and mean KL(full || skipped) per token on calibration ``batches`` with ``skips`` applied.

    ``reference_logits``: the full model's logits on the same batches, flattened [N, vocab] (from
    :func:`~skiplm.activations.trace_residuals` with ``keep_logits=True``).
    """
    device = next(model.parameters()).device
    plan = SkipPlan(len(get_adapter(model).decoder_layers(model)), skips, skips)
    handle = None if skips.is_empty() else apply(model, plan, check_model=False)
    try:
        logits = torch.cat([
            model(ids.to(device), use_cache=False).logits.reshape(-1, reference_logits.shape[-1]).float().cpu()
            for ids in batches
        ])
    finally:
        if handle:
            handle.remove()
    return {"loss": next_token_loss(logits, batches), "kl": kl_divergence(reference_logits, logits)}


def next_token_loss(logits: torch.Tensor, batches: list[torch.Tensor]) -> float:
    """Mean cross-entropy of flattened ``logits`` [N, vocab] against each batch's next tokens."""
    total, count, offset = 0.0, 0, 0
    for ids in batches:
        batch, length = ids.shape
        per_batch = logits[offset : offset + batch * length].view(batch, length, -1)
        total += torch.nn.functional.cross_entropy(
            per_batch[:, :-1].reshape(-1, per_batch.shape[-1]), ids[:, 1:].reshape(-1).cpu(), reduction="sum"
        ).item()
        count += batch * (length - 1)
        offset += batch * length
    return total / count


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over tokens of KL(softmax(reference) || softmax(logits))."""
    reference = torch.log_softmax(reference_logits, dim=-1)
    other = torch.log_softmax(logits, dim=-1)
    return torch.nn.functional.kl_div(other, reference, log_target=True, reduction="batchmean").item()
