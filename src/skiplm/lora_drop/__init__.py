"""LoRA-Drop (arXiv 2601.02569): temporal reuse of layer outputs with a low-rank correction, as a skipper.

* :class:`LoraDrop` — the skipper (``skiplm.apply(model, skipper)``; ``teacher_forced()`` scores text in one forward
  exactly as decoding would); :func:`load_lora_drop` / ``skiplm.load_skipper`` read its folder.
* :mod:`.runtime` — what a dropped step computes (``h_in + u(anchor) + B A n(h_in)``), what it writes to the KV cache
  (nothing, at a droppable layer) and what later tokens read (the prompt and the anchors).
* :func:`train_lora_drop` — the corrections trained toward the full model (KL) or on the text (LM loss), on
  :mod:`skiplm.train.distill`; ``skiplm lora-drop MODEL --anchor-every K --rank r -o DIR`` on the command line.

Registered in :data:`skiplm.registry.REUSE` (``lora-drop``, its paper and options) and its file format in
:data:`skiplm.registry.SKIPPER_FILES` (``skiplm.lora-drop``).
"""

from __future__ import annotations

from ..registry import REUSE, SKIPPER_FILES, Option, Spec
from .runtime import CHILD, Correction, LoraDropError, LoraDropHandle, LoraDropStats, check_supported
from .skipper import (FORMAT_NAME, PAPER, RECORD_FILE, SCHEMA_VERSION, WEIGHTS_FILE, LoraDrop, load_lora_drop,
                      lora_drop_from_json, paper_droppable)
from .train import OBJECTIVES, correction_names, train_lora_drop


def kv_cache_bytes(cache) -> int:
    """Bytes of keys and values a transformers cache holds, over all its layers."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if tensor is not None and hasattr(tensor, "numel"):
                total += tensor.numel() * tensor.element_size()
    return total


REUSE.register(
    "lora-drop",
    paper=PAPER,
    needs={"calibration"},
    calibration=(136, 256),
    summary="droppable layers reuse their last anchor token's residual update plus a trained rank-r correction; "
            "an anchor (full computation) every K tokens",
    options=(
        Option("anchor_every", int, 2, "K: a full computation every K decode tokens"),
        Option("rank", int, 8, "rank r of each droppable layer's correction"),
        Option("objective", str, "kl", "what trains the corrections: kl (to the full model) or lm (next-token loss)",
               OBJECTIVES),
    ),
    extra={"format": FORMAT_NAME},
)(LoraDrop)

SKIPPER_FILES.add(Spec(name=FORMAT_NAME, target=lora_drop_from_json, kind=SKIPPER_FILES.kind,
                       summary="a LoRA-Drop schedule with trained corrections (`skiplm lora-drop`; a folder)",
                       extra={"folder_file": RECORD_FILE, "load": load_lora_drop}))

__all__ = ["CHILD", "Correction", "FORMAT_NAME", "LoraDrop", "LoraDropError", "LoraDropHandle", "LoraDropStats",
           "OBJECTIVES", "PAPER", "RECORD_FILE", "SCHEMA_VERSION", "WEIGHTS_FILE", "check_supported",
           "correction_names", "kv_cache_bytes", "load_lora_drop", "lora_drop_from_json", "paper_droppable",
           "train_lora_drop"]
