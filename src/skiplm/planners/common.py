"""What every static planner shares: the target, calibration data, and "add units until the target is reached".

A planner orders *units* — whole blocks, or attention / MLP sublayers — by its own criterion and hands the sequence
of its skip lists for 0, 1, 2, ... units to :func:`select`, which stops at the target:

* ``skip=N`` — the list with N units;
* ``speedup=X`` — the first list whose *ideal* decode speedup by :class:`~skiplm.measure.costs.CostModel` is at least X.

The sequence is consumed lazily, so incremental planners (iterative similarity, greedy loss) only compute the steps
the target needs. Lists are usually nested (each one the previous plus a unit) but need not be: an angular-distance
cut of n blocks is a different run for every n.

A planner's first line is :meth:`Planning.start` (the target and, for a data-driven planner, the checked calibration
batches) and its last two :meth:`Planning.select` and :meth:`Planning.plan` (stamped with the paper of its spec in
:data:`~skiplm.registry.PLANNERS`). :func:`plan_each` plans many targets by calling a planner once per target; a
nested planner offers its own ``plan_targets`` in its spec, serving them all from one run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..models.adapters import count_layers
from ..measure.costs import CostModel
from ..errors import DataError, PlanError
from ..plan import SkipPlan, SkipSet, model_identity, provenance
from ..registry import PLANNERS
from ..runtime import installed_handle

Unit = tuple[str, int]  # ("block" | "attention" | "mlp", layer index)
Progress = Callable[[int, int], None]  # (forward passes done, total or an upper bound of the total)

DEFAULT_CORPUS = "gsm8k"


# -- the target ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Target:
    """Exactly one of an ideal decode ``speedup`` (> 1) or a number of units to ``skip``."""

    speedup: float | None = None
    skip: int | None = None

    @classmethod
    def of(cls, speedup: float | None, skip: int | None) -> Target:
        if (speedup is None) == (skip is None):
            raise PlanError("give exactly one of a target speedup (e.g. 1.25) or a number of layers (or sublayers) to skip.")
        if skip is not None:
            if isinstance(skip, bool) or not isinstance(skip, int):
                raise PlanError(f"the number of units to skip must be an integer, got {skip!r}.")
            return cls(skip=skip)
        if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not speedup > 1.0:
            raise PlanError(f"target speedup must be greater than 1, got {speedup}.")
        return cls(speedup=float(speedup))

    def to_json(self) -> dict[str, Any]:
        return {"speedup": self.speedup} if self.speedup is not None else {"skip": self.skip}


# -- units --------------------------------------------------------------------------------------------------------
def skip_set(units: Iterable[Unit]) -> SkipSet:
    units = list(units)
    return SkipSet.of(
        blocks=[layer for part, layer in units if part == "block"],
        attention=[layer for part, layer in units if part == "attention"],
        mlp=[layer for part, layer in units if part == "mlp"],
    )


def unit_cost(costs: CostModel, unit: Unit) -> int:
    part, layer = unit
    if part == "block":
        return costs.attention[layer] + costs.mlp[layer]
    return (costs.attention if part == "attention" else costs.mlp)[layer]


def unit_label(unit: Unit) -> str:
    return f"{unit[0]} {unit[1]}"


def prefixes(ordered: Sequence[Unit]) -> Iterator[list[Unit]]:
    """The skip lists of a one-shot ranking: its first 0, 1, 2, ... units."""
    for count in range(len(ordered) + 1):
        yield list(ordered[:count])


def max_units(model: nn.Module, target: Target, pool: Sequence[Unit], limit: int) -> int:
    """An upper bound on how many units :func:`select` will take for ``target``, whatever the order (for progress
    bars): with a speedup target, the count at which even the cheapest units of ``pool`` reach it."""
    if target.skip is not None:
        return max(0, min(target.skip, limit))
    costs = CostModel.from_parameter_counts(model)
    cheapest = sorted(pool, key=lambda unit: unit_cost(costs, unit))
    for count in range(limit + 1):
        if costs.total / (costs.total - sum(unit_cost(costs, u) for u in cheapest[:count])) >= target.speedup:
            return count
    return limit


def select(
    model: nn.Module,
    target: Target,
    sequence: Iterable[list[Unit]],
    *,
    pool: Sequence[Unit],
    limit: int,
    what: str,
) -> list[Unit]:
    """The method's skip list for ``target``: the first list of ``sequence`` (its lists for 0, 1, 2, ... units) that
    has ``target.skip`` units, or whose ideal decode speedup reaches ``target.speedup``.

    ``pool``: every unit the method may choose; ``limit``: the most units it may skip (a plan keeps a layer running);
    ``what``: how to name them in messages, e.g. ``"intermediate layers"``.
    """
    num_layers = count_layers(model)
    if target.skip is not None:
        if not 0 <= target.skip <= limit:
            raise PlanError(f"can skip 0..{limit} {what} of a {num_layers}-layer model, not {target.skip}.")
    else:
        costs = CostModel.from_parameter_counts(model)
        dearest = sorted((unit_cost(costs, u) for u in pool), reverse=True)[: max(limit, 0)]
        best = costs.total / (costs.total - sum(dearest))
        if best < target.speedup:  # refuse before any (possibly long) computation
            raise PlanError(
                f"a {target.speedup}x target is out of reach: skipping all {limit} {what} gives at most {best:.3f}x "
                "by the cost model."
            )
    units: list[Unit] = []
    for count, units in enumerate(sequence):
        if len(units) != count:
            raise AssertionError(f"a planner's sequence gave {len(units)} units at step {count}")
        if target.skip is not None:
            if count == target.skip:
                return units
        elif costs.ideal_speedup(skip_set(units)) >= target.speedup:
            return units
        if count >= limit:
            break
    reached = "" if target.skip is not None else f" (its best reaches {costs.ideal_speedup(skip_set(units)):.3f}x)"
    raise PlanError(f"the method ran out of {what} to skip before reaching the target {target.to_json()}{reached}.")


def make_plan(
    model: nn.Module,
    units: Sequence[Unit],
    *,
    method: str,
    target: Target,
    prefill: str,
    name: str | None,
    **fields: Any,
) -> SkipPlan:
    """The plan skipping ``units``, stamped with the model's identity and the method's provenance."""
    skips = skip_set(units)
    return SkipPlan.from_layers(
        count_layers(model),
        attention=sorted(skips.attention),
        mlp=sorted(skips.mlp),
        prefill=prefill,
        model=model_identity(model, name),
        provenance=provenance(method, target=target.to_json(), prefill=prefill, **fields),
    )


def check_unplanned(model: nn.Module) -> None:
    """Planners measure the model itself: refuse a model that has a skip plan applied."""
    if installed_handle(model) is not None:
        raise PlanError("this model has a skip plan applied; remove it (handle.remove()) before making a new plan.")


def trace(model: nn.Module, calibration: Sequence[torch.Tensor], units: Sequence[Unit] = ()):
    """The residual trace of ``model`` on ``calibration`` with ``units`` skipped (the full model when empty). A
    skipped unit's output equals its input in the trace."""
    from ..analysis.activations import trace_residuals
    from ..skipper import apply

    if not units:
        return trace_residuals(model, calibration)
    skips = skip_set(units)
    with apply(model, SkipPlan(count_layers(model), skips, skips), check_model=False):
        return trace_residuals(model, calibration)


def rounded(values: Iterable[float] | torch.Tensor, digits: int = 6) -> list[float | None]:
    """Scores for a plan file: plain floats with ``digits`` significant digits (None stays None)."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    return [None if v is None else float(f"{v:.{digits}g}") for v in values]


# -- one planner call -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Planning:
    """One call of a registered planner, after the checks every planner makes: the target, and for a data-driven one
    (its spec ``needs`` calibration) the checked calibration batches and a model with nothing applied. Its
    :meth:`select` and :meth:`plan` are the planner's last two steps; the plan is stamped with the spec's paper."""

    model: nn.Module
    method: str
    target: Target
    prefill: str = "same"
    name: str | None = None
    batches: Calibration | None = None
    progress: Progress | None = None

    @classmethod
    def start(cls, model: nn.Module, method: str, *, speedup: float | None, skip: int | None, prefill: str = "same",
              name: str | None = None, calibration: Any = None, progress: Progress | None = None,
              min_length: int = 1) -> Planning:
        target = Target.of(speedup, skip)
        batches = None
        if PLANNERS.get(method).data_driven:
            batches = as_calibration(calibration, model, method, min_length=min_length)
            check_unplanned(model)
        return cls(model, method, target, prefill, name, batches, progress)

    @property
    def num_layers(self) -> int:
        return count_layers(self.model)

    def select(self, sequence: Iterable[list[Unit]], *, pool: Sequence[Unit], limit: int, what: str) -> list[Unit]:
        """:func:`select` for this call's target."""
        return select(self.model, self.target, sequence, pool=pool, limit=limit, what=what)

    def plan(self, units: Sequence[Unit], **fields: Any) -> SkipPlan:
        """The plan skipping ``units``; its provenance: the method, target, prefill, paper, calibration and ``fields``."""
        if self.batches is not None:
            fields = {"calibration": self.batches.describe(), **fields}
        return make_plan(self.model, units, method=self.method, target=self.target, prefill=self.prefill,
                         name=self.name, paper=PLANNERS.get(self.method).paper, **fields)


# -- many targets from one call ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Planned:
    """A planner's outcome for one of many targets (:func:`plan_each`, or a nested planner's ``plan_targets``)."""

    target: float
    plan: SkipPlan | None
    seconds: float  # to make it (a nested planner: its one run, plus what this target added)
    error: str | None = None


def plan_each(planner: Callable[..., SkipPlan], model: nn.Module, targets: Sequence[float],
              **options: Any) -> list[Planned]:
    """A plan per target speedup, one planner call each; a target out of reach is an error, not an exception.
    (A ``nested`` planner's spec offers ``plan_targets``, which serves every target from one run.)"""
    planned = []
    for target in targets:
        start = time.perf_counter()
        try:
            planned.append(Planned(target, planner(model, speedup=target, **options), time.perf_counter() - start))
        except PlanError as exc:
            planned.append(Planned(target, None, time.perf_counter() - start, str(exc)))
    return planned


# -- calibration data -------------------------------------------------------------------------------------------
class Calibration(list):
    """A list of [batch, tokens] token-id tensors (no padding) that also says where they came from."""

    def __init__(self, batches: Iterable[torch.Tensor], source: str = "token ids given by the caller"):
        super().__init__(batches)
        self.source = source

    def describe(self) -> dict[str, Any]:
        lengths = sorted({int(b.shape[-1]) for b in self})
        return {
            "source": self.source,
            "sequences": sum(int(b.shape[0]) for b in self),
            "length": lengths[0] if len(lengths) == 1 else lengths,
            "tokens": sum(b.numel() for b in self),
        }


def load_calibration(tokenizer, corpus: str = DEFAULT_CORPUS, sequences: int = 8, length: int = 256, *,
                     model: nn.Module | None = None) -> Calibration:
    """``sequences`` consecutive chunks of ``length`` tokens from a shipped corpus (``gsm8k``, ``pydoc``), a text
    file, or ``self`` — text ``model`` generates itself (:func:`skiplm.train.data.self_generated`, cached; the same
    text `skiplm heal` trains on by default) — as [1, length] batches. Pass the result as ``calibration=`` to a
    data-driven planner."""
    from ..analysis.activations import calibration_batches
    from ..models.data import SELF_CORPUS, corpus_label, load_corpus
    from ..measure.perplexity import tokenize_corpus

    for value, option in ((sequences, "sequences"), (length, "length")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"calibration {option} must be a positive integer, got {value!r}.")
    if corpus == SELF_CORPUS:
        text = _self_generated_text(model, tokenizer, sequences, length)
    else:
        text = load_corpus(corpus)
    ids = tokenize_corpus(tokenizer, text, sequences * length)
    try:
        batches = calibration_batches(ids, sequences, length)
    except DataError as exc:
        raise DataError(f"calibration text {corpus_label(corpus)!r} is too short: {exc} Use a longer text, or fewer "
                        "or shorter sequences.") from None
    return Calibration(batches, source=corpus_label(corpus))


def _self_generated_text(model, tokenizer, sequences: int, length: int) -> str:
    """Enough self-generated text for ``sequences`` x ``length`` tokens (rows end early at EOS: a third more rows of
    the data `skiplm heal` uses, 256 tokens each, from the same cache)."""
    from ..models.data import SELF_CORPUS
    from ..train.data import GenerationSettings, self_generated

    if model is None:
        raise DataError(f"the {SELF_CORPUS!r} corpus is text the model generates itself: pass model= as well.")
    rows = -(-sequences * length * 4 // (3 * 256))
    return self_generated(model, tokenizer, GenerationSettings(sequences=rows, length=256)).text()


def as_calibration(calibration: Any, model: nn.Module, method: str, *, min_length: int = 1) -> Calibration:
    """Check the calibration batches a data-driven planner was given."""
    if calibration is None:
        raise PlanError(
            f"the {method!r} planner measures the model on calibration text: pass calibration=[token-id tensors of "
            "shape [1, T]], e.g. skiplm.planners.load_calibration(tokenizer, 'gsm8k', sequences=8, length=256)."
        )
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    batches = list(calibration)
    if not batches:
        raise DataError("calibration is empty: give at least one [1, T] batch of token ids.")
    vocab = model.get_input_embeddings().weight.shape[0]
    for index, ids in enumerate(batches):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise DataError(f"calibration batch {index} must be a [batch, tokens] tensor of token ids, got "
                            f"{getattr(ids, 'shape', type(ids).__name__)}.")
        if ids.shape[0] < 1 or ids.shape[1] < min_length:
            raise DataError(f"calibration batch {index} has {ids.shape[1]} tokens per sequence; the {method!r} planner "
                            f"needs at least {min_length}.")
        if ids.min() < 0 or ids.max() >= vocab:
            raise DataError(f"calibration batch {index} has token ids outside 0..{vocab - 1} (the model's vocabulary): "
                            "was it made with another tokenizer?")
    source = getattr(calibration, "source", "token ids given by the caller")
    return Calibration(batches, source=source)


__all__ = [
    "Calibration", "Planned", "Planning", "Target", "Unit", "as_calibration", "check_unplanned", "load_calibration",
    "make_plan", "max_units", "plan_each", "prefixes", "rounded", "select", "skip_set", "trace", "unit_cost",
    "unit_label",
]
