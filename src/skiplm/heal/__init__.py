"""Healing: fitting or training a skipped model back toward the full model, registered by name in
:data:`skiplm.registry.HEALERS` (spec: paper, needs, options), and the healed-model artifact.

* :func:`heal` — run a registered method: ``healed = heal(model, plan, "bridge", calibration=...)``.
* ``bridge`` (:mod:`.bridge`) — ReplaceMe's least-squares map per span of skipped blocks, folded into a kept weight.
* :class:`~.artifact.Healed` — the plan plus what heals it; a skipper (``skiplm.apply(model, healed)``),
  ``healed.save(folder)`` / :func:`load_healed`, ``merge=True`` for good, :func:`export_healed` for a vanilla checkpoint.
* ``lora`` and ``partial`` (:mod:`.train`) — trained toward the full model (distillation, :mod:`skiplm.train`).
* Combinations: ``heal(model, plan, "bridge+lora")`` — the bridge, then an adapter trained on top of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..registry import HEALERS
from .artifact import (
    BRIDGE_FILE,
    FORMAT_NAME,
    HEAL_FILE,
    SCHEMA_VERSION,
    Healed,
    HealHandle,
    load_healed,
)
from .bridge import fit_bridge
from .train import cut_layers, heal_lora, heal_partial, kept_linears
from .export import export_healed
from .spans import HealError, Span, check_block_plan, resolve_spans


def methods(method: str) -> list[str]:
    """The registered methods a method name stands for, in order: ``bridge+lora`` is a bridge, then LoRA on top."""
    names = [name.strip() for name in method.split("+")]
    for name in names:
        HEALERS.get(name)  # an unknown name is refused with the list of known ones
    trains = [name for name in names if HEALERS.get(name).extra.get("trains")]
    if len(set(names)) != len(names) or len(trains) > 1 or (trains and names[-1] != trains[0]):
        raise HealError(f"{method!r}: a combination runs each method once, at most one trained method, last "
                        "(e.g. bridge+lora).")
    return names


def heal(model: nn.Module, plan, method: str = "bridge", *, calibration: Any = None, tokenizer=None,
         corpus: str = "gsm8k", progress: Callable[..., None] | None = None, run_dir=None, resume: bool = False,
         **options: Any) -> Healed:
    """Heal ``plan`` on ``model`` with the registered ``method`` (or a combination such as ``bridge+lora``).

    Data: ``calibration`` (token-id batches or sequences: ``skiplm.load_calibration(...)``,
    ``skiplm.train.data.self_generated(...)``), or (given a ``tokenizer``) the method's default amount of ``corpus``
    text. A bridge in a combination fits on the first of those sequences. ``options``: the methods' options (each
    goes to the method that has it). ``run_dir`` / ``resume``: a training method's run folder (checkpoints) and
    whether to continue the run there. ``progress``: ``(done, total)`` for the bridge, ``(step, steps, info)`` for
    training."""
    names = methods(method)
    specs = [HEALERS.get(name) for name in names]
    known = {o.name for spec in specs for o in spec.options}
    for key in options:
        if key in known:
            continue
        if len(specs) == 1:
            specs[0].option(key)  # refused with the method's own list of options
        raise HealError(f"no method of {method!r} has an option {key!r}; options: {', '.join(sorted(known))}.")
    if calibration is None and any(spec.data_driven for spec in specs):
        if tokenizer is None:
            raise HealError(f"the {method!r} healing fits on text: pass calibration=[token-id batches] or "
                            "tokenizer= (it then reads the default calibration corpus).")
        from ..planners.common import load_calibration

        calibration = load_calibration(tokenizer, corpus, *max((s.calibration for s in specs), key=lambda c: c[0]))
    healed = None
    for spec in specs:
        own = {**{o.name: o.default for o in spec.options}, **spec.defaults,
               **{k: v for k, v in options.items() if k in {o.name for o in spec.options}}}
        if spec.extra.get("trains"):
            healed = spec.target(model, plan, calibration=calibration, progress=progress, base=healed,
                                 run_dir=run_dir, resume=resume, **own)
        else:  # a fit on calibration batches: the first sequences of training data, each without its padding
            data = calibration
            if len(specs) > 1 or not isinstance(calibration, (list, tuple)):
                data = _first(calibration, spec.calibration[0] if len(specs) > 1 else None)
            healed = spec.target(model, plan, calibration=data, progress=progress if len(specs) == 1 else None, **own)
    return healed


def _first(calibration: Any, sequences: int | None) -> list:
    """The first ``sequences`` (None: all) sequences of training data as [1, L] batches of their real tokens (what a
    bridge fits on: padding left out)."""
    from ..train.distill import Sequences

    data = Sequences.of(calibration)
    count = len(data) if sequences is None else min(sequences, len(data))
    return [data.input_ids[i][data.attention_mask[i]][None] for i in range(count)]


__all__ = [
    "BRIDGE_FILE",
    "FORMAT_NAME",
    "HEALERS",
    "HEAL_FILE",
    "SCHEMA_VERSION",
    "HealError",
    "HealHandle",
    "Healed",
    "Span",
    "check_block_plan",
    "export_healed",
    "fit_bridge",
    "cut_layers",
    "heal",
    "heal_lora",
    "heal_partial",
    "kept_linears",
    "load_healed",
    "methods",
    "resolve_spans",
]
