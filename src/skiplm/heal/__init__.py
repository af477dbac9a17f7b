"""Healing: fitting or training a skipped model back toward the full model, registered by name in
:data:`skiplm.registry.HEALERS` (spec: paper, needs, options), and the healed-model artifact.

* :func:`heal` — run a registered method: ``healed = heal(model, plan, "bridge", calibration=...)``.
* ``bridge`` (:mod:`.bridge`) — ReplaceMe's least-squares map per span of skipped blocks, folded into a kept weight.
* :class:`~.artifact.Healed` — the plan plus what heals it; a skipper (``skiplm.apply(model, healed)``),
  ``healed.save(folder)`` / :func:`load_healed`, ``merge=True`` for good, :func:`export_healed` for a vanilla checkpoint.

Training methods (``lora``, ``partial``) come as further registered entries and further steps of the same artifact.
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
from .export import export_healed
from .spans import HealError, Span, check_block_plan, resolve_spans


def heal(model: nn.Module, plan, method: str = "bridge", *, calibration: Any = None, tokenizer=None,
         corpus: str = "gsm8k", progress: Callable[[int, int], None] | None = None, **options: Any) -> Healed:
    """Heal ``plan`` on ``model`` with the registered ``method``. Calibration: ``calibration`` batches, or (given a
    ``tokenizer``) the method's default amount of ``corpus`` text. ``options``: the method's options."""
    spec = HEALERS.get(method)
    if spec.data_driven and calibration is None:
        if tokenizer is None:
            raise HealError(f"the {method!r} healing method fits on calibration text: pass calibration=[token-id "
                            "batches] or tokenizer= (it then reads the default calibration corpus).")
        from ..planners.common import load_calibration

        calibration = load_calibration(tokenizer, corpus, *spec.calibration)
    for name in options:
        spec.option(name)  # an unknown option is refused with the list of known ones
    return spec.target(model, plan, calibration=calibration, progress=progress, **{**spec.defaults, **options})


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
    "heal",
    "load_healed",
    "resolve_spans",
]
