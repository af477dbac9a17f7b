"""The one protocol for everything that skips — static plans, input-adaptive policies, and the trained skippers to
come — and the two calls that work on any of them: :func:`apply` and :func:`load_skipper`.

A skipper is data that knows how to install itself on a model. ``skiplm.apply(model, skipper)`` asks it to; the handle
it returns removes itself (``handle.remove()`` or the end of a ``with`` block). Every skipper builds its handle from
the hook machinery in :mod:`skiplm.runtime`, so a model carries at most one at a time, and nothing is global.

Callers ask a skipper, never its type, what they would branch on:

* ``input_adaptive``: whether what it skips depends on the input. False (a plan): its skips are fixed sets, so its
  ideal speedup comes from the cost model, it can be exported as a smaller checkpoint and can draft for speculative
  decoding. True (a policy): only a run shows what it skipped — its handle counts it in ``handle.stats``.
* ``handle.stats``: None for a fixed skipper; for an input-adaptive one, what it skipped while installed
  (``stats.to_json()``: per phase, the share of token-MLPs and attention contributions skipped, ...).
* ``teacher_forced()`` and ``is_empty()``: what perplexity scoring applies (every token as in decode), and whether
  there is anything to apply at all.
* ``plan`` (a healed plan, :class:`skiplm.heal.Healed`, has one): the :class:`~skiplm.plan.SkipPlan` it heals. Its skips
  are that plan's fixed sets, and its weights differ from the full model's while it is applied;
  :func:`fixed_plan` and :func:`is_healed` ask it.

A skipper file is JSON whose ``"format"`` names its kind; each kind registers a reader in
:data:`skiplm.registry.SKIPPER_FILES` (``skiplm.plan`` -> :class:`~skiplm.plan.SkipPlan`, ``skiplm.policy`` -> the
policies). A file with no known format is read as a plan, whose reader says what is wrong with it. A heal folder
(``skiplm heal``: ``heal.json`` and the weights beside it) is a skipper too: :func:`load_skipper` takes the folder or
its ``heal.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import nn

from .errors import PlanError
from .registry import SKIPPER_FILES

PLAN_FORMAT = "skiplm.plan"  # the format a file without a known one is read as


class Handle(Protocol):
    """What installing a skipper returns (built on :class:`skiplm.runtime.Installed`)."""

    stats: Any  # None where what runs is fixed; else what was skipped while installed, with to_json()

    def remove(self) -> None:
        """Take the skipper off the model (safe to call twice)."""

    def __enter__(self) -> Handle: ...

    def __exit__(self, *exc_info: object) -> None: ...


@runtime_checkable
class Skipper(Protocol):
    """What ``skiplm.apply`` and the commands need of a skipper."""

    num_layers: int
    provenance: dict[str, Any]
    input_adaptive: bool  # does what it skips depend on the input? (see the module docstring)

    def install(self, model: nn.Module, *, check_model: bool = True, **options: Any) -> Handle:
        """Install on ``model``; return a handle with ``remove()`` that is also a context manager."""

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`~skiplm.errors.PlanMismatchError` unless made for ``model``."""

    def describe(self) -> str:
        """One line for people: what it skips."""

    def teacher_forced(self) -> Skipper:
        """The skipper for scoring text in one forward (perplexity): every token treated as decode treats it."""

    def is_empty(self) -> bool:
        """Whether it skips nothing at all (applying it would run the full model)."""

    def to_json(self) -> dict[str, Any]:
        """The file form, with ``"format"`` naming a registered reader."""

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path``."""


def apply(model: nn.Module, skipper: Skipper, *, check_model: bool = True, **options: Any) -> Handle:
    """Apply ``skipper`` (a :class:`~skiplm.plan.SkipPlan`, a policy, ...) to ``model`` until the returned handle is
    removed (or its ``with`` block ends).

    While applied, ``model(...)`` and ``model.generate(...)`` run with it: greedy or sampling, batched with padding,
    KV cache on. ``check_model=False`` skips the check that it was made for this model's weights. Other keywords go
    to the skipper's ``install`` (a policy takes ``record=`` and ``dry_run=``).
    """
    if not isinstance(skipper, Skipper):
        raise PlanError(f"apply() needs a SkipPlan, a policy or another skipper, got {type(skipper).__name__}; load one "
                        "from a file with skiplm.load_skipper(path).")
    return skipper.install(model, check_model=check_model, **options)


def is_skipper(obj: Any) -> bool:
    """Whether ``obj`` is a skipper (a plan, a policy, ...): has what :class:`Skipper` lists."""
    return isinstance(obj, Skipper)


def fixed_plan(skipper: Skipper) -> Any:
    """The :class:`~skiplm.plan.SkipPlan` whose fixed skip sets ``skipper`` runs: a plan itself, a healed plan's
    ``plan``; None for an input-adaptive skipper (what it skips depends on the input)."""
    if skipper.input_adaptive:
        return None
    return getattr(skipper, "plan", skipper)


def is_healed(skipper: Skipper | None) -> bool:
    """Whether ``skipper`` is a healed plan (a heal folder, :class:`skiplm.heal.Healed`): a fixed plan run with weights
    that heal it, not the full model's."""
    return skipper is not None and not skipper.input_adaptive and getattr(skipper, "plan", None) is not None


def load_skipper(path: str | Path) -> Skipper:
    """The skipper a file holds (a plan from ``skiplm plan``, a policy from ``skiplm policy``, ...), by its format; or
    the healed plan a heal folder holds (``skiplm heal``: the folder, or its ``heal.json``)."""
    from .heal.artifact import HEAL_FILE, load_healed

    path = Path(path)
    if path.is_dir():  # a folder whose record file a registered format names (FiRST's first.json), else a heal folder
        for spec in SKIPPER_FILES:
            record = spec.extra.get("folder_file")
            if record and (path / record).is_file():
                return spec.extra["load"](path)
    if path.is_dir() or path.name == HEAL_FILE:
        return load_healed(path)  # its errors say what is wrong with the folder (one without heal.json included)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = None
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt in SKIPPER_FILES and fmt != PLAN_FORMAT:
        if "folder_file" in SKIPPER_FILES.get(fmt).extra:  # a folder's record: the folder is read whole
            return SKIPPER_FILES.get(fmt).extra["load"](path)
        try:
            return SKIPPER_FILES.get(fmt).target(data)
        except PlanError as exc:
            raise PlanError(f"{path}: {exc}") from None
    return SKIPPER_FILES.get(PLAN_FORMAT).extra["load"](path)  # its errors say what is wrong with the file


__all__ = ["Handle", "Skipper", "apply", "fixed_plan", "is_healed", "is_skipper", "load_skipper"]
