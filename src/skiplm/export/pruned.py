"""Export a planned model as a standard checkpoint that vanilla ``transformers`` loads without skiplm.

* Skipped **blocks** are deleted: the checkpoint has fewer layers (``num_hidden_layers`` and per-layer config fields
  such as ``layer_types`` are updated), so it is smaller and faster anywhere it is loaded (transformers, vLLM, ...).
* Skipped **attention-only / MLP-only** sublayers have no standard form — a vanilla decoder layer always runs both
  branches. By default export refuses such plans. With ``zero_sublayers=True`` their branch's core weights are set to
  zero, so the branch adds exactly 0 to the residual: the checkpoint computes the same function as the planned model
  (useful to evaluate it in other tools) but is **not faster**, since the zeroed matrices are still multiplied.

The folder appears whole or not at all: it is built under a temporary name beside ``out`` and renamed when complete
(:func:`skiplm.files.atomic_folder`), so an interrupted or failed export leaves nothing that looks like a checkpoint,
and an earlier export at ``out`` stays as it was until the new one is complete. ``out`` is checked before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..models.adapters import get_adapter
from ..errors import PlanError
from ..files import OutputError, atomic_folder, check_output, write_text_atomic
from ..plan import SkipPlan
from .prune import prune_blocks

PLAN_FILENAME = "skiplm_plan.json"


def export_pruned(
    model: nn.Module,
    plan: SkipPlan,
    out: str | Path,
    *,
    tokenizer=None,
    zero_sublayers: bool = False,
    check_model: bool = True,
) -> Path:
    """Write ``model`` with ``plan`` baked in to folder ``out`` (safetensors + config [+ tokenizer] + the plan
    record ``skiplm_plan.json``). ``out`` may be new, empty, or an earlier export (replaced once the new one is
    complete); any other existing folder or file is an :class:`~skiplm.files.OutputError`, raised before any work."""
    out = check_output(out, kind="folder", what="export folder")
    replace = (out / PLAN_FILENAME).is_file()  # an earlier export: replaced as a whole, at the end
    if out.is_dir() and any(out.iterdir()) and not replace:
        raise OutputError(f"export folder {out} exists and holds other files (it is not an earlier skiplm export): "
                          "choose a new or empty folder; nothing in it is overwritten.")
    if getattr(plan, "input_adaptive", False):
        raise PlanError("an input-adaptive policy cannot be exported: which layers run depends on each token, so there "
                        "is no fixed set of layers to delete. Export a static plan (skiplm plan).")
    if check_model:
        plan.check_model(model)
    if plan.prefill != plan.decode:
        raise PlanError(
            "export needs a plan that skips the same sublayers in prefill and decode: a checkpoint has one set of layers."
        )
    skips = plan.decode
    blocks = set(skips.blocks)
    partial = skips.half_blocks()
    if any(partial.values()) and not zero_sublayers:
        raise PlanError(
            f"this plan skips single sublayers (attention {partial['attention']}, mlp {partial['mlp']}); a standard "
            "checkpoint cannot leave out half a layer. Either apply the plan at run time with skiplm.apply, or export "
            "with zero_sublayers=True (--zero-sublayers): same outputs, but no speedup for those sublayers."
        )
    exported = prune_blocks(model, sorted(blocks))
    adapter = get_adapter(exported)
    layers = adapter.decoder_layers(exported)
    new_index = {old: new for new, old in enumerate(i for i in range(plan.num_layers) if i not in blocks)}
    with torch.no_grad():
        for part, indices in partial.items():
            for old in indices:
                core, _ = adapter.branch_modules(layers[new_index[old]], part)
                for parameter in core.parameters():
                    parameter.zero_()
    record = plan.to_json()
    record["export"] = {"deleted_blocks": sorted(blocks), "zeroed": partial, "layers_kept": len(layers)}
    with atomic_folder(out, replace=replace) as building:
        exported.save_pretrained(building)
        if tokenizer is not None:
            tokenizer.save_pretrained(building)
        write_text_atomic(building / PLAN_FILENAME, json.dumps(record, indent=2) + "\n")
    return out
