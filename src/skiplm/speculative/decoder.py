"""Lossless self-speculative decoding: a layer-skipped view of the model drafts, the full model verifies.

One model object plays both parts (Draft & Verify, SWIFT): the *draft* is the model with a :class:`~skiplm.SkipPlan`
applied, the *verifier* is the same model inside ``handle.disabled()``. Optionally the draft is a lower-precision copy
of the same weights (``draft_dtype="bfloat16"``, ``"int8"``: int8 weights with bfloat16 arithmetic, or
``"int8-dynamic"``, see :mod:`skiplm.speculative.quantize`), with or without a plan; its weights are then extra memory, reported
in :attr:`SpeculativeStats.draft_weight_bytes` (0 for the same-weights draft). A low-precision copy of a Llama-style
model runs through :class:`~skiplm.speculative.lean.LeanDraft` (``draft_engine="auto"`` or ``"lean"``): the same
computation with fused products and an in-place cache, which on a CPU is what makes a draft cheap; other families,
or ``draft_engine="modules"``, draft through a copy of the model's own modules. The verifier is always the model's own
modules.

Caches. The draft and the verifier keep separate KV caches: the draft's active attention layers compute keys and values
from the draft's own residual stream, which differs from the full model's. Both caches hold only committed tokens at
the start of a round; after verification both are cropped back to the accepted length (sliding-window layers record
their past so they can be cropped, as transformers' own assisted decoding does). The draft cache is filled lazily, at
the first speculative round and after tokens were committed while speculation was off (fallback) or the draft's plan
changed: the lean draft then takes those tokens' keys and values from the full model's cache (Draft & Verify's
sharing; :meth:`~skiplm.speculative.lean.LeanDraft.adopt`), a modules draft runs them through itself in one chunk.

One round, for committed tokens ``x[0..S-1]`` (the full cache holds ``x[0..S-2]``; ``x[S-1]`` was chosen by the full
model but not yet fed to it)::

    draft:   d1 = argmax q(.|x), d2 = argmax q(.|x, d1), ...  up to k tokens    (k draft forwards of 1 token)
    verify:  p0..pk = full(x[S-1], d1..dk)                                       (1 forward of k + 1 tokens)
    accept:  n = leading i with d_i == argmax p_{i-1};  commit d1..dn, then argmax p_n (a correction, or a bonus)

Greedy output is the full model's greedy output token for token (up to floating-point differences between a
(k+1)-token and a 1-token forward, which flip an argmax only at exact near-ties). Sampling (temperature, top-k, top-p,
applied alike to draft and full distributions) uses speculative rejection sampling (Leviathan et al. 2023, Chen et al.
2023): accept d_i with probability min(1, p(d_i) / q(d_i)); at the first rejection sample from norm(max(0, p - q)); if
all are accepted, sample a bonus token from p_k. Every committed token is then distributed as the full model's.

Batch > 1. Rows accept different numbers of drafts. Every row advances by ``m + 1`` tokens, ``m`` the fewest drafts any
unfinished row accepted: the first ``m`` drafts are accepted by every row and token ``m + 1`` is, per row, either the
full model's own choice (greedy: argmax p_m; sampling: the residual sample or bonus) or a draft that row accepted —
in all cases exactly what the full model would produce, so output stays exact. The waste: drafts a row accepted beyond
``m`` are thrown away and re-drafted next round (:attr:`SpeculativeStats.discarded`); with many rows, ``m`` is often
0 and speculation degenerates into plain decoding plus draft overhead. Left padding is handled with the attention
mask and per-row position ids. A row that emits an end-of-sequence token is finished: it keeps decoding (its tokens are
replaced by padding and ignored) until every row has finished; outputs end at the first EOS, which is kept.

Draft length (Draft & Verify, Zhang et al. 2023): drafting stops after a token whose draft probability (top-1 of the
draft distribution; at batch > 1, in any unfinished row, since the batch advances by its least accepting row) is below
a threshold, or after ``max_draft`` tokens. The threshold adapts to acceptance: it rises
when the smoothed acceptance rate is below a target and falls when above (:class:`AdaptiveDraftLength`).

Never slower (:class:`SpeedMonitor`): the seconds per committed token of speculative rounds and of plain decoding steps
are tracked online; when speculation is slower than plain decoding it falls back to plain steps (through the same
verify path with no drafts), retries later with a doubling back-off, and the stats report when and how long.

Hooks left for later work: ``on_round`` (a callback receiving a :class:`RoundInfo` after every round — where an online
skip-set search such as SWIFT's would observe acceptance), and :meth:`SpeculativeDecoder.set_plan` (swap the draft
plan between generations — where an offline draft-plan search plugs in). Changing the plan of a live draft cache
mid-generation is not supported: skipped attention layers hold placeholders, not keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..models.adapters import count_layers
from ..measure.agreement import greedy_decode
from .lean import LeanCache, LeanDraft, lean_draft_unsupported
from ..errors import DataError, PlanError
from ..plan import SkipPlan
from ..runtime import SkipHandle, decoder_stack, installed_handle
from ..skipper import apply

DRAFT_ENGINES = ("auto", "lean", "modules")
# drafted tokens per round at most; measured on the default model at batch 1 (8 GSM8K prompts) with the lean int8 /
# int8-dynamic drafts, 8 beat 6 by 2% / 12% (most rounds were fully accepted) and 10 was no better than 8
DEFAULT_MAX_DRAFT = 8


# -- statistics --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SpeculativeStats:
    """What happened during one generation. Counts of drafted / accepted tokens are summed over unfinished rows."""

    batch_size: int = 0
    new_tokens: int = 0  # tokens generated per row (before truncation at EOS)
    rounds: int = 0  # speculative rounds (draft + verify)
    row_rounds: int = 0  # sum over rounds of the unfinished rows
    drafted: int = 0
    accepted: int = 0  # drafts each row's verification accepted (before the batch minimum)
    committed_from_draft: int = 0  # drafts kept (after the batch minimum)
    discarded: int = 0  # accepted - committed_from_draft: drafts a row accepted but another row's rejection threw away
    plain_steps: int = 0  # single-token full-model steps (probe, fallback, or the last token)
    fallback_steps: int = 0  # plain steps taken because speculation did not pay
    fallbacks: int = 0  # times speculation was switched off
    fallback_events: list[dict[str, float]] = dataclasses.field(default_factory=list)
    accepted_histogram: list[int] = dataclasses.field(default_factory=list)  # rounds by tokens committed from drafts
    prefill_seconds: float = 0.0  # the full model's prefill
    draft_prefill_seconds: float = 0.0  # the draft's (lazy) prefill
    draft_seconds: float = 0.0  # drafting, including feeding the draft tokens committed while it was off
    verify_seconds: float = 0.0  # the full model's verification passes
    plain_seconds: float = 0.0  # plain decoding steps
    total_seconds: float = 0.0
    draft_weight_bytes: int = 0  # extra weights the draft needs (0: it is the same model)
    draft_engine: str = "modules"  # "lean": skiplm's fused forward of a low-precision copy; "modules": the model's own
    verify_weight_bytes: int = 0  # the verifier's packed output head (0: none)
    draft_cache_bytes: int = 0  # the draft KV cache at the end of the generation
    final_threshold: float | None = None
    draft_switches: int = 0  # times the on-the-fly selection changed the draft's skip set
    lookup_rounds: int = 0  # rounds whose drafts came from prompt lookup (no draft forward)
    lookup_committed: int = 0  # tokens those rounds kept from the lookup, summed over rows
    rounds_by_plan: list[int] = dataclasses.field(default_factory=list)  # speculative rounds per candidate plan

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_per_round(self) -> float:
        """Drafts accepted per row and round (before the batch minimum)."""
        return self.accepted / self.row_rounds if self.row_rounds else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens committed per row per speculative round (drafts kept + the verifier's own token)."""
        return (self.committed_from_draft / self.row_rounds + 1.0) if self.row_rounds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second after prefill, all rows (the first token, from the prefill, excluded)."""
        seconds = self.total_seconds - self.prefill_seconds
        return self.batch_size * max(self.new_tokens - 1, 0) / seconds if seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(acceptance_rate=self.acceptance_rate, mean_accepted_per_round=self.mean_accepted_per_round,
                    tokens_per_round=self.tokens_per_round, decode_tokens_per_second=self.decode_tokens_per_second)
        return data

    def describe(self) -> str:
        text = (f"{self.rounds} speculative rounds: {self.accepted}/{self.drafted} drafts accepted "
                f"({100 * self.acceptance_rate:.1f}%), {self.mean_accepted_per_round:.2f} accepted and "
                f"{self.tokens_per_round:.2f} tokens per round; {self.plain_steps} plain steps")
        if self.fallbacks:
            text += f" ({self.fallback_steps} after {self.fallbacks} fallback(s): speculation did not pay)"
        if self.discarded:
            text += f"; {self.discarded} accepted drafts discarded by the batch minimum"
        if self.lookup_rounds:
            text += f"; {self.lookup_rounds} rounds drafted by prompt lookup ({self.lookup_committed} tokens kept)"
        if len(self.rounds_by_plan) > 1:
            text += (f"; rounds per candidate draft plan {self.rounds_by_plan}, {self.draft_switches} switch(es)")
        text += (f"; draft {self.draft_seconds:.2f} s ({self.draft_engine} engine), verify {self.verify_seconds:.2f} s, "
                 f"plain {self.plain_seconds:.2f} s; draft weights {self.draft_weight_bytes / 2**20:.1f} MiB extra")
        if self.verify_weight_bytes:
            text += f", packed verifier head {self.verify_weight_bytes / 2**20:.1f} MiB"
        return text


@dataclasses.dataclass(frozen=True)
class RoundInfo:
    """Passed to ``on_round`` after every speculative round (a hook for online draft adaptation)."""

    index: int
    drafted: int  # k
    accepted: tuple[int, ...]  # per unfinished row
    committed: int  # tokens every row advanced (min accepted + 1)
    draft_seconds: float
    verify_seconds: float
    threshold: float | None
    drafter: str = "model"  # "model": the draft model drafted; "lookup": prompt lookup did


@dataclasses.dataclass
class SpeculativeOutput:
    tokens: list[list[int]]  # new tokens per row, ending at (and including) the first EOS
    stats: SpeculativeStats
    texts: list[str] | None = None  # decoded tokens, when a tokenizer was given


# -- draft length and fallback policies ------------------------------------------------------------------------------
class AdaptiveDraftLength:
    """Draft & Verify's confidence stop: stop drafting after a token whose draft top-1 probability is below
    ``threshold``; the threshold follows the acceptance rate (smoothed with ``beta``) towards ``target_acceptance``
    in steps of ``step``."""

    def __init__(self, threshold: float = 0.5, target_acceptance: float = 0.8, step: float = 0.05, beta: float = 0.5,
                 adapt: bool = True, bounds: tuple[float, float] = (0.0, 0.99)):
        self.threshold = threshold
        self.target_acceptance = target_acceptance
        self.step = step
        self.beta = beta
        self.adapt = adapt
        self.bounds = bounds
        self.acceptance: float | None = None

    def stop(self, confidence: torch.Tensor) -> bool:
        """``confidence``: [rows] top-1 draft probabilities of the token just drafted (unfinished rows)."""
        return bool(confidence.numel()) and float(confidence.min()) < self.threshold

    def update(self, drafted: int, accepted: int) -> None:
        if not self.adapt or drafted == 0:
            return
        rate = accepted / drafted
        self.acceptance = rate if self.acceptance is None else self.beta * self.acceptance + (1 - self.beta) * rate
        self.threshold += self.step if self.acceptance < self.target_acceptance else -self.step
        self.threshold = min(max(self.threshold, self.bounds[0]), self.bounds[1])


class SpeedMonitor:
    """Decides, step by step, whether to speculate: speculation must beat plain decoding in seconds per token.

    It first takes ``probe_steps`` plain steps to time plain decoding. Then it speculates; after ``min_rounds`` rounds,
    if the smoothed seconds per committed token exceed plain decoding's by more than ``margin``, it falls back to
    ``backoff`` plain steps and tries again, doubling the back-off after each failure (up to ``max_backoff``) and
    resetting it when speculation pays. Rates are exponential averages (weight ``smoothing`` on the past, so about
    five rounds count): one round that drafted badly does not switch speculation off. A retry is judged after
    ``retry_rounds`` rounds, blended into the estimate speculation already had: a draft measured slow is not given
    ``min_rounds`` slow rounds every time (at batch 8 on the default model, where speculation ran at ~0.7x, retries
    cost more than the fallbacks saved; at batch 1, where it pays, a faster-reacting average (0.5) fell back 7-8
    times per 8 generations of 64 tokens on unlucky rounds).
    """

    def __init__(self, probe_steps: int = 2, min_rounds: int = 3, margin: float = 0.0, backoff: int = 8,
                 max_backoff: int = 256, smoothing: float = 0.8, retry_rounds: int = 1):
        self.probe_steps = probe_steps
        self.min_rounds = min_rounds
        self.retry_rounds = retry_rounds
        self.margin = margin
        self.initial_backoff = self.backoff = backoff
        self.max_backoff = max_backoff
        self.smoothing = smoothing
        self.plain: tuple[float, float] | None = None  # smoothed (seconds, tokens) of plain steps
        self.spec: tuple[float, float] | None = None
        self.plain_observed = 0
        self.rounds = 0  # speculative rounds since speculation (re)started
        self.retrying = False  # speculation restarted after a fallback and has not paid since
        self.plain_left = 0  # plain steps left in the current fallback
        self.events: list[dict[str, float]] = []

    def speculate(self) -> bool:
        return self.plain_observed >= self.probe_steps and self.plain_left == 0

    @property
    def in_fallback(self) -> bool:
        return self.plain_left > 0

    @staticmethod
    def rate(pair: tuple[float, float] | None) -> float | None:
        return None if pair is None else pair[0] / pair[1]

    def _smooth(self, pair, seconds, tokens):
        if pair is None:
            return seconds, float(tokens)
        a = self.smoothing
        return a * pair[0] + (1 - a) * seconds, a * pair[1] + (1 - a) * tokens

    def observe_plain(self, seconds: float, tokens: int = 1) -> None:
        self.plain = self._smooth(self.plain, seconds, tokens)
        self.plain_observed += 1
        if self.plain_left > 0:
            self.plain_left -= 1
            if self.plain_left == 0:
                self.rounds, self.retrying = 0, True  # retry, keeping what speculation measured so far

    def observe_round(self, seconds: float, tokens: int, at_token: int = 0) -> None:
        self.spec = self._smooth(self.spec, seconds, tokens)
        self.rounds += 1
        if self.rounds < (self.retry_rounds if self.retrying else self.min_rounds) or self.plain is None:
            return
        spec, plain = self.rate(self.spec), self.rate(self.plain)
        if spec > plain * (1 + self.margin):
            self.events.append({"at_token": at_token, "plain_steps": self.backoff, "speculative_s_per_token": spec,
                                "plain_s_per_token": plain})
            self.plain_left = self.backoff
            self.backoff = min(self.backoff * 2, self.max_backoff)
        else:
            self.backoff, self.retrying = self.initial_backoff, False


class DraftSelector:
    """SWIFT-style on-the-fly choice of the draft's skip set among candidate ``plans`` (the first one starts), by
    measured speed on the text being generated: the smoothed seconds per committed token of each plan's rounds.

    Each plan is tried for ``trial_rounds`` rounds first; then the fastest drafts, and every ``explore_every`` rounds
    the plan tried least recently gets ``trial_rounds`` rounds again, so that a plan which suits the current text
    better is found. A switch drops the draft's KV cache (the next round refills it from the committed tokens), and
    that time is counted in the round that pays it. Kept by the decoder, so what it measured carries over between
    generations.
    """

    def __init__(self, plans: Sequence[SkipPlan], trial_rounds: int = 2, explore_every: int = 24,
                 smoothing: float = 0.5):
        if not plans:
            raise PlanError("on-the-fly draft selection needs at least one candidate plan.")
        if trial_rounds < 1 or explore_every < 1:
            raise DataError("trial_rounds and explore_every must be at least 1.")
        self.plans = list(plans)
        self.trial_rounds, self.explore_every, self.smoothing = trial_rounds, explore_every, smoothing
        self.rate: list[float | None] = [None] * len(self.plans)  # smoothed seconds per committed token
        self.last_tried = [-1] * len(self.plans)
        self.rounds = [0] * len(self.plans)
        self.current = 0
        self.trial_left = 0
        self.since_explore = 0
        self.round_index = 0

    def choose(self) -> int:
        """The plan to draft with in the next round."""
        if self.trial_left > 0:
            return self.current
        untried = [i for i, rate in enumerate(self.rate) if rate is None]
        if untried:
            self.current, self.trial_left = untried[0], self.trial_rounds
        elif self.since_explore >= self.explore_every and len(self.plans) > 1:
            best = self.best()
            self.current = min((i for i in range(len(self.plans)) if i != best), key=lambda i: self.last_tried[i])
            self.trial_left, self.since_explore = self.trial_rounds, 0
        else:
            self.current = self.best()
        return self.current

    def best(self) -> int:
        return min((i for i, rate in enumerate(self.rate) if rate is not None), key=lambda i: self.rate[i],
                   default=self.current)

    def observe(self, index: int, seconds: float, tokens: int) -> None:
        rate = seconds / max(tokens, 1)
        old = self.rate[index]
        self.rate[index] = rate if old is None else self.smoothing * old + (1 - self.smoothing) * rate
        self.last_tried[index] = self.round_index
        self.rounds[index] += 1
        self.round_index += 1
        if self.trial_left > 0:  # a trial round
            self.trial_left -= 1
        else:
            self.since_explore += 1


class PromptLookup:
    """Prompt-lookup drafting (n-gram lookup, as in transformers' ``prompt_lookup_num_tokens``), combined with the
    draft model: when the last ``ngram`` committed tokens of every unfinished row occurred earlier in that row, the
    tokens that followed their latest occurrence are the drafts — no draft forward at all; else the draft model
    drafts. Lookup is kept only while it pays: the tokens kept per lookup round are averaged (weight ``smoothing`` on
    the past) and lookup is skipped while the average is below ``min_kept``, with one trial every ``retry_every``
    rounds. (A lookup round costs one verification of its proposal; on the default model that is about two plain
    steps for 7 tokens, paid back by about one kept token.)"""

    def __init__(self, ngram: int = 3, min_kept: float = 1.0, smoothing: float = 0.7, retry_every: int = 16):
        if ngram < 1:
            raise DataError(f"the lookup n-gram must be at least 1 token, got {ngram}.")
        self.ngram, self.min_kept, self.smoothing, self.retry_every = ngram, min_kept, smoothing, retry_every
        self.kept: float | None = None  # tokens kept per lookup round, averaged
        self.since_lookup = 0

    def propose(self, seq: torch.Tensor, committed: int, pads: torch.Tensor, active: torch.Tensor, k_max: int,
                pad: int) -> torch.Tensor | None:
        """Drafts [B, k] (k <= k_max; finished rows get ``pad``), or None: no match in some row, or lookup does not
        pay now."""
        if self.kept is not None and self.kept < self.min_kept and self.since_lookup < self.retry_every:
            self.since_lookup += 1
            return None
        proposals: list[torch.Tensor | None] = []
        for row in range(seq.shape[0]):
            if not bool(active[row]):
                proposals.append(None)
                continue
            tokens = seq[row, int(pads[row]):committed]
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

    def observe(self, kept: int) -> None:
        """Tokens every row kept from a lookup round's drafts."""
        a = self.smoothing
        self.kept = kept if self.kept is None else a * self.kept + (1 - a) * kept


# -- sampling helpers --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise DataError(f"temperature must be > 0 when sampling, got {self.temperature}.")
        if self.top_k < 0:
            raise DataError(f"top_k must be >= 0 (0: off), got {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise DataError(f"top_p must be in (0, 1], got {self.top_p}.")

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution decoding draws from: logits [..., V] -> probabilities [..., V] (float32). Greedy: the plain
        softmax (only its top-1 value is used, as the draft's confidence)."""
        logits = logits.float()
        if not self.do_sample:
            return torch.softmax(logits, dim=-1)
        logits = logits / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            sorted_probs = torch.softmax(sorted_logits, dim=-1)
            # drop a token when the tokens ranked above it already hold top_p of the mass (the top-1 always stays)
            drop = (sorted_probs.cumsum(-1) - sorted_probs) >= self.top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
        return torch.softmax(logits, dim=-1)


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``probs`` [B, V] -> [B]."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -- the decoder -------------------------------------------------------------------------------------------------------
class SpeculativeDecoder:
    """A draft (``model`` under ``plan``, or a ``draft_dtype`` copy of it) and the full model as verifier.

    A plan from ``skiplm draft-search`` may name a precision (:func:`draft_precision`); it is used unless
    ``draft_dtype`` is given. Keep one for many generations (a low-precision copy is made once; the adaptive
    threshold carries over). Call
    :meth:`close` (or use ``with``) to remove the plan it applied. With ``plan=None`` and a plan already applied to
    ``model``, that plan drafts (and stays applied after :meth:`close`).
    """

    def __init__(self, model: nn.Module, plan: SkipPlan | None = None, *, draft_dtype: torch.dtype | str | None = None,
                 check_model: bool = True, draft_length: AdaptiveDraftLength | None = None,
                 alternatives: Sequence[SkipPlan] | DraftSelector = (), draft_engine: str = "auto",
                 prompt_lookup: int | PromptLookup | None = None, pack_head: bool = True):
        if draft_engine not in DRAFT_ENGINES:
            raise DataError(f"unknown draft engine {draft_engine!r}; use one of {', '.join(DRAFT_ENGINES)}.")
        # combined with n-gram prompt lookup (an n-gram length, or a PromptLookup): kept between generations
        self.lookup = PromptLookup(prompt_lookup) if isinstance(prompt_lookup, int) else prompt_lookup
        self.verify_head = self._verify_head(model) if pack_head else None
        self.model = model
        self.draft_length = draft_length or AdaptiveDraftLength()
        # fallback=True: one monitor per batch size (a step's cost depends on it); what each learned carries over
        # between generations
        self.monitors: dict[int, SpeedMonitor] = {}
        self._owned: list[SkipHandle] = []
        self.draft_handle: SkipHandle | None = None
        existing: SkipHandle | None = installed_handle(model)
        if draft_dtype is None and plan is not None:
            draft_dtype = draft_precision(plan)
        if draft_dtype is not None:
            if existing is not None:
                raise PlanError("a plan is already applied to this model; remove it and pass the draft plan as plan= "
                                "(a low-precision draft is a copy of the plain model).")
            self.draft_model = self._low_precision_draft(draft_dtype, draft_engine)
            if isinstance(self.draft_model, LeanDraft):
                if plan is not None:
                    self._check_plan(plan, check_model)
                    self.draft_model.plan = plan
                self.draft_weight_bytes = self.draft_model.weight_bytes
            else:
                self.draft_handle = self._apply(self.draft_model, plan, check_model) if plan is not None else None
                self.draft_weight_bytes = _tensor_bytes(self.draft_model)
        else:
            if draft_engine == "lean":
                raise PlanError("the lean draft engine drafts from a copy of the weights: give a draft precision "
                                "(draft_dtype=, e.g. int8).")
            if plan is None:
                if existing is None:
                    raise PlanError("self-speculative decoding needs a draft: pass plan= (a skip plan; an empty plan "
                                    "drafts with the full model), or draft_dtype= for a low-precision draft.")
                self.draft_handle = existing
            else:
                self.draft_handle = self._apply(model, plan, check_model)
            self.draft_model = model
            self.draft_weight_bytes = 0
        self.selector: DraftSelector | None = None
        self._active_plan = 0  # the selector's plan applied to the draft now
        if alternatives:
            if plan is None or (self.draft_handle is not None and self.draft_handle not in self._owned):
                raise PlanError("on-the-fly draft selection needs the draft plan passed as plan= (the decoder switches "
                                "the draft between it and the alternatives).")
            # a selector of an earlier decoder carries on with what it measured; its first plan must be this one
            selector = alternatives if isinstance(alternatives, DraftSelector) else DraftSelector([plan, *alternatives])
            if selector.plans[0] != plan:
                raise PlanError("the selector's first plan must be the draft plan passed as plan=.")
            for alternative in selector.plans[1:]:
                if check_model:
                    alternative.check_model(self.model)
                elif alternative.num_layers != plan.num_layers:
                    raise PlanError("every alternative draft plan must cover the model's layers.")
            self.selector = selector

    @staticmethod
    def _verify_head(model: nn.Module):
        """The output head, pre-packed (:func:`skiplm.speculative.quantize.packed_head`), for the verifier of a family whose
        logits are exactly ``lm_head(last hidden state)`` (the lean draft's families): verifying 7 tokens through
        the default model's head takes ~11 ms with ``F.linear`` on this CPU and ~6 ms packed. Else None."""
        from .quantize import packed_head

        return packed_head(model) if lean_draft_unsupported(model) is None else None

    def _low_precision_draft(self, precision: torch.dtype | str, engine: str) -> LeanDraft | nn.Module:
        """The lean draft (fused, preallocated cache) where the model's family allows and ``engine`` is not
        "modules"; else a copy of the model's modules (:func:`skiplm.speculative.quantize.draft_copy`)."""
        from .quantize import draft_copy, precision_name

        precision_name(precision)  # an unknown precision is refused before anything else
        unsupported = lean_draft_unsupported(self.model) if engine != "modules" else "not asked for"
        if unsupported is None:
            return LeanDraft(self.model, precision)
        if engine == "lean":
            raise PlanError(f"the lean draft engine does not support this model ({unsupported}); use "
                            "draft_engine='modules' (or 'auto').")
        return draft_copy(self.model, precision)

    @property
    def draft_engine(self) -> str:
        """"lean" (:class:`~skiplm.speculative.lean.LeanDraft`) or "modules" (the model's own modules draft)."""
        return "lean" if isinstance(self.draft_model, LeanDraft) else "modules"

    def _check_plan(self, plan: SkipPlan, check_model: bool) -> None:
        from ..policies.core import is_policy

        if is_policy(plan):
            raise PlanError("a speculative draft is a static skip plan (skiplm plan); an input-adaptive policy cannot "
                            "draft: the full model must verify with the draft switched off, which policies do not do.")
        if check_model:  # against the model's own weights (a low-precision copy's differ by design)
            plan.check_model(self.model)
        elif plan.num_layers != count_layers(self.model):
            raise PlanError(f"the draft plan covers {plan.num_layers} layers; the model has {count_layers(self.model)}.")

    def _apply(self, model: nn.Module, plan: SkipPlan, check_model: bool) -> SkipHandle:
        self._check_plan(plan, check_model)
        handle = apply(model, plan, check_model=False)
        self._owned.append(handle)
        return handle

    @property
    def plan(self) -> SkipPlan | None:
        if isinstance(self.draft_model, LeanDraft):
            return self.draft_model.plan
        return self.draft_handle.plan if self.draft_handle is not None else None

    def set_plan(self, plan: SkipPlan, check_model: bool = True) -> None:
        """Draft with another plan from the next generation on (hook for an offline draft-plan search)."""
        if self.selector is not None:
            raise PlanError("this decoder chooses its draft plan on the fly among its alternatives; make a new decoder.")
        if isinstance(self.draft_model, LeanDraft):
            self._check_plan(plan, check_model)
            self.draft_model.plan = plan
            return
        if self.draft_handle is not None and self.draft_handle in self._owned:
            self.draft_handle.remove()
            self._owned.remove(self.draft_handle)
        elif self.draft_handle is not None:
            raise PlanError("the draft plan was applied by the caller; remove it and pass plan= instead.")
        self.draft_handle = self._apply(self.draft_model, plan, check_model)

    def _switch_draft(self, index: int) -> None:
        """Draft with the selector's plan ``index`` (the draft model's handle is the decoder's own)."""
        self._active_plan = index
        if isinstance(self.draft_model, LeanDraft):
            self.draft_model.plan = self.selector.plans[index]
            return
        self.draft_handle.remove()
        self._owned.remove(self.draft_handle)
        self.draft_handle = apply(self.draft_model, self.selector.plans[index], check_model=False)
        self._owned.append(self.draft_handle)

    def close(self) -> None:
        while self._owned:
            self._owned.pop().remove()

    def __enter__(self) -> SpeculativeDecoder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _verifying(self):
        """The full model: whatever plan is applied to ``model`` (the draft's, or another) is off while verifying."""
        handle = installed_handle(self.model)
        return handle.disabled() if handle is not None else contextlib.nullcontext()

    # -- generation --------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        max_draft: int = DEFAULT_MAX_DRAFT,
        seed: int | None = None,
        streamer: Any = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        fallback: bool | SpeedMonitor = True,
        on_round: Callable[[RoundInfo], None] | None = None,
    ) -> SpeculativeOutput:
        """Generate up to ``max_new_tokens`` per row from left-padded ``input_ids`` [B, T] (see the module docstring).

        ``fallback``: True (this decoder's :class:`SpeedMonitor` for this batch size, which keeps what it measured
        between generations), a monitor of your own, or False (always speculate).
        ``streamer``: an object with ``put(tensor)`` / ``end()`` (e.g. transformers' ``TextStreamer``, batch 1), or
        a callable receiving, per step, a list with each row's newly committed tokens.
        """
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise DataError(f"input_ids must be [batch, tokens] with at least one token, got {tuple(input_ids.shape)}.")
        if max_new_tokens < 1:
            raise DataError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        if max_draft < 1:
            raise DataError(f"max_draft must be at least 1, got {max_draft}.")
        sampling = Sampling(do_sample, temperature, top_k, top_p)
        start = time.perf_counter()
        device = next(self.model.parameters()).device
        ids = input_ids.to(device)
        batch, prompt_length = ids.shape
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device).long()
        if mask.shape != ids.shape:
            raise DataError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}.")
        if bool((mask[:, 1:] < mask[:, :-1]).any()) or not bool(mask[:, -1].all()):
            raise DataError("speculative decoding needs left padding: each attention_mask row must be 0s then 1s.")
        eos = torch.as_tensor(_eos_ids(self.model, eos_token_id), dtype=torch.long, device=device)
        pad = pad_token_id if pad_token_id is not None else _pad_id(self.model, eos)
        generator = None
        if do_sample:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
        if isinstance(fallback, SpeedMonitor):
            monitor = fallback
        elif fallback:
            monitor = self.monitors.setdefault(batch, SpeedMonitor())
        else:
            monitor = None
        events_before = len(monitor.events) if monitor is not None else 0
        policy = self.draft_length
        stats = SpeculativeStats(batch_size=batch, draft_weight_bytes=self.draft_weight_bytes,
                                 draft_engine=self.draft_engine,
                                 verify_weight_bytes=self.verify_head.nbytes if self.verify_head is not None else 0)

        capacity = prompt_length + max_new_tokens + max_draft + 1
        seq = torch.full((batch, capacity), pad, dtype=torch.long, device=device)  # committed tokens, left padded
        seq[:, :prompt_length] = ids
        full_mask = torch.cat([mask, mask.new_ones(batch, capacity - prompt_length)], dim=1)
        pads = prompt_length - mask.sum(-1)  # [B] left-padding per row
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        outputs: list[list[int]] = [[] for _ in range(batch)]

        def forward(model, start_index: int, tokens: torch.Tensor, cache, keep: int, head=None):
            """``tokens`` [B, n] at sequence indices start_index.. over a cache holding start_index tokens; with
            ``head``, the model's backbone runs and ``head`` makes the logits (the packed verifier head)."""
            n = tokens.shape[1]
            positions = (torch.arange(start_index, start_index + n, device=device)[None] - pads[:, None]).clamp(min=0)
            if isinstance(model, LeanDraft):
                return model(tokens, full_mask[:, :start_index + n], positions, cache, keep)
            inputs = dict(input_ids=tokens, attention_mask=full_mask[:, :start_index + n], position_ids=positions,
                          cache=cache, use_cache=True)
            if head is not None:
                out = decoder_stack(model)(**inputs)
                return head(out.last_hidden_state[:, -keep:]).float(), out.cache
            out = model(**inputs, logits_to_keep=keep)
            return out.logits.float(), out.cache

        def commit(new: torch.Tensor) -> None:
            """Append ``new`` [B, n] to every row; rows finish at their first EOS."""
            nonlocal committed
            new = torch.where(finished[:, None], torch.full_like(new, pad), new)
            is_eos = torch.isin(new, eos) & ~finished[:, None]
            after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0  # positions after a row's first EOS in `new`
            new = new.masked_fill(after_eos, pad)
            streamed = []
            for row, tokens in enumerate(new.tolist()):
                keep = [] if finished[row] else tokens[: int(after_eos[row].logical_not().sum())]
                outputs[row].extend(keep)
                streamed.append(keep)
            finished.logical_or_(is_eos.any(-1))
            seq[:, committed:committed + new.shape[1]] = new
            committed += new.shape[1]
            _stream(streamer, streamed)

        # prefill of the full model; its last logits give the first token
        t = time.perf_counter()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with self._verifying():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1)
        full_cache = out.cache
        full_cache.activate_past_recording()  # sliding-window layers must keep their past to be cropped
        last = out.logits[:, -1]
        first = _sample(sampling.probabilities(last), generator) if do_sample else last.argmax(-1)
        committed = prompt_length
        commit(first[:, None])
        stats.prefill_seconds = time.perf_counter() - t
        generated = 1
        draft_cache, drafted_length = None, 0  # the draft cache holds seq[:, :drafted_length]
        selector = self.selector
        if selector is not None:
            stats.rounds_by_plan = [0] * len(selector.plans)

        while generated < max_new_tokens and not bool(finished.all()):
            room = max_new_tokens - generated  # the round commits at most k + 1 <= room tokens
            k_max = min(max_draft, room - 1)
            speculate = k_max >= 1 and (monitor is None or monitor.speculate())
            active = ~finished
            # -- draft ------------------------------------------------------------------------------------------------
            drafts, draft_probs = [], []
            t = time.perf_counter()
            draft_prefill = 0.0
            if speculate and selector is not None and selector.choose() != self._active_plan:
                self._switch_draft(selector.current)
                draft_cache, drafted_length = None, 0  # the new plan's draft refills its cache this round
                stats.draft_switches += 1
            lookup = (self.lookup.propose(seq, committed, pads, active, k_max, pad)
                      if speculate and self.lookup is not None else None)
            if lookup is not None:  # the context repeats itself: its continuation drafts, no draft forward needed
                drafts = list(lookup.unbind(1))
            elif speculate:
                if isinstance(self.draft_model, LeanDraft) and drafted_length < committed - 1:
                    # the lean draft takes what the full cache holds (all committed tokens but the last) from it
                    adopted = self.draft_model.adopt(full_cache, drafted_length, committed - 1, draft_cache)
                    if adopted is not None:
                        draft_cache, drafted_length = adopted, committed - 1
                # committed tokens the draft has not seen, [B, >= 1]; the first time, everything: the draft's prefill
                feed = seq[:, drafted_length:committed]
                for i in range(k_max):
                    logits, draft_cache = forward(self.draft_model, drafted_length, feed, draft_cache, 1)
                    if drafted_length == 0:
                        draft_cache.activate_past_recording()
                        draft_prefill = time.perf_counter() - t
                        stats.draft_prefill_seconds += draft_prefill
                    drafted_length += feed.shape[1]
                    q = sampling.probabilities(logits[:, -1])  # [B, V]
                    token = _sample(q, generator) if do_sample else logits[:, -1].argmax(-1)
                    drafts.append(token)
                    draft_probs.append(q)
                    if i + 1 == k_max or policy.stop(q.max(-1).values[active]):
                        break
                    feed = token[:, None]
            k = len(drafts)
            draft_seconds = time.perf_counter() - t - draft_prefill
            # -- verify: one forward of the full model over [last committed token, d1..dk] -----------------------------
            t = time.perf_counter()
            inputs = seq[:, committed - 1:committed]
            if k:
                inputs = torch.cat([inputs, torch.stack(drafts, dim=1)], dim=1)  # [B, k + 1]
            with self._verifying():
                logits, full_cache = forward(self.model, committed - 1, inputs, full_cache, k + 1,  # [B, k + 1, V]
                                             head=self.verify_head)
            if k:
                d = torch.stack(drafts, dim=1)  # [B, k]
                if do_sample:
                    p = sampling.probabilities(logits)  # [B, k + 1, V]
                    # [B, k, V]; a lookup proposes its tokens with certainty
                    q = (torch.stack(draft_probs, dim=1) if lookup is None
                         else nn.functional.one_hot(d, p.shape[-1]).to(p.dtype))
                    p_d = p[:, :k].gather(-1, d[..., None]).squeeze(-1)
                    q_d = q.gather(-1, d[..., None]).squeeze(-1)
                    u = torch.rand(p_d.shape, generator=generator, device=device)
                    accept = u * q_d < p_d  # u < min(1, p/q), q(d) > 0 since d was drawn from q
                    n = accept.long().cumprod(-1).sum(-1)  # [B] leading accepted drafts
                    rows = torch.arange(batch, device=device)
                    q_padded = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)  # at n == k: the bonus, from p_k
                    residual = (p[rows, n] - q_padded[rows, n]).clamp(min=0)
                    empty = residual.sum(-1, keepdim=True) <= 0
                    residual = torch.where(empty, p[rows, n], residual)
                    correction = _sample(residual / residual.sum(-1, keepdim=True), generator)
                    tokens = torch.cat([d, d[:, :1]], dim=1).scatter(1, n[:, None], correction[:, None])
                else:
                    target = logits.argmax(-1)  # [B, k + 1]: the full model's greedy choices
                    n = (d == target[:, :k]).long().cumprod(-1).sum(-1)
                    tokens = target  # target[:, :n] == d[:, :n]
                accepted = n[active]
                m = int(accepted.min()) if accepted.numel() else 0
                new = tokens[:, :m + 1]
            else:  # a plain step
                last = logits[:, -1]
                new = (_sample(sampling.probabilities(last), generator) if do_sample else last.argmax(-1))[:, None]
                m = 0
            old_committed = committed
            commit(new)
            # crop both caches to the committed tokens minus the last one (which neither has seen yet)
            full_cache.crop(-(k - m))
            if draft_cache is not None:
                excess = max(drafted_length - (committed - 1), 0)
                draft_cache.crop(-excess)
                drafted_length -= excess
            verify_seconds = time.perf_counter() - t
            generated += m + 1
            # -- bookkeeping -------------------------------------------------------------------------------------------
            if k:
                rows_active = int(active.sum())
                stats.rounds += 1
                stats.row_rounds += rows_active
                stats.drafted += k * rows_active
                stats.accepted += int(accepted.sum())
                stats.committed_from_draft += m * rows_active
                stats.discarded = stats.accepted - stats.committed_from_draft
                stats.draft_seconds += draft_seconds
                stats.verify_seconds += verify_seconds
                if len(stats.accepted_histogram) <= m:
                    stats.accepted_histogram.extend([0] * (m + 1 - len(stats.accepted_histogram)))
                stats.accepted_histogram[m] += 1
                if lookup is not None:
                    stats.lookup_rounds += 1
                    stats.lookup_committed += m * rows_active
                    self.lookup.observe(m)
                else:  # the draft model's own record: its confidence threshold and its plan's speed
                    policy.update(k * rows_active, int(accepted.sum()))
                if selector is not None and lookup is None:  # a switch's refill is this round's cost
                    selector.observe(self._active_plan, draft_prefill + draft_seconds + verify_seconds, m + 1)
                    stats.rounds_by_plan[self._active_plan] += 1
                if monitor is not None:
                    monitor.observe_round(draft_seconds + verify_seconds, m + 1, at_token=old_committed - prompt_length)
                if on_round is not None:
                    on_round(RoundInfo(stats.rounds - 1, k, tuple(accepted.tolist()), m + 1, draft_seconds,
                                       verify_seconds, policy.threshold, "model" if lookup is None else "lookup"))
            else:
                stats.plain_steps += 1
                stats.plain_seconds += verify_seconds
                if monitor is not None:
                    if monitor.in_fallback:
                        stats.fallback_steps += 1
                    monitor.observe_plain(verify_seconds)

        _stream_end(streamer)
        stats.new_tokens = generated
        stats.total_seconds = time.perf_counter() - start
        stats.draft_cache_bytes = _cache_bytes(draft_cache)
        stats.final_threshold = policy.threshold
        if monitor is not None:
            stats.fallback_events = monitor.events[events_before:]
            stats.fallbacks = len(stats.fallback_events)
        return SpeculativeOutput(outputs, stats)


def generate(
    model: nn.Module,
    tokenizer=None,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    plan: SkipPlan | None = None,
    draft_dtype: torch.dtype | str | None = None,
    alternatives: Sequence[SkipPlan] = (),
    draft_engine: str = "auto",
    prompt_lookup: int | None = None,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    max_draft: int = DEFAULT_MAX_DRAFT,
    seed: int | None = None,
    streamer: Any = None,
    check_model: bool = True,
    **options: Any,
) -> SpeculativeOutput:
    """Self-speculative generation in one call: ``model`` under ``plan`` drafts, ``model`` verifies (with
    ``alternatives``, the draft's skip set is chosen on the fly among ``plan`` and them: :class:`DraftSelector`).

    ``tokenizer`` (optional) supplies the EOS / pad ids when the model's generation config lacks them, and decodes the
    outputs into ``texts``. Other keyword ``options`` go to :meth:`SpeculativeDecoder.generate` (``fallback``,
    ``eos_token_id``, ``pad_token_id``, ``on_round``). For many generations, keep a :class:`SpeculativeDecoder`.
    """
    if input_ids is None:
        raise DataError("input_ids is required.")
    if tokenizer is not None:
        if options.get("eos_token_id") is None and getattr(model.generation_config, "eos_token_id", None) is None:
            options["eos_token_id"] = tokenizer.eos_token_id
        if options.get("pad_token_id") is None and getattr(model.generation_config, "pad_token_id", None) is None:
            options["pad_token_id"] = tokenizer.pad_token_id
    with SpeculativeDecoder(model, plan, draft_dtype=draft_dtype, check_model=check_model,
                            alternatives=alternatives, draft_engine=draft_engine,
                            prompt_lookup=prompt_lookup) as decoder:
        output = decoder.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                  temperature=temperature, top_k=top_k, top_p=top_p, max_draft=max_draft, seed=seed,
                                  streamer=streamer, **options)
    if tokenizer is not None:
        output.texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in output.tokens]
    return output


def custom_generate(model: nn.Module, input_ids: torch.Tensor, logits_processor=None, stopping_criteria=None,
                    generation_config=None, synced_gpus: bool = False, streamer: Any = None, *,
                    draft_plan: SkipPlan | None = None, draft_dtype: torch.dtype | str | None = None,
                    prompt_lookup: int | None = None, speculative_decoder: SpeculativeDecoder | None = None,
                    **model_kwargs: Any) -> torch.Tensor:
    """Self-speculative decoding inside transformers' own ``generate()``, as its ``custom_generate`` callable::

        model.generate(**inputs, max_new_tokens=64, do_sample=False,
                       custom_generate=skiplm.speculative.custom_generate, draft_dtype="int8", prompt_lookup=3)

    transformers prepares the inputs and the generation config, then calls this instead of its decoding loop; the
    draft is given by ``draft_plan`` and / or ``draft_dtype`` (as for :class:`SpeculativeDecoder`), or by a
    ``speculative_decoder`` kept across calls (its copy, adaptive length and monitors carry over). Greedy decoding
    and sampling with temperature / top-k / top-p are supported; other logits processors (repetition penalty,
    minimum length, ...) and ``return_dict_in_generate`` are refused, since the speculative loop does not apply them.
    Returns the sequences, as ``generate()`` does: prompt, then new tokens, rows that ended early padded.
    """
    config = generation_config
    unsupported = [type(p).__name__ for p in (logits_processor or [])
                   if type(p).__name__ not in ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper")]
    if unsupported:
        raise DataError(f"speculative decoding applies temperature, top-k and top-p only; this generation config also "
                        f"asks for {', '.join(unsupported)}. Drop those options, or generate without custom_generate.")
    if config.return_dict_in_generate or config.num_beams > 1:
        raise DataError("speculative decoding returns sequences only, one beam: drop return_dict_in_generate / "
                        "num_beams.")
    if synced_gpus:
        raise DataError("speculative decoding does not run across synced GPUs (DeepSpeed ZeRO-3 / FSDP).")
    prompt_length = input_ids.shape[1]
    max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt_length
    do_sample = bool(config.do_sample)
    options = dict(max_new_tokens=max_new, do_sample=do_sample, streamer=streamer,
                   eos_token_id=config.eos_token_id if config.eos_token_id is not None else [],
                   pad_token_id=config.pad_token_id)
    if do_sample:
        options.update(temperature=config.temperature or 1.0, top_k=config.top_k or 0, top_p=config.top_p or 1.0)
    decoder = speculative_decoder or SpeculativeDecoder(model, draft_plan, draft_dtype=draft_dtype,
                                                        prompt_lookup=prompt_lookup)
    try:
        output = decoder.generate(input_ids, model_kwargs.get("attention_mask"), **options)
    finally:
        if speculative_decoder is None:
            decoder.close()
    pad = config.pad_token_id if config.pad_token_id is not None else _pad_id(model, torch.as_tensor(
        _eos_ids(model, config.eos_token_id), dtype=torch.long))
    width = max(len(tokens) for tokens in output.tokens)
    new = torch.full((input_ids.shape[0], width), pad, dtype=input_ids.dtype, device=input_ids.device)
    for row, tokens in enumerate(output.tokens):
        new[row, :len(tokens)] = torch.as_tensor(tokens, dtype=input_ids.dtype)
    return torch.cat([input_ids, new], dim=1)


@torch.inference_mode()
def plain_generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   max_new_tokens: int = 128, eos_token_id=None, pad_token_id: int | None = None) -> list[list[int]]:
    """Plain greedy decoding with the KV cache (the reference speculative greedy output must equal): argmax only,
    no logits processing; outputs end at the first EOS (kept)."""
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device).long()
    eos = _eos_ids(model, eos_token_id)
    pad = pad_token_id if pad_token_id is not None else _pad_id(model, torch.as_tensor(eos, dtype=torch.long))
    return greedy_decode(model, ids, mask, max_new_tokens, eos, pad)


def draft_alternatives(plan: SkipPlan | None) -> list[SkipPlan]:
    """The runner-up skip sets ``skiplm draft-search`` recorded in a draft plan (``draft.alternatives``: lists of
    blocks), as plans for on-the-fly selection (:class:`DraftSelector`); [] when it recorded none."""
    found = ((plan.provenance or {}).get("draft") or {}).get("alternatives") if plan is not None else None
    return [SkipPlan.from_layers(plan.num_layers, blocks=blocks, model=plan.model,
                                 provenance={"method": "draft-search alternative"})
            for blocks in found or []]


def draft_precision(plan: SkipPlan | None) -> str | None:
    """The precision a draft plan from ``skiplm draft-search`` drafts in (its provenance's ``draft.precision``), or
    None for the model's own weights. A draft is the plan's skips *and* this precision."""
    found = ((plan.provenance or {}).get("draft") or {}).get("precision") if plan is not None else None
    return None if found in (None, "float32") else found


# -- helpers -----------------------------------------------------------------------------------------------------------
def _eos_ids(model: nn.Module, eos_token_id) -> list[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(i) for i in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])]


def _pad_id(model: nn.Module, eos: torch.Tensor) -> int:
    configured = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if configured is not None:
        return int(configured if not isinstance(configured, (list, tuple)) else configured[0])
    return int(eos[0]) if eos.numel() else 0


def _tensor_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = (tensor.data_ptr(), tensor.numel())
        if key not in seen:  # tied weights count once
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def _cache_bytes(cache) -> int:
    if cache is None:
        return 0
    if isinstance(cache, LeanCache):
        return cache.nbytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _stream(streamer, rows: list[list[int]]) -> None:
    if streamer is None:
        return
    if hasattr(streamer, "put"):
        if len(rows) != 1:
            raise DataError("a put()/end() streamer (e.g. TextStreamer) supports batch size 1 only; pass a callable.")
        if rows[0]:
            streamer.put(torch.tensor(rows[0]))
    else:
        streamer(rows)


def _stream_end(streamer) -> None:
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()


__all__ = ["AdaptiveDraftLength", "PromptLookup", "RoundInfo", "Sampling", "SpeculativeDecoder", "SpeculativeOutput",
           "SpeculativeStats", "SpeedMonitor", "custom_generate", "generate", "plain_generate"]
