"""Training LoRA-Drop's corrections (:func:`train_lora_drop`), on :mod:`skiplm.train.distill`.

The student is the model with the skipper's one-forward view applied (:meth:`LoraDrop.teacher_forced`: every token
as step-by-step decoding treats it, anchors every K positions), its corrections the only trainable weights: B starts
at zero, so training starts from pure reuse. The teacher is the full model (the handle off). Objective: ``kl``
(forward KL to the full model's next-token distribution, the default) or ``lm`` (the paper's next-token loss on the
data). The last ``held_out`` sequences are kept out for the evaluations (KL, acceptance proxy, perplexity) and the
early stop; ``run_dir`` makes the run resumable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..models.adapters import get_adapter
from .runtime import CHILD, LoraDropError
from .skipper import PAPER, LoraDrop

OBJECTIVES = ("kl", "lm")


def correction_names(model: nn.Module, skipper: LoraDrop) -> list[str]:
    """The parameter names the corrections have while installed, in layer order (down, then up)."""
    prefix = get_adapter(model).layers
    return [f"{prefix}.{i}.{CHILD}.{part}.weight" for i in skipper.droppable for part in ("down", "up")]


def split(calibration: Any, held_out: int):
    """(training sequences, the last ``held_out`` sequences) of token-id data."""
    from ..train.distill import Sequences

    data = Sequences.of(calibration)
    if isinstance(held_out, bool) or not isinstance(held_out, int) or held_out < 1:
        raise LoraDropError(f"held_out must be a whole number >= 1, got {held_out!r}.")
    if len(data) < held_out + 1:
        raise LoraDropError(f"training needs more than held_out={held_out} sequences, got {len(data)}.")
    train = Sequences(data.input_ids[:-held_out], data.loss_mask[:-held_out], data.attention_mask[:-held_out],
                      source=data.source)
    evaluation = Sequences(data.input_ids[-held_out:], data.loss_mask[-held_out:], data.attention_mask[-held_out:],
                           source=data.source + " (held out)")
    return train, evaluation


def train_lora_drop(model: nn.Module, anchor_every: int, rank: int = 8, *, calibration: Any, held_out: int = 8,
                    droppable=None, objective: str = "kl", settings=None, run_dir: str | Path | None = None,
                    resume: bool = False, progress: Callable | None = None, seed: int = 0,
                    name: str | None = None) -> LoraDrop:
    """A LoRA-Drop skipper for ``model`` with its corrections trained on ``calibration`` (token-id sequences: a
    [N, L] tensor, batches, or :func:`skiplm.train.data.self_generated`). ``settings``: a
    :class:`~skiplm.train.distill.TrainSettings`. Returns the trained skipper (generation view), its training record
    in ``provenance``; ``model`` is unchanged."""
    from ..train.distill import TrainError, TrainingInterrupted, TrainSettings, distill

    if objective not in OBJECTIVES:
        raise LoraDropError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}.")
    settings = TrainSettings() if settings is None else settings
    start = time.perf_counter()
    initial = LoraDrop.initial(model, anchor_every, rank, droppable=droppable, seed=seed, name=name)
    if initial.is_empty():
        raise LoraDropError("with an anchor at every token (or no droppable layer) nothing is dropped: nothing to train.")
    train, evaluation = split(calibration, held_out)
    names = correction_names(model, initial)
    identity = {"method": "lora-drop", "anchor_every": anchor_every, "rank": rank, "droppable": list(initial.droppable),
                "objective": objective, "seed": seed}
    try:
        result = distill(model, initial.teacher_forced(), train, evaluation, layers=names, settings=settings,
                         run_dir=run_dir, resume=resume, progress=progress, identity=identity, objective=objective)
    except TrainingInterrupted:
        raise
    except TrainError as exc:
        raise LoraDropError(str(exc)) from None
    tensors = result.step.tensors
    corrections = {i: (tensors[f"{get_adapter(model).layers}.{i}.{CHILD}.down.weight"],
                       tensors[f"{get_adapter(model).layers}.{i}.{CHILD}.up.weight"]) for i in initial.droppable}
    record = {"method": "lora-drop", "paper": PAPER, "objective": objective, "seed": seed,
              "seconds": round(time.perf_counter() - start, 1), "training": result.record}
    trained = LoraDrop(initial.num_layers, anchor_every, rank, initial.droppable, corrections, model=initial.model,
                       provenance=record)
    return trained


__all__ = ["OBJECTIVES", "correction_names", "split", "train_lora_drop"]
