"""Layer-importance metrics from the literature, computed from a :class:`~skiplm.analysis.activations.ResidualTrace`.

Every function returns one value per layer (or per layer pair), averaged over calibration tokens. Planners and
``skiplm analyze`` share these; each has a test against a direct computation.
"""

from __future__ import annotations

import math
import torch
from torch import nn

from .activations import ResidualTrace
from ..models.adapters import count_layers, get_adapter
from ..plan import SkipPlan, SkipSet
from ..skipper import apply

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
    :func:`~skiplm.analysis.activations.trace_residuals` with ``keep_logits=True``).
    """
    device = next(model.parameters()).device
    plan = SkipPlan(count_layers(model), skips, skips)
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


# -- norms, the logit lens and weight statistics (used by `skiplm analyze`) ------------------------------------------
def l2_norm_change(trace: ResidualTrace, part: str) -> torch.Tensor:
    """LAC (L2 Adaptive Computation; "Void in Language Models"): mean over tokens of | ||output||_2 - ||input||_2 |
    of ``part`` per layer: [L].

    LAC watches how much a layer changes the L2 norm of the hidden state and calls a layer with little change a
    "void" (inactive) for that token. This is the change *of the norm*, not the norm of the change (that is
    :func:`relative_contribution`): a layer that rotates the residual without growing it scores low here. Absolute,
    in the model's hidden-state units, so it grows with the residual norm along depth (see :func:`residual_norm`).
    """
    values = []
    for layer in range(trace.num_layers):
        inputs, outputs = trace.branch_io(layer, part)
        values.append((outputs.norm(dim=-1) - inputs.norm(dim=-1)).abs().mean())
    return torch.stack(values)


def residual_norm(trace: ResidualTrace) -> torch.Tensor:
    """Mean L2 norm of the residual stream entering each layer, and after the last one (before the final norm): [L+1]."""
    return trace.block_in.norm(dim=-1).mean(dim=-1)


@torch.inference_mode()
def early_exit_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's output head applied to residual states ``hidden`` [N, d]: final norm, LM head, and the final-logit
    soft-capping some families configure (``final_logit_softcapping``). Returns float32 logits [N, vocab] on CPU."""
    from ..models.adapters import _get_path
    from ..errors import UnsupportedArchitectureError

    adapter = get_adapter(model)
    try:
        norm = _get_path(model, adapter.final_norm)
    except (AttributeError, IndexError, TypeError):
        raise UnsupportedArchitectureError(
            f"the model has no final norm at {adapter.final_norm!r}; set Adapter(final_norm=...) to the module "
            "between the last decoder layer and the LM head."
        ) from None
    head = model.get_output_embeddings()
    weight = next(head.parameters())
    logits = head(norm(hidden.to(weight.device, weight.dtype))).float()
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.cpu()


@torch.inference_mode()
def logit_lens(model: nn.Module, trace: ResidualTrace, *, chunk: int = 512) -> dict[str, torch.Tensor]:
    """Early exit at every depth: :func:`early_exit_logits` of the residual after ``s`` layers, s = 0..L (0: the
    embeddings), compared with the full model's final distribution ``trace.logits``.

    Returns ``kl``: mean over tokens of KL(final || early exit) [L+1], and ``top1``: the share of tokens whose early
    exit's argmax equals the final argmax [L+1]. ``kl[L]`` is ~0 by construction (a check that the head is right).
    """
    if trace.logits is None:
        raise ValueError("logit_lens needs the full model's logits: trace_residuals(..., keep_logits=True).")
    states, tokens = trace.block_in.shape[0], trace.block_in.shape[1]
    kl, top1 = torch.zeros(states, dtype=torch.float64), torch.zeros(states, dtype=torch.float64)
    for start in range(0, tokens, chunk):
        reference = torch.log_softmax(trace.logits[start : start + chunk].float(), dim=-1)  # [n, vocab]
        final_top = reference.argmax(dim=-1)
        for state in range(states):
            early = torch.log_softmax(early_exit_logits(model, trace.block_in[state, start : start + chunk]), dim=-1)
            kl[state] += torch.nn.functional.kl_div(early, reference, log_target=True, reduction="sum").item()
            top1[state] += (early.argmax(dim=-1) == final_top).sum().item()
    return {"kl": (kl / tokens).float(), "top1": (top1 / tokens).float()}


def weight_zd(weight: torch.Tensor) -> tuple[int, int]:
    """(count, size) of the entries of one weight matrix with |z| > 1, z = (w - mean(W)) / std(W) (std with Bessel's
    correction), z-scored per matrix: the "ZD" statistic of Dumitru et al., "Layer-wise quantization"."""
    flat = weight.detach().float().reshape(-1)
    std = flat.std()
    if std == 0:
        return 0, flat.numel()
    return int((((flat - flat.mean()) / std).abs() > 1).sum().item()), flat.numel()


def zd_score(model: nn.Module, part: str) -> torch.Tensor:
    """ZD score per layer: [L]. The share of weights with |z| > 1 over the weight matrices (parameters with >= 2
    dimensions; norms and biases excluded) of ``part``: the attention module, the MLP module, or the whole decoder
    layer ("block"); each matrix z-scored on its own (:func:`weight_zd`), counts pooled over the matrices.

    A Gaussian matrix scores 0.317; heavy tails (a few very large weights) lower it. Dumitru et al. rank layers by it
    to choose which to keep at higher precision.
    """
    adapter = get_adapter(model)
    values = []
    for layer in adapter.decoder_layers(model):
        module = layer if part == "block" else adapter.branch_modules(layer, part)[0]
        count = size = 0
        for param in module.parameters():
            if param.dim() >= 2:
                c, n = weight_zd(param)
                count, size = count + c, size + n
        values.append(count / size if size else float("nan"))
    return torch.tensor(values, dtype=torch.float64)
