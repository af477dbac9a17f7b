"""Physically removing whole decoder blocks: the reference a skip plan's speed is judged against.

transformers sizes caches and masks from the config, so after deleting layers three things must agree:
``config.num_hidden_layers``, every attention's ``layer_idx`` (its cache slot), and per-layer config fields such as
``layer_types``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

from torch import nn

from ..models.adapters import get_adapter
from ..errors import PlanError

# Config fields that hold one entry per decoder layer.
_PER_LAYER_CONFIG_FIELDS = ("layer_types",)


def prune_blocks(
    model: nn.Module, blocks: Iterable[int], *, inplace: bool = False, share_weights: bool = False
) -> nn.Module:
    """A model without the decoder blocks ``blocks``.

    By default a deep copy; ``inplace`` edits ``model`` itself; ``share_weights`` copies the module tree but keeps
    the very same parameter tensors (no extra memory, and — for timing — the same memory as the original).
    """
    adapter = get_adapter(model)
    num_layers = len(adapter.decoder_layers(model))
    drop = set(blocks)
    if not drop <= set(range(num_layers)):
        raise PlanError(f"blocks {sorted(drop - set(range(num_layers)))} are out of range for {num_layers} layers.")
    if len(drop) == num_layers:
        raise PlanError("cannot remove every decoder block.")
    if inplace:
        pruned = model
    else:
        memo = {id(t): t for t in [*model.parameters(), *model.buffers()]} if share_weights else {}
        pruned = copy.deepcopy(model, memo)
    layers = adapter.decoder_layers(pruned)
    keep = [i for i in range(num_layers) if i not in drop]
    kept_layers = [layers[i] for i in keep]
    for new_index, layer in enumerate(kept_layers):
        attention, _ = adapter.branch_modules(layer, "attention")
        if hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_index
    # Replace the ModuleList's contents in place so the parent keeps the same attribute.
    for index in range(len(layers) - 1, -1, -1):
        del layers[index]
    for layer in kept_layers:
        layers.append(layer)
    for config in {id(c): c for c in (pruned.config, pruned.config.get_text_config(decoder=True))}.values():
        config.num_hidden_layers = len(keep)
        for field in _PER_LAYER_CONFIG_FIELDS:
            values = getattr(config, field, None)
            if isinstance(values, (list, tuple)) and len(values) == num_layers:
                setattr(config, field, [values[i] for i in keep])
    return pruned
