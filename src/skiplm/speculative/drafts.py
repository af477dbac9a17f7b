"""Drafts behind one interface: what a speculative round needs of whatever proposes the tokens the full model
verifies (:class:`Drafter`), and the draft kinds, registered in :data:`skiplm.registry.DRAFTS`:

* ``modules`` (:class:`ModulesDraft`): the model's own modules under a skip plan (Draft & Verify; SWIFT chooses the
  skip set on the fly), or a low-precision copy of them (:func:`skiplm.speculative.quantize.draft_copy`); any family.
* ``lean`` (:class:`skiplm.speculative.lean.LeanEngineDraft`): a low-precision copy run by skiplm's fused forward, for
  Llama-style families; it takes the keys and values of committed tokens from the full model's cache.
* ``lookup`` (:class:`PromptLookup`): n-gram prompt lookup, combined with a draft model: when the text repeats itself
  its continuation drafts, with no draft forward at all.

A draft model (:class:`ModelDraft`) keeps a KV cache of the committed tokens it has seen, filled lazily: at its first
round, and after tokens were committed while it did not draft (plain steps, lookup rounds) or after its plan changed.
:func:`make_draft` picks the engine (``"auto"``: the registered engine of highest priority that supports the model and
precision).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import DataError, PlanError
from ..models.adapters import count_layers
from ..plan import SkipPlan
from ..registry import DRAFTS, Option
from ..runtime import SkipHandle, installed_handle
from ..skipper import apply
from .controllers import AdaptiveDraftLength
from .quantize import draft_copy
from .sampling import Sampler
from .state import Committed

AUTO = "auto"  # the draft engine: the best registered one that supports the model


@dataclasses.dataclass
class Proposal:
    """What a drafter proposes for one round: ``tokens`` [B, k] (finished rows: anything), each drawn from
    ``probs[i]`` [B, V] (None: proposed with certainty, as prompt lookup does)."""

    tokens: torch.Tensor
    probs: Sequence[torch.Tensor] | None
    drafter: str  # RoundInfo.drafter: "model" or "lookup"
    prefill_seconds: float = 0.0  # the draft's (lazy) prefill, part of this proposal's time


class Drafter(Protocol):
    """What a speculative round needs of a draft."""

    def draft(self, state: Committed, k_max: int, sampler: Sampler) -> Proposal | None:
        """Up to ``k_max`` tokens continuing every row of ``state``, or None (nothing to propose this round)."""

    def crop(self, state: Committed) -> None:
        """Tokens were committed: forget what was drafted beyond them (a cache keeps all but the last committed)."""

    def record(self, drafted: int, accepted: int, kept: float) -> None:
        """The outcome of a round it drafted: drafts made and accepted over unfinished rows, and committed per row
        (on average)."""


# -- draft models ----------------------------------------------------------------------------------------------------
class ModelDraft:
    """A draft model: it drafts token by token from its own cache, until ``length`` says its confidence is too low or
    ``k_max`` tokens are drafted. Subclasses run the forward (:meth:`forward`) and may fill the cache otherwise
    (:meth:`catch_up`)."""

    drafter = "model"
    engine = ""  # its DRAFTS name
    handle: SkipHandle | None = None  # the skip plan applied to its modules, where it has modules

    def __init__(self, model: Any, length: AdaptiveDraftLength, weight_bytes: int):
        self.model = model  # what drafts: an nn.Module, or the lean engine
        self.length = length
        self.weight_bytes = weight_bytes  # extra memory its weights take (0: the verifier's own)
        self.cache: Any = None
        self.seen = 0  # the cache holds the committed tokens seq[:, :seen]

    # -- the Drafter interface ------------------------------------------------------------------------------------
    def draft(self, state: Committed, k_max: int, sampler: Sampler) -> Proposal:
        start = time.perf_counter()
        self.catch_up(state)
        feed = state.seq[:, self.seen:state.committed]  # committed tokens it has not seen, [B, >= 1]; first: its prefill
        active = state.active
        confident = active  # ragged rounds: the rows whose drafts so far were all confident
        tokens, probs, prefill = [], [], 0.0
        for i in range(k_max):
            logits = self.forward(state, self.seen, feed)  # [B, V]
            if self.seen == 0:
                self.cache.activate_past_recording()  # sliding-window layers must keep their past to be cropped
                prefill = time.perf_counter() - start
            self.seen += feed.shape[1]
            token, q = sampler.propose(logits)
            tokens.append(token)
            probs.append(q)
            if i + 1 == k_max:
                break
            if state.ragged:  # each row commits its own drafts: go on while at least half the rows are confident
                confident = self.length.confident(q.max(-1).values, confident)
                if 2 * int(confident.sum()) < int(active.sum()):
                    break
            elif self.length.stop(q.max(-1).values[active]):  # the batch advances by its least accepting row
                break
            feed = token[:, None]
        return Proposal(torch.stack(tokens, dim=1), probs, self.drafter, prefill)

    def crop(self, state: Committed) -> None:
        excess = max(self.seen - (state.committed - 1), 0)
        if self.cache is not None:
            self.cache.crop(-excess)
        self.seen -= excess

    def record(self, drafted: int, accepted: int, kept: float) -> None:
        self.length.update(drafted, accepted)

    # -- what a subclass provides ---------------------------------------------------------------------------------
    def forward(self, state: Committed, start: int, tokens: torch.Tensor) -> torch.Tensor:
        """The last logits [B, V] (float32) after ``tokens`` [B, n] at sequence indices ``start..``, updating
        :attr:`cache`."""
        raise NotImplementedError

    def catch_up(self, state: Committed) -> None:
        """Bring the cache closer to the committed tokens without drafting (nothing by default)."""

    @property
    def plan(self) -> SkipPlan | None:
        raise NotImplementedError

    def set_plan(self, plan: SkipPlan) -> None:
        """Draft with ``plan`` (checked by the caller); the cache starts again."""
        raise NotImplementedError

    # -- its life -------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the cache (a new generation, or a new plan)."""
        self.cache, self.seen = None, 0

    def cache_bytes(self) -> int:
        total = 0
        for layer in getattr(self.cache, "layers", []):
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total

    def close(self) -> None:
        """Remove what it applied to a model."""


def _no_reason(model: nn.Module, precision: str | None) -> str | None:
    return None


@DRAFTS.register("modules", paper="Zhang et al. 2023, Draft & Verify; Xia et al. 2024, SWIFT",
                 summary="the model's own modules under a skip plan, or a low-precision copy of them",
                 extra={"engine": True, "priority": 0, "unsupported": _no_reason, "cached": True})
class ModulesDraft(ModelDraft):
    """The model's own modules draft: ``module`` (the verifier itself, or a low-precision copy of it) under a skip
    plan applied to it — with ``plan=None``, the plan already applied to ``module``, if any (left applied)."""

    engine = "modules"

    def __init__(self, module: nn.Module, length: AdaptiveDraftLength, *, plan: SkipPlan | None = None,
                 weight_bytes: int = 0, adapter=None):
        super().__init__(module, length, weight_bytes)
        self.handle = installed_handle(module)
        self.owned = False  # whether this draft applied the handle (and removes it)
        self.adapter = adapter  # a trained draft's adapter, attached with every plan (DraftAdapter.on)
        if adapter is not None and self.handle is not None:
            raise PlanError("a trained draft's adapter goes on with its plan: remove the plan applied to the model "
                            "and pass it as plan=.")
        if plan is not None:
            self.set_plan(plan)

    @classmethod
    def build(cls, model: nn.Module, precision: str | None, length: AdaptiveDraftLength, *, cache=None,
              setup=None, adapter=None) -> ModulesDraft:
        """``model`` itself (``precision=None``) or its copy in ``precision`` — with ``cache`` (a
        :class:`~skiplm.speculative.cache.DraftCache`), its int8 weights from there where stored. ``setup`` (a
        :class:`~skiplm.speculative.stats.SetupStats`) records what making it cost. ``adapter`` (a trained draft's
        :class:`~skiplm.speculative.trained.DraftAdapter`): merged into a copy's weights; on the model itself,
        attached in place with each plan (:meth:`set_plan`), and off whenever the verifier runs."""
        if precision is None:
            return cls(model, length, adapter=adapter)
        if cache is not None:
            copy = cache.modules_copy(model, precision, setup, adapter=adapter) if adapter is not None else \
                cache.modules_copy(model, precision, setup)
        else:
            start = time.perf_counter()
            copy = draft_copy(model, precision, adapter=adapter)
            if setup is not None:
                setup.copy_seconds += time.perf_counter() - start  # copied, cast and quantized
                setup.draft_source = "built"
        return cls(copy, length, weight_bytes=_tensor_bytes(copy))

    def forward(self, state: Committed, start: int, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        out = self.model(input_ids=tokens, attention_mask=state.mask[:, :start + n],
                         position_ids=state.positions(start, n), cache=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.cache
        return out.logits[:, -1].float()

    @property
    def plan(self) -> SkipPlan | None:
        return self.handle.plan if self.handle is not None else None

    def set_plan(self, plan: SkipPlan) -> None:
        if self.handle is not None and not self.owned:
            raise PlanError("the draft plan was applied by the caller; remove it and pass plan= instead.")
        self.close()
        skipper = plan if self.adapter is None else self.adapter.on(plan, self.model)  # the verifier turns both off
        self.handle, self.owned = apply(self.model, skipper, check_model=False), True
        self.reset()

    def close(self) -> None:
        if self.owned and self.handle is not None:
            self.handle.remove()
            self.handle, self.owned = None, False


def _tensor_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = (tensor.data_ptr(), tensor.numel())
        if key not in seen:  # tied weights count once
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


# -- prompt lookup ---------------------------------------------------------------------------------------------------
@DRAFTS.register("lookup", paper="Saxena 2023, Prompt Lookup Decoding",
                 summary="n-gram prompt lookup, combined with a draft model",
                 options=[Option("ngram", int, 3, "the n-gram length looked up in the committed tokens")])
class PromptLookup:
    """Prompt-lookup drafting (n-gram lookup, as in transformers' ``prompt_lookup_num_tokens``), combined with the
    draft model: when the last ``ngram`` committed tokens of every unfinished row occurred earlier in that row, the
    tokens that followed their latest occurrence are the drafts — no draft forward at all; else the draft model
    drafts. Lookup is kept only while it pays: the tokens kept per lookup round are averaged (weight ``smoothing`` on
    the past) and lookup is skipped while the average is below ``min_kept``, with one trial every ``retry_every``
    rounds. (A lookup round costs one verification of its proposal; on the default model that is about two plain
    steps for 7 tokens, paid back by about one kept token.)"""

    drafter = "lookup"

    def __init__(self, ngram: int = 3, min_kept: float = 1.0, smoothing: float = 0.7, retry_every: int = 16):
        if ngram < 1:
            raise DataError(f"the lookup n-gram must be at least 1 token, got {ngram}.")
        self.ngram, self.min_kept, self.smoothing, self.retry_every = ngram, min_kept, smoothing, retry_every
        self.kept: float | None = None  # tokens kept per lookup round, averaged
        self.since_lookup = 0

    def propose(self, seq: torch.Tensor, committed: int, pads: torch.Tensor, active: torch.Tensor, k_max: int,
                pad: int, rows: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Drafts [B, k] (k <= k_max; finished rows get ``pad``), or None: no match in some row, or lookup does not
        pay now. ``rows``: row index -> its committed tokens (holes left out), else ``seq[row, pads[row]:committed]``."""
        if self.kept is not None and self.kept < self.min_kept and self.since_lookup < self.retry_every:
            self.since_lookup += 1
            return None
        proposals: list[torch.Tensor | None] = []
        for row in range(seq.shape[0]):
            if not bool(active[row]):
                proposals.append(None)
                continue
            tokens = rows(row) if rows is not None else seq[row, int(pads[row]):committed]
            if tokens.shape[0] <= self.ngram:
                return None
            windows = tokens.unfold(0, self.ngram, 1)[:-1]  # every earlier n-gram, by its start
            hits = (windows == tokens[-self.ngram:]).all(-1).nonzero()
            if hits.numel() == 0:
                return None
            start = int(hits[-1]) + self.ngram
            proposals.append(tokens[start:start + k_max])
        k = min(p.shape[0] for p in proposals if p is not None)
        self.since_lookup = 0
        return torch.stack([p[:k] if p is not None else seq.new_full((k,), pad) for p in proposals])

    def observe(self, kept: float) -> None:
        """Tokens a row kept from a lookup round's drafts (on average over the unfinished rows)."""
        a = self.smoothing
        self.kept = kept if self.kept is None else a * self.kept + (1 - a) * kept

    # -- the Drafter interface ------------------------------------------------------------------------------------
    def draft(self, state: Committed, k_max: int, sampler: Sampler) -> Proposal | None:
        tokens = self.propose(state.seq, state.committed, state.pads, state.active, k_max, state.pad,
                              state.row_tokens)
        return Proposal(tokens, None, self.drafter) if tokens is not None else None

    def crop(self, state: Committed) -> None:
        """Nothing to forget: lookup reads the committed tokens."""

    def record(self, drafted: int, accepted: int, kept: float) -> None:
        self.observe(kept)


# -- choosing a draft ------------------------------------------------------------------------------------------------
def draft_engines() -> list[str]:
    """The draft engines ``draft_engine=`` takes: ``"auto"`` and every registered engine."""
    return [AUTO, *(spec.name for spec in DRAFTS if spec.extra.get("engine"))]


def check_engine(engine: str) -> None:
    if engine not in draft_engines():
        raise DataError(f"unknown draft engine {engine!r}; use one of {', '.join(draft_engines())}.")


def make_draft(model: nn.Module, precision: str | None, engine: str, length: AdaptiveDraftLength, *, cache=None,
               setup=None, adapter=None, vocab=None) -> ModelDraft:
    """The draft model for ``model`` in ``precision`` (None: the model's own weights) by ``engine`` (a registered
    engine, or ``"auto"``: the highest-priority one that supports them). ``cache`` (a
    :class:`~skiplm.speculative.cache.DraftCache`) and ``setup`` (a :class:`~skiplm.speculative.stats.SetupStats`)
    go to engines registered with ``extra={"cached": True}``, whose ``build`` takes them. ``adapter``: a trained
    draft's :class:`~skiplm.speculative.trained.DraftAdapter` (given only when there is one). ``vocab``: the token
    ids of a reduced-vocabulary draft head (:mod:`skiplm.speculative.vocab`), for engines registered with
    ``extra={"vocab": True}``."""
    check_engine(engine)
    if engine == AUTO:
        specs = sorted((s for s in DRAFTS if s.extra.get("engine")), key=lambda s: -s.extra["priority"])
        if vocab is not None:  # a reduced vocabulary: only the engines that draft over one
            specs = [s for s in specs if s.extra.get("vocab")]
        spec = next((s for s in specs if s.extra["unsupported"](model, precision) is None), None)
        if spec is None:
            reasons = "; ".join(f"the {s.name} engine {s.extra['unsupported'](model, precision)}" for s in specs)
            raise PlanError(f"a reduced draft vocabulary needs a draft engine that drafts over one: {reasons}.")
    else:
        spec = DRAFTS.get(engine)
        reason = spec.extra["unsupported"](model, precision)
        if reason is not None:
            raise PlanError(f"the {engine} draft engine {reason}.")
        if vocab is not None and not spec.extra.get("vocab"):
            raise PlanError(f"the {engine} draft engine drafts over the whole vocabulary; a reduced draft vocabulary "
                            "(draft_vocab=, --draft-vocab) needs the lean engine.")
    extra = {"adapter": adapter} if adapter is not None else {}  # a trained draft (skiplm.speculative.trained)
    if vocab is not None:
        extra["vocab"] = vocab
    if spec.extra.get("cached"):
        return spec.target.build(model, precision, length, cache=cache, setup=setup, **extra)
    return spec.target.build(model, precision, length, **extra)


def check_draft_plan(plan: Any, model: nn.Module, check_model: bool) -> None:
    """Refuse what cannot draft for ``model``: the verifier runs the model with the draft's skips switched off, and
    a draft's skips must be fixed sets (a static plan; a skipper whose skips depend on the input cannot draft)."""
    if getattr(plan, "input_adaptive", True):  # the skipper protocol says whether its skips are fixed
        raise PlanError("a speculative draft needs a static skip plan (skiplm plan); an input-adaptive policy cannot "
                        "draft: the full model must verify with the draft switched off, which policies do not do.")
    if check_model:  # against the model's own weights (a low-precision copy's differ by design)
        plan.check_model(model)
    elif plan.num_layers != count_layers(model):
        raise PlanError(f"the draft plan covers {plan.num_layers} layers; the model has {count_layers(model)}.")


def draft_alternatives(plan: SkipPlan | None) -> list[SkipPlan]:
    """The runner-up skip sets ``skiplm draft-search`` recorded in a draft plan (``draft.alternatives``: lists of
    blocks), as plans for on-the-fly selection (:class:`~skiplm.speculative.controllers.DraftSelector`); [] when it
    recorded none."""
    found = ((plan.provenance or {}).get("draft") or {}).get("alternatives") if plan is not None else None
    return [SkipPlan.from_layers(plan.num_layers, blocks=blocks, model=plan.model,
                                 provenance={"method": "draft-search alternative"})
            for blocks in found or []]


def draft_precision(plan: SkipPlan | None) -> str | None:
    """The precision a draft plan from ``skiplm draft-search`` drafts in (its provenance's ``draft.precision``), or
    None for the model's own weights. A draft is the plan's skips *and* this precision."""
    found = ((plan.provenance or {}).get("draft") or {}).get("precision") if plan is not None else None
    return None if found in (None, "float32") else found


__all__ = ["Drafter", "ModelDraft", "ModulesDraft", "PromptLookup", "Proposal", "check_draft_plan",
           "draft_alternatives", "draft_engines", "draft_precision", "make_draft"]
