"""What a server keeps warm for its lifetime (:class:`ServedModel`): the model, its decoder (speculative, with its
draft, or plain), the scheduler that batches requests through it, and the limits requests are checked against.
:func:`build` makes one; :func:`skiplm.serve.app.create_app` puts it behind the HTTP API."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import SkipLMError
from ..models.generation import context_length, eos_token_ids
from ..plan import SkipPlan
from ..speculative.decoder import DEFAULT_MAX_DRAFT, SpeculativeDecoder
from ..speculative.sampling import Sampling
from .batcher import Batcher
from .plain import PlainDecoder
from .protocol import Limits

DEFAULT_MAX_TOKENS = 1024  # new tokens per request at most (and the default of a request that names none)
DEFAULT_MAX_BATCH = 8
WARMUP_PROMPT = "Hello"


@dataclasses.dataclass
class ServedModel:
    """A model being served: ``limits`` (name, tokenizer, context, max tokens), the ``batcher`` and its ``decoder``,
    what drafts (``settings``) and how long it took to get ready (``setup_seconds``, apart from decoding)."""

    limits: Limits
    batcher: Batcher
    decoder: Any
    speculative: bool
    settings: dict[str, Any]
    setup_seconds: dict[str, float]
    handle: Any = None  # --no-speculative with a plan: the plan applied to the model for the server's lifetime
    closed: bool = False

    @property
    def name(self) -> str:
        return self.limits.name

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "speculative": self.speculative, **self.settings,
                "context": self.limits.context, "max_tokens": self.limits.max_tokens,
                "max_batch": self.batcher.max_batch, "batch_wait_seconds": self.batcher.batch_wait,
                "setup_seconds": self.setup_seconds}

    def stats(self) -> dict[str, Any]:
        return {**self.describe(), "waiting": self.batcher.waiting(), **self.batcher.stats.to_json()}

    def close(self) -> None:
        """Stop serving: the batcher stops, the draft's plan is removed (and a served plan); safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self.batcher.close()
        self.decoder.close()
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def build(model: nn.Module, tokenizer, *, name: str, speculative: bool = True, plan: SkipPlan | None = None,
          draft_dtype: str | torch.dtype | None = None, alternatives: Sequence[SkipPlan] = (),
          draft_engine: str = "auto", prompt_lookup: int | None = None, max_draft: int = DEFAULT_MAX_DRAFT,
          max_batch: int = DEFAULT_MAX_BATCH, batch_wait: float = 0.0, max_tokens: int = DEFAULT_MAX_TOKENS,
          warmup: bool = True, check_model: bool = True, merge: bool = False,
          setup_seconds: dict[str, float] | None = None, draft_vocab=None) -> ServedModel:
    """Get ``model`` ready to serve as ``name``: with ``speculative``, a :class:`SpeculativeDecoder` drafting with
    ``plan`` and/or ``draft_dtype`` (the other draft options are its own); else plain decoding of the model under
    ``plan`` if given (a skip plan or a heal folder's healed plan, ``merge`` as in :func:`skiplm.apply`), which is then
    applied until :meth:`ServedModel.close`. ``warmup``: one short generation first, so the first request does not
    pay for one-time work. ``setup_seconds``: earlier setup (e.g. ``{"load": ...}``), reported with this one's.
    ``draft_vocab``: a reduced-vocabulary draft head (:mod:`skiplm.speculative.vocab`), as for the decoder."""
    if max_tokens < 1:
        raise SkipLMError(f"max_tokens must be at least 1, got {max_tokens}.")
    setup = dict(setup_seconds or {})
    start = time.perf_counter()
    handle = None
    if speculative:
        decoder = SpeculativeDecoder(model, plan, draft_dtype=draft_dtype, check_model=check_model,
                                     alternatives=alternatives, draft_engine=draft_engine, prompt_lookup=prompt_lookup,
                                     draft_vocab=draft_vocab)
        settings = {"draft": {"plan": plan.describe() if plan is not None else None,
                              "precision": str(draft_dtype) if draft_dtype is not None else None,
                              "engine": decoder.draft_engine, "weight_bytes": decoder.draft_weight_bytes,
                              "prompt_lookup": prompt_lookup, "alternatives": len(alternatives),
                              "vocab": getattr(draft_vocab, "size", None)},
                    "max_draft": max_draft}
    else:
        if plan is not None:
            from ..skipper import apply

            handle = apply(model, plan, check_model=check_model, **({"merge": True} if merge else {}))
        decoder = PlainDecoder(model)
        settings = {"plan": plan.describe() if plan is not None else None}
    setup["decoder"] = time.perf_counter() - start
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    context = context_length(model)
    if warmup:
        start = time.perf_counter()
        ids = torch.tensor([tokenizer(WARMUP_PROMPT).input_ids or [eos[0]]])
        decoder.generate(ids, max_new_tokens=8, sampling=Sampling(), eos_token_id=eos, pad_token_id=pad,
                         **({"max_draft": max_draft} if speculative else {}))
        setup["warmup"] = time.perf_counter() - start
    batcher = Batcher(decoder, eos=eos, pad=pad, max_batch=max_batch, batch_wait=batch_wait,
                      max_draft=max_draft if speculative else None, context=context)
    limits = Limits(name, tokenizer, context, max_tokens)
    return ServedModel(limits, batcher, decoder, speculative, settings, setup, handle)


__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_MAX_TOKENS", "ServedModel", "build"]
