"""The speculative round, and the full model that verifies it.

One round, for committed tokens ``x[0..S-1]`` (the full model's cache holds ``x[0..S-2]``; ``x[S-1]`` was chosen by
the full model but not yet fed to it)::

    draft:   d1..dk ~ q(.|x), q(.|x, d1), ...     up to k_max tokens         (k draft forwards of 1 token, or a lookup)
    verify:  p0..pk = full(x[S-1], d1..dk)                                   (1 forward of k + 1 tokens)
    accept:  n = leading d_i the full model keeps (greedy: d_i == argmax p_{i-1}; sampling: rejection sampling)
    commit:  per row r, its n_r accepted drafts, then the full model's own token

Ragged rounds (the default): every row commits its own ``n_r + 1`` tokens. The batch advances by ``M + 1`` columns,
``M`` the most drafts an unfinished row accepted; a row that accepted fewer leaves holes — masked columns holding the
drafts it rejected (:class:`~skiplm.speculative.state.Committed`) — so one slow row does not hold the batch back.
Models with a sliding attention window cannot take holes (a window counts columns, so it would reach back further
than decoding alone does): there every row advances by ``m + 1``, ``m`` the fewest drafts an unfinished row accepted,
token ``m + 1`` being per row the full model's own choice or a draft that row accepted; drafts a row accepted beyond
``m`` are re-drafted next round. Either way each row's tokens are what the full model produces: greedy output is the
full model's greedy output token for token (up to floating-point differences between a (k+1)-token and a 1-token
forward, which flip an argmax only at exact near-ties).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence

import torch
from torch import nn

from ..runtime import decoder_stack, installed_handle
from .drafts import Drafter, Proposal
from .sampling import Sampler
from .state import Committed


class Verifier:
    """The full model: ``model``'s own modules with whatever plan is applied to it (the draft's, or another) switched
    off. Its KV cache over the committed tokens is ``state.cache``. ``head`` (optional): the output head pre-packed
    (:func:`~skiplm.speculative.quantize.packed_head`) for families whose logits are ``lm_head(last hidden state)``."""

    def __init__(self, model: nn.Module, head: nn.Module | None = None):
        self.model, self.head = model, head

    def _full_model(self):
        handle = installed_handle(self.model)
        return handle.disabled() if handle is not None else contextlib.nullcontext()

    def prefill(self, state: Committed, mask: torch.Tensor) -> torch.Tensor:
        """Run the prompt (attention ``mask`` [B, T]); the logits [B, V] of its last token."""
        ids = state.seq[:, :state.committed]
        with self._full_model():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                             use_cache=True, logits_to_keep=1)
        state.cache = out.cache
        state.cache.activate_past_recording()  # sliding-window layers must keep their past to be cropped
        return out.logits[:, -1]

    def verify(self, state: Committed, drafts: torch.Tensor | None) -> torch.Tensor:
        """The full model's logits [B, k + 1, V] (float32) over the last committed token and ``drafts`` [B, k] (None:
        none, a plain step)."""
        start = state.committed - 1
        tokens = state.seq[:, start:state.committed]
        if drafts is not None:
            tokens = torch.cat([tokens, drafts], dim=1)
        n = tokens.shape[1]
        inputs = dict(input_ids=tokens, attention_mask=state.mask[:, :start + n], position_ids=state.positions(start, n),
                      cache=state.cache, use_cache=True)
        with self._full_model():
            if self.head is not None:  # the backbone, then the packed head
                out = decoder_stack(self.model)(**inputs)
                logits = self.head(out.last_hidden_state[:, -n:]).float()
            else:
                out = self.model(**inputs, logits_to_keep=n)
                logits = out.logits.float()
        state.cache = out.cache
        return logits

    def crop(self, state: Committed, rejected: int) -> None:
        """Forget the last ``rejected`` tokens it verified (``crop(0)`` still trims sliding-window layers)."""
        state.cache.crop(-rejected)


@dataclasses.dataclass
class Round:
    """What one step did: a speculative round (``proposal`` set) or a plain step of the full model."""

    proposal: Proposal | None
    drafter: Drafter | None
    accepted: list[int]  # per unfinished row, the drafts it accepted
    kept: int  # drafts every unfinished row committed (the fewest any accepted)
    draft_seconds: float = 0.0  # drafting, the draft's prefill excluded
    verify_seconds: float = 0.0  # verification, acceptance and commit
    committed: float = 1.0  # tokens an unfinished row committed, on average (kept + 1 unless ragged)

    @property
    def drafted(self) -> int:
        return self.proposal.tokens.shape[1] if self.proposal is not None else 0

    @property
    def prefill_seconds(self) -> float:
        return self.proposal.prefill_seconds if self.proposal is not None else 0.0


def speculative_round(drafters: Sequence[Drafter], verifier: Verifier, state: Committed, sampler: Sampler,
                      k_max: int, *, ragged: bool = True) -> Round:
    """Draft up to ``k_max`` tokens with the first of ``drafters`` that proposes, verify them in one forward of the
    full model, accept, commit (see the module docstring; ``ragged=False``: every row advances by the fewest
    accepted drafts)."""
    active = state.active
    state.reserve(state.committed + k_max + 1)
    # draft: prompt lookup where the text repeats itself, else the draft model
    t = time.perf_counter()
    drafter, proposal = _first_proposal(drafters, state, k_max, sampler)
    draft_seconds = time.perf_counter() - t - proposal.prefill_seconds
    # verify: p_0..p_k in one forward over [last committed token, d1..dk]
    t = time.perf_counter()
    logits = verifier.verify(state, proposal.tokens)  # [B, k + 1, V]
    # accept: per row, the leading drafts the full model keeps; its tokens are those drafts, then its own token
    accepted, tokens = sampler.accept(proposal.tokens, proposal.probs, logits)
    by_row = accepted[active]
    kept = int(by_row.min()) if by_row.numel() else 0
    advance = int(by_row.max()) if ragged and by_row.numel() else kept
    if advance > kept:
        # ragged commit: each row its accepted drafts and the full model's token, over advance + 1 columns
        state.commit(tokens[:, :advance + 1], lengths=accepted.clamp(max=advance) + 1)
        committed = sum(by_row.tolist()) / by_row.numel() + 1
    else:
        # every row advances by the fewest drafts an unfinished row accepted, plus one
        state.commit(tokens[:, :kept + 1])
        committed = kept + 1.0
    # caches drop the columns beyond the committed ones
    _crop(drafters, verifier, state, proposal.tokens.shape[1] - advance)
    return Round(proposal, drafter, by_row.tolist(), kept, draft_seconds, time.perf_counter() - t, committed)


def plain_step(drafters: Sequence[Drafter], verifier: Verifier, state: Committed, sampler: Sampler) -> Round:
    """One token from the full model alone, through the same verify path with no drafts."""
    t = time.perf_counter()
    logits = verifier.verify(state, None)
    state.commit(sampler.pick(logits[:, -1])[:, None])
    _crop(drafters, verifier, state, 0)
    return Round(None, None, [], 0, verify_seconds=time.perf_counter() - t)


def _first_proposal(drafters: Sequence[Drafter], state: Committed, k_max: int,
                    sampler: Sampler) -> tuple[Drafter, Proposal]:
    for drafter in drafters:
        proposal = drafter.draft(state, k_max, sampler)
        if proposal is not None:
            return drafter, proposal
    raise AssertionError("the last drafter, the draft model, always proposes")


def _crop(drafters: Sequence[Drafter], verifier: Verifier, state: Committed, rejected: int) -> None:
    """Both caches back to the committed tokens minus the last one (which neither has seen yet)."""
    verifier.crop(state, rejected)
    for drafter in drafters:
        drafter.crop(state)


__all__ = ["Round", "Verifier", "plain_step", "speculative_round"]
