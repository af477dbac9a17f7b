"""The residual stream at every sublayer boundary, recorded once and shared by every analysis metric and planner.

For decoder layer ``l`` three residual states matter::

    block_in[l]  --attention branch-->  mid[l]  --MLP branch-->  block_in[l+1]

so attention's (input, output) is (block_in[l], mid[l]), the MLP's is (mid[l], block_in[l+1]) and the block's is
(block_in[l], block_in[l+1]). ``block_in[L]`` is the last layer's output, before the final norm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from ..models.adapters import _get_path, get_adapter
from ..errors import DataError


@dataclasses.dataclass
class ResidualTrace:
    """Residual states of one batch of calibration text, flattened over (batch, position); batches carry no padding.

    ``block_in``: [L+1, N, d]; ``mid``: [L, N, d]; ``logits`` of the full model: [N, vocab] (float32, on CPU).
    """

    block_in: torch.Tensor
    mid: torch.Tensor
    logits: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return self.mid.shape[0]

    def branch_io(self, layer: int, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, output) residual states of ``part`` ("attention", "mlp" or "block") of ``layer``: [N, d] each."""
        if part == "attention":
            return self.block_in[layer], self.mid[layer]
        if part == "mlp":
            return self.mid[layer], self.block_in[layer + 1]
        return self.block_in[layer], self.block_in[layer + 1]


@torch.inference_mode()
def trace_residuals(
    model: nn.Module, batches: Iterable[torch.Tensor], *, keep_logits: bool = False
) -> ResidualTrace:
    """Run ``model`` on each [B, T] batch of token ids and record the residual stream everywhere. Under a skip plan
    (``skiplm.apply``) a skipped unit's recorded output equals its input."""
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    device = next(model.parameters()).device
    block_in: list[list[torch.Tensor]] = [[] for _ in range(len(layers) + 1)]
    mid: list[list[torch.Tensor]] = [[] for _ in range(len(layers))]
    logits = []

    def record(store: list, flatten):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            store.append(flatten(hidden))
        return hook

    def fill_skipped_block(index: int):
        # Under a plan that skips layer ``index`` whole (skiplm.apply), nothing inside the layer runs, so the MLP
        # input is never seen: the block's output is its input, and so is the state between its branches.
        def hook(module, args, output):
            if len(mid[index]) < len(block_in[index]):
                mid[index].append(block_in[index][-1])
        return hook

    handles = []
    try:
        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(record(block_in[index], _flat), with_kwargs=True))
            mlp_input = _get_path(layer, adapter.mlp_input)
            handles.append(mlp_input.register_forward_pre_hook(record(mid[index], _flat), with_kwargs=True))
            handles.append(layer.register_forward_hook(fill_skipped_block(index)))
        handles.append(layers[len(layers) - 1].register_forward_hook(
            lambda module, args, output: block_in[-1].append(_flat(output[0] if isinstance(output, tuple) else output))))
        for ids in batches:
            out = model(ids.to(device), use_cache=False)
            if keep_logits:
                logits.append(_flat(out.logits))
    finally:
        for handle in handles:
            handle.remove()
    return ResidualTrace(
        block_in=torch.stack([torch.cat(states) for states in block_in]),
        mid=torch.stack([torch.cat(states) for states in mid]),
        logits=torch.cat(logits) if keep_logits else None,
    )


def _flat(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.detach().reshape(-1, hidden.shape[-1]).float().cpu()


def calibration_batches(ids: torch.Tensor, sequences: int, length: int) -> list[torch.Tensor]:
    """``sequences`` consecutive chunks of ``length`` tokens from 1-D ``ids``, as [1, length] batches."""
    needed = sequences * length
    if ids.numel() < needed:
        raise DataError(f"calibration needs {needed} tokens ({sequences} x {length}), the text gave {ids.numel()}.")
    return [ids[i * length : (i + 1) * length].unsqueeze(0) for i in range(sequences)]
