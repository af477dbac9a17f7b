"""Export a healed block plan as a vanilla checkpoint: the bridge baked into the kept weights, the skipped blocks
deleted (:func:`skiplm.export.export_pruned`), so ``AutoModelForCausalLM.from_pretrained`` gives the healed logits
with no skiplm installed. The model passed in is unchanged afterwards (its original weights copied back)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from ..export.pruned import export_pruned
from ..files import check_output
from .artifact import Healed


def export_healed(model: nn.Module, healed: Healed, out: str | Path, *, tokenizer=None, check_model: bool = True) -> Path:
    """Write ``model`` pruned by ``healed.plan`` and healed by its bridge to folder ``out`` (safetensors + config
    [+ tokenizer] + ``skiplm_plan.json``, whose provenance names the healing). Same folder rules as export_pruned."""
    out = check_output(out, kind="folder", what="export folder")
    if check_model:
        healed.check_model(model)
    plan = dataclasses.replace(healed.plan, provenance={**healed.plan.provenance, "healed": {
        "method": healed.method, "spans": [{**span.to_json(), **fit} for span, fit in zip(healed.spans, healed.fit)],
        "heal_provenance": healed.provenance}})
    with healed.baked(model):
        return export_pruned(model, plan, out, tokenizer=tokenizer, check_model=False)


__all__ = ["export_healed"]
