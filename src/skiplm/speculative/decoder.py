"""Lossless self-speculative decoding: a layer-skipped view of the model drafts, the full model verifies.

One model object plays both parts (Draft & Verify, SWIFT): the *draft* is the model with a :class:`~skiplm.SkipPlan`
applied, the *verifier* is the same model inside ``handle.disabled()``. Optionally the draft is a lower-precision copy
of the same weights (``draft_dtype="bfloat16"``, ``"int8"``: int8 weights with bfloat16 arithmetic, or
``"int8-dynamic"``, see :mod:`skiplm.speculative.quantize`), with or without a plan; its weights are then extra memory,
reported in :attr:`SpeculativeStats.draft_weight_bytes` (0 for the same-weights draft). Which engine runs a draft is a
registered draft kind (:mod:`skiplm.speculative.drafts`): ``draft_engine="auto"`` takes the lean engine
(:class:`~skiplm.speculative.lean.LeanDraft`: fused products and an in-place cache, which on a CPU is what makes a
draft cheap) for a low-precision copy of a Llama-style model, and the model's own modules otherwise. The verifier is
always the model's own modules. Prompt lookup (``prompt_lookup=``) drafts instead of the draft model when the text
repeats itself.

The round itself — draft, verify, accept, commit — is :func:`skiplm.speculative.round.speculative_round`; the
acceptance rules (greedy, and rejection sampling for temperature / top-k / top-p) are in
:mod:`skiplm.speculative.sampling`. This module runs rounds until the generation is done, and keeps the books.

Caches. The draft and the verifier keep separate KV caches: the draft's active attention layers compute keys and values
from the draft's own residual stream, which differs from the full model's. Both caches hold only committed tokens at
the start of a round; after verification both are cropped back to the accepted length (sliding-window layers record
their past so they can be cropped, as transformers' own assisted decoding does). The draft cache is filled lazily, at
the first speculative round and after tokens were committed while speculation was off (fallback) or the draft's plan
changed: the lean draft then takes those tokens' keys and values from the full model's cache (Draft & Verify's
sharing; :meth:`~skiplm.speculative.lean.LeanDraft.adopt`), a modules draft runs them through itself in one chunk.

Batch > 1. Rows accept different numbers of drafts, and each row commits its own (ragged rounds, exact, see
:mod:`skiplm.speculative.round`): the batch advances by the most drafts a row accepted, and the rows that accepted
fewer leave masked holes in both caches, so one slow row does not stall the others. Models with a sliding attention
window cannot take holes: there every row advances by the fewest drafts any unfinished row accepted, plus one, and
the drafts a row accepted beyond that are re-drafted next round (:attr:`SpeculativeStats.discarded`). Left padding is
handled with the attention mask and per-row position ids; a row that emits an end-of-sequence token, or has its
``max_new_tokens``, is finished (:class:`~skiplm.speculative.state.Committed`).

What decides (:mod:`skiplm.speculative.controllers`). Draft length (Draft & Verify, Zhang et al. 2023): drafting stops
after a token whose draft probability (top-1 of the draft distribution) is below a threshold — at batch > 1, once
fewer than half the unfinished rows are still confident (in ragged rounds; else in any row, since the batch advances
by its least accepting row) — or after ``max_draft`` tokens; the threshold follows acceptance
(:class:`AdaptiveDraftLength`). Never slower (:class:`SpeedMonitor`): the seconds per committed token of
speculative rounds and of plain decoding steps are tracked online; when speculation is slower than plain decoding it
falls back to plain steps (through the same verify path with no drafts), retries later with a doubling back-off, and
the stats report when and how long. With ``alternatives``, the draft's skip set is chosen on the fly
(:class:`DraftSelector`, SWIFT-style).

Setup. Making a low-precision draft (its weights quantized or cast, packed, the lean engine compiled and warmed up) and
packing the verifier's head is paid once per decoder, in its constructor, and reported apart from decoding:
:attr:`SpeculativeDecoder.setup` (a :class:`~skiplm.speculative.stats.SetupStats`), also attached to the stats of the
decoder's first generation (``stats.setup``, not counted in ``total_seconds``). The draft's weights come from the draft
cache (:mod:`skiplm.speculative.cache`) where it holds them: on disk from an earlier process, or shared with an engine
the same :class:`~skiplm.speculative.cache.DraftCache` made in this process; ``draft_cache=False`` turns it off.
With ``background=True`` a low-precision draft is built in a thread while the first generation decodes plain steps
(exact, as every step): speculation starts once it is ready. The build (packing, mostly native code) and plain
decoding overlap well even on two cores (measured: plain steps 10% slower meanwhile, the build no slower) — what a
one-shot command wants; plain steps taken meanwhile are ``stats.building_steps`` and never reach the speed monitor.

Hooks left for later work: ``on_round`` (a callback receiving a :class:`RoundInfo` after every round — where an online
skip-set search such as SWIFT's would observe acceptance), and :meth:`SpeculativeDecoder.set_plan` (swap the draft
plan between generations — where an offline draft-plan search plugs in). Changing the plan of a live draft cache
mid-generation is not supported: skipped attention layers hold placeholders, not keys.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from ..errors import DataError, PlanError
from ..models.generation import check_context, greedy_decode
from ..plan import SkipPlan
from ..runtime import SkipHandle, installed_handle
from .cache import DraftCache, resolve_draft_cache
from .controllers import AdaptiveDraftLength, DraftSelector, SpeedMonitor
from .drafts import PromptLookup, check_draft_plan, check_engine, draft_precision, make_draft
from .lean import lean_draft_unsupported
from .trained import recorded_adapter
from .quantize import packed_head, precision_name
from .round import Round, Verifier, plain_step, speculative_round
from .sampling import Sampling
from .state import Committed, eos_ids, pad_id
from .stats import RoundInfo, SetupStats, SpeculativeOutput, SpeculativeStats

# drafted tokens per round at most; measured on the default model at batch 1 (8 GSM8K prompts) with the lean int8 /
# int8-dynamic drafts, 8 beat 6 by 2% / 12% (most rounds were fully accepted) and 10 was no better than 8
DEFAULT_MAX_DRAFT = 8


class SpeculativeDecoder:
    """A draft (``model`` under ``plan``, or a ``draft_dtype`` copy of it) and the full model as verifier.

    A plan from ``skiplm draft-search`` may name a precision (:func:`draft_precision`); it is used unless
    ``draft_dtype`` is given. Keep one for many generations (a low-precision copy is made once; the adaptive
    threshold carries over). Call
    :meth:`close` (or use ``with``) to remove the plan it applied. With ``plan=None`` and a plan already applied to
    ``model``, that plan drafts (and stays applied after :meth:`close`).

    ``draft_cache``: where a low-precision draft's weights are looked up and stored (see
    :mod:`skiplm.speculative.cache`): None or True (the default cache, unless ``$SKIPLM_DRAFT_CACHE=0``), a
    :class:`~skiplm.speculative.cache.DraftCache` (pass one to several decoders: they share the engines it made), a
    folder, or False (none). What the setup cost is :attr:`setup`.

    ``draft_adapter``: a trained draft's :class:`~skiplm.speculative.trained.DraftAdapter` (``skiplm draft-train``;
    :func:`~skiplm.speculative.trained.load_trained_draft` reads a plan and its adapter): active on the draft path
    only — merged into a draft copy's weights, or attached to the model's own modules with the plan and off while
    the full model verifies.

    ``draft_vocab``: the draft proposes only these tokens (a :class:`~skiplm.speculative.vocab.DraftVocab` or token
    ids; the lean engine): its head is that many rows of the model's (:mod:`skiplm.speculative.vocab`). Lossless, as
    every draft: greedy output is still plain greedy's, sampling still the full model's distribution.
    """

    def __init__(self, model: nn.Module, plan: SkipPlan | None = None, *, draft_dtype: torch.dtype | str | None = None,
                 check_model: bool = True, draft_length: AdaptiveDraftLength | None = None,
                 alternatives: Sequence[SkipPlan] | DraftSelector = (), draft_engine: str = "auto",
                 prompt_lookup: int | PromptLookup | None = None, pack_head: bool = True,
                 draft_cache: DraftCache | bool | str | None = None, draft_adapter=None, draft_vocab=None,
                 background: bool = False):
        check_engine(draft_engine)
        setup_start = time.perf_counter()
        self.setup = SetupStats()  # the one-time setup, apart from decoding
        self._setup_reported = False  # attached to the first generation's stats
        self.model = model
        # batch > 1: each row commits its own accepted drafts (holes in the caches), except under a sliding window
        self.ragged = not has_sliding_window(model)
        # combined with n-gram prompt lookup (an n-gram length, or a PromptLookup): kept between generations
        self.lookup = PromptLookup(prompt_lookup) if isinstance(prompt_lookup, int) else prompt_lookup
        t = time.perf_counter()
        head = packed_head(model) if pack_head and lean_draft_unsupported(model) is None else None
        self.setup.head_seconds = time.perf_counter() - t
        self.verifier = Verifier(model, head)
        self.draft_length = draft_length or AdaptiveDraftLength()
        # fallback=True: one monitor per batch size (a step's cost depends on it); what each learned carries over
        # between generations
        self.monitors: dict[int, SpeedMonitor] = {}
        precision = draft_dtype if draft_dtype is not None else draft_precision(plan)
        if precision is not None:
            if installed_handle(model) is not None:
                raise PlanError("a plan is already applied to this model; remove it and pass the draft plan as plan= "
                                "(a low-precision draft is a copy of the plain model).")
            precision = precision_name(precision)  # an unknown precision is refused before anything else
        if plan is not None:
            check_draft_plan(plan, model, check_model)
        # on-the-fly choice of the draft's skip set among plan and the alternatives
        self.selector = self._selector(plan, alternatives, check_model) if alternatives else None
        self._active_plan = 0  # the selector's plan applied to the draft now
        self.draft_cache = resolve_draft_cache(draft_cache) if precision is not None else None
        if draft_adapter is not None and plan is not None:
            draft_adapter.check_plan(plan)  # trained for this skip set (a DraftAdapterError otherwise)
        elif draft_adapter is None and recorded_adapter(plan) is not None:
            logging.getLogger(__name__).warning(
                "the draft plan names a trained adapter, which was not given: drafting untrained (still lossless). "
                "Load both with skiplm.speculative.trained.load_trained_draft(path).")
        self.draft_adapter = draft_adapter  # a trained draft's adapter (skiplm.speculative.trained): the draft's only
        # a reduced-vocabulary draft head (skiplm.speculative.vocab): a DraftVocab, or token ids
        self.draft_vocab = draft_vocab
        vocab = {"vocab": getattr(draft_vocab, "ids", draft_vocab)} if draft_vocab is not None else {}

        def build():
            built = make_draft(model, precision, draft_engine, self.draft_length, cache=self.draft_cache,
                               setup=self.setup, adapter=draft_adapter, **vocab)
            if plan is not None:
                built.set_plan(plan)
            self.setup.seconds = time.perf_counter() - setup_start
            return built

        self._draft = None  # the draft model, once built
        self._building: Future | None = None  # its background build, until adopted
        if background and precision is not None:  # (the model's own weights under a plan: nothing to build)
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skiplm-draft")
            self._building = pool.submit(build)
            pool.shutdown(wait=False)  # (its thread ends with the build)
            self.setup.background = True
        else:
            self._draft = build()
            if plan is None and precision is None and self._draft.plan is None:  # the model itself under no plan
                raise PlanError("self-speculative decoding needs a draft: pass plan= (a skip plan; an empty plan "
                                "drafts with the full model), or draft_dtype= for a low-precision draft.")

    @property
    def draft(self):
        """The draft model (a :class:`~skiplm.speculative.drafts.ModelDraft`); waits for a background build."""
        if self._building is not None:
            self._draft, self._building = self._building.result(), None  # (the build's own error, if it failed)
        return self._draft

    @property
    def drafters(self) -> list:
        """What proposes drafts, the first that proposes each round: prompt lookup (if on), then the draft model."""
        return [d for d in (self.lookup, self.draft) if d is not None]

    @property
    def draft_model(self):
        """What drafts: the model itself, a copy of its modules, or the lean engine."""
        return self.draft.model

    @property
    def draft_engine(self) -> str:
        """The registered draft kind: ``"lean"`` or ``"modules"``."""
        return self.draft.engine

    @property
    def draft_weight_bytes(self) -> int:
        return self.draft.weight_bytes

    def draft_ready(self) -> bool:
        """Whether the draft is built (always, unless built in the background and still being built)."""
        return self._building is None or self._building.done()

    def _selector(self, plan: SkipPlan | None, alternatives: Sequence[SkipPlan] | DraftSelector,
                  check_model: bool) -> DraftSelector:
        if plan is None:
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
        return selector

    # -- the draft ---------------------------------------------------------------------------------------------------
    @property
    def draft_handle(self) -> SkipHandle | None:
        """The skip plan applied to the draft's modules now (None for the lean engine)."""
        return self.draft.handle

    @property
    def plan(self) -> SkipPlan | None:
        return self.draft.plan

    def set_plan(self, plan: SkipPlan, check_model: bool = True) -> None:
        """Draft with another plan from the next generation on (hook for an offline draft-plan search)."""
        if self.selector is not None:
            raise PlanError("this decoder chooses its draft plan on the fly among its alternatives; make a new decoder.")
        check_draft_plan(plan, self.model, check_model)
        self.draft.set_plan(plan)

    def close(self) -> None:
        if self._building is not None and self._building.exception() is not None:  # (waits for a background build)
            self._building = None  # a build that failed: nothing to close, its error was raised where it was used
            return
        self.draft.close()

    def __enter__(self) -> SpeculativeDecoder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

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
        sampling: Sampling | None = None,
        stop_rows: Callable[[], Iterable[int]] | None = None,
    ) -> SpeculativeOutput:
        """Generate up to ``max_new_tokens`` per row from left-padded ``input_ids`` [B, T] (see the module docstring).

        ``sampling``: the sampling settings as one object (else made from ``do_sample``, ``temperature``, ``top_k``,
        ``top_p`` and ``seed``). ``fallback``: True (this decoder's :class:`SpeedMonitor` for this batch size, which
        keeps what it measured between generations), a monitor of your own, or False (always speculate).
        ``streamer``: an object with ``put(tensor)`` / ``end()`` (e.g. transformers' ``TextStreamer``, batch 1), or
        a callable receiving, per step, a list with each row's newly committed tokens. ``stop_rows``: called after
        the prefill and after every step; the rows it names finish now, as if they had emitted an end-of-sequence
        token (their output ends where it is, they no longer hold the batch back; the other rows are unchanged) —
        e.g. a row's own token limit, or a client that went away (:mod:`skiplm.serve`).
        """
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise DataError(f"input_ids must be [batch, tokens] with at least one token, got {tuple(input_ids.shape)}.")
        if max_new_tokens < 1:
            raise DataError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        if max_draft < 1:
            raise DataError(f"max_draft must be at least 1, got {max_draft}.")
        check_context(self.model, input_ids.shape[1], max_new_tokens)  # the prompt and its tokens fit the context
        sampling = sampling or Sampling(do_sample, temperature, top_k, top_p, seed)
        start = time.perf_counter()
        device = next(self.model.parameters()).device
        ids = input_ids.to(device)
        batch, prompt_length = ids.shape
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device).long()
        if mask.shape != ids.shape:
            raise DataError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}.")
        if bool((mask[:, 1:] < mask[:, :-1]).any()) or not bool(mask[:, -1].all()):
            raise DataError("speculative decoding needs left padding: each attention_mask row must be 0s then 1s.")
        eos = torch.as_tensor(eos_ids(self.model, eos_token_id), dtype=torch.long, device=device)
        pad = pad_token_id if pad_token_id is not None else pad_id(self.model, eos)
        sampler = sampling.sampler(device)
        monitor = fallback if isinstance(fallback, SpeedMonitor) else (
            self.monitors.setdefault(batch, SpeedMonitor()) if fallback else None)
        events_before = len(monitor.events) if monitor is not None else 0
        head = self.verifier.head
        stats = SpeculativeStats(batch_size=batch, verify_weight_bytes=head.nbytes if head is not None else 0)
        if self.selector is not None:
            stats.rounds_by_plan = [0] * len(self.selector.plans)
        ragged = self.ragged and batch > 1
        state = Committed(ids, mask, prompt_length + max_new_tokens + max_draft + 1, eos, pad, streamer,
                          limit=max_new_tokens, ragged=ragged)
        building = not self.draft_ready()
        if not building:
            self.draft.reset()

        # prefill of the full model; its last logits give the first token
        t = time.perf_counter()
        state.commit(sampler.pick(self.verifier.prefill(state, mask))[:, None])
        stats.prefill_seconds = time.perf_counter() - t
        while not state.done(max_new_tokens, stop_rows):
            k_max = min(max_draft, state.room(max_new_tokens) - 1)  # a round commits at most k + 1 tokens per row
            if not self.draft_ready():  # built in the background: plain steps meanwhile, not shown to the monitor
                step = plain_step([self.lookup] if self.lookup else [], self.verifier, state, sampler)
                stats.plain_steps += 1
                stats.building_steps += 1
                stats.plain_seconds += step.verify_seconds
            elif building:  # the background build just finished: its draft starts from the committed tokens
                building = False
                self.draft.reset()
                continue
            elif k_max >= 1 and (monitor is None or monitor.speculate()):
                at_token = state.new_tokens
                self._choose_plan(stats)
                step = speculative_round(self.drafters, self.verifier, state, sampler, k_max, ragged=ragged)
                self._record_round(step, stats, monitor, at_token, on_round)
            else:
                step = plain_step(self.drafters, self.verifier, state, sampler)
                stats.plain_steps += 1
                stats.plain_seconds += step.verify_seconds
                if monitor is not None:
                    if monitor.in_fallback:
                        stats.fallback_steps += 1
                    monitor.observe_plain(step.verify_seconds, source="plain")

        state.end()
        stats.new_tokens = state.new_tokens
        stats.total_seconds = time.perf_counter() - start
        if self.draft_ready():
            stats.draft_weight_bytes, stats.draft_engine = self.draft.weight_bytes, self.draft.engine
            stats.draft_cache_bytes = self.draft.cache_bytes()
            if not self._setup_reported:  # the setup this decoder paid, on its first generation (once it is done)
                stats.setup, self._setup_reported = self.setup, True
        stats.final_threshold = self.draft_length.threshold
        if monitor is not None:
            stats.fallback_events = monitor.events[events_before:]
            stats.fallbacks = len(stats.fallback_events)
        return SpeculativeOutput(state.outputs, stats)

    def _choose_plan(self, stats: SpeculativeStats) -> None:
        """On-the-fly selection: switch the draft to the plan the selector chooses for this round."""
        if self.selector is not None and self.selector.choose() != self._active_plan:
            self._active_plan = self.selector.current
            self.draft.set_plan(self.selector.plans[self._active_plan])  # its cache refills this round
            stats.draft_switches += 1

    def _record_round(self, step: Round, stats: SpeculativeStats, monitor: SpeedMonitor | None, at_token: int,
                      on_round: Callable[[RoundInfo], None] | None) -> None:
        """Count a speculative round in ``stats``, and tell the drafter, the selector and the monitor how it went."""
        k, kept, rows, accepted = step.drafted, step.kept, len(step.accepted), sum(step.accepted)
        committed = step.committed  # tokens per unfinished row, on average
        stats.rounds += 1
        stats.row_rounds += rows
        stats.drafted += k * rows
        stats.accepted += accepted
        stats.committed_from_draft += round((committed - 1) * rows)
        stats.discarded = stats.accepted - stats.committed_from_draft
        stats.draft_seconds += step.draft_seconds
        stats.draft_prefill_seconds += step.prefill_seconds
        stats.verify_seconds += step.verify_seconds
        if len(stats.accepted_histogram) <= kept:
            stats.accepted_histogram.extend([0] * (kept + 1 - len(stats.accepted_histogram)))
        stats.accepted_histogram[kept] += 1
        # the draft model's confidence threshold, or lookup's record (drafts every row kept, on average)
        step.drafter.record(k * rows, accepted, committed - 1)
        if step.drafter is self.lookup:
            stats.lookup_rounds += 1
            stats.lookup_committed += round((committed - 1) * rows)
        elif self.selector is not None:  # the draft plan's speed; a switch's refill is this round's cost
            self.selector.observe(self._active_plan, step.prefill_seconds + step.draft_seconds + step.verify_seconds,
                                  committed)
            stats.rounds_by_plan[self._active_plan] += 1
        if monitor is not None:
            monitor.observe_round(step.draft_seconds + step.verify_seconds, committed, at_token=at_token,
                                  source=step.drafter)
        if on_round is not None:
            on_round(RoundInfo(stats.rounds - 1, k, tuple(step.accepted), committed, step.draft_seconds,
                               step.verify_seconds, self.draft_length.threshold, step.proposal.drafter))


def has_sliding_window(model: nn.Module) -> bool:
    """Whether some attention layer of ``model`` attends over a sliding window (its config's ``layer_types`` name
    one, or it sets ``sliding_window`` without switching it off). Such a window counts cache columns, so a row with
    holes would see fewer of its own tokens than decoded alone: rounds are then not ragged."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    types = getattr(config, "layer_types", None)
    if types:
        return any("sliding" in str(kind) for kind in types)
    return bool(getattr(config, "sliding_window", None)) and bool(getattr(config, "use_sliding_window", True))


def generate(model: nn.Module, tokenizer=None, input_ids: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, *, plan: SkipPlan | None = None,
             draft_dtype: torch.dtype | str | None = None, alternatives: Sequence[SkipPlan] = (),
             draft_engine: str = "auto", prompt_lookup: int | None = None, check_model: bool = True,
             draft_cache: DraftCache | bool | str | None = None, draft_adapter=None, draft_vocab=None,
             background: bool = False, **options: Any) -> SpeculativeOutput:
    """Self-speculative generation in one call: ``model`` under ``plan`` drafts, ``model`` verifies (with
    ``alternatives``, the draft's skip set is chosen on the fly among ``plan`` and them: :class:`DraftSelector`).

    ``tokenizer`` (optional) supplies the EOS / pad ids when the model's generation config lacks them, and decodes the
    outputs into ``texts``. The keyword ``options`` are :meth:`SpeculativeDecoder.generate`'s, with its defaults
    (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``max_draft``, ``seed``, ``streamer``,
    ``fallback``, ``eos_token_id``, ``pad_token_id``, ``on_round``, ``sampling``). ``draft_cache``: as for
    :class:`SpeculativeDecoder` (the setup is in ``stats.setup``); ``draft_vocab`` and ``background`` (the draft built
    while the first plain steps decode: for one generation, what pays) too. For many generations, keep a
    :class:`SpeculativeDecoder`.
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
                            prompt_lookup=prompt_lookup, draft_cache=draft_cache,
                            draft_adapter=draft_adapter, draft_vocab=draft_vocab, background=background) as decoder:
        output = decoder.generate(input_ids, attention_mask, **options)
    if output.stats.setup is None:  # a background build that outlasted the generation (closing waited for it)
        output.stats.setup = decoder.setup
    if tokenizer is not None:
        output.texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in output.tokens]
    return output


@torch.inference_mode()
def plain_generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   max_new_tokens: int = 128, eos_token_id=None, pad_token_id: int | None = None) -> list[list[int]]:
    """Plain greedy decoding with the KV cache (the reference speculative greedy output must equal): argmax only,
    no logits processing; outputs end at the first EOS (kept)."""
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device).long()
    eos = eos_ids(model, eos_token_id)
    pad = pad_token_id if pad_token_id is not None else pad_id(model, torch.as_tensor(eos, dtype=torch.long))
    return greedy_decode(model, ids, mask, max_new_tokens, eos, pad)


__all__ = ["DEFAULT_MAX_DRAFT", "SpeculativeDecoder", "generate", "plain_generate"]
