"""Plain decoding with the speculative decoder's interface, for ``skiplm serve --no-speculative``.

:class:`PlainDecoder` runs the model as it is (a plan or a heal folder applied to it stays on: ``--plan`` without
speculation serves the skipped model, as ``skiplm generate --plan`` does), one full forward per token with the KV cache,
through the same pieces the speculative decoder is built from: the committed-token state
(:class:`~skiplm.speculative.state.Committed`: left padding, end-of-sequence handling, streaming, rows finished from
outside), the sampler (:class:`~skiplm.speculative.sampling.Sampling`: greedy, temperature / top-k / top-p) and the
verifier's forward (:func:`~skiplm.speculative.round.plain_step`). Its greedy output is plain greedy decoding's.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import DataError
from ..models.generation import check_context
from ..speculative.round import Verifier, plain_step
from ..speculative.sampling import Sampling
from ..speculative.state import Committed, eos_ids, pad_id
from ..speculative.stats import SpeculativeOutput, SpeculativeStats


class _AsIs(Verifier):
    """The model's forward as it is: whatever plan is applied to it stays on."""

    def _full_model(self):
        return contextlib.nullcontext()


class PlainDecoder:
    """``generate()`` as :meth:`SpeculativeDecoder.generate <skiplm.speculative.SpeculativeDecoder.generate>` (the
    arguments plain decoding has), one token per step; its stats count plain steps only."""

    speculative = False
    draft_engine = "none"
    draft_weight_bytes = 0

    def __init__(self, model: nn.Module):
        self.model = model
        self.verifier = _AsIs(model)

    def close(self) -> None:
        pass

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 128, sampling: Sampling | None = None, streamer: Any = None,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 stop_rows: Callable[[], Iterable[int]] | None = None, **_ignored: Any) -> SpeculativeOutput:
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise DataError(f"input_ids must be [batch, tokens] with at least one token, got {tuple(input_ids.shape)}.")
        if max_new_tokens < 1:
            raise DataError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        check_context(self.model, input_ids.shape[1], max_new_tokens)
        sampling = sampling or Sampling()
        start = time.perf_counter()
        device = next(self.model.parameters()).device
        ids = input_ids.to(device)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device).long()
        eos = torch.as_tensor(eos_ids(self.model, eos_token_id), dtype=torch.long, device=device)
        pad = pad_token_id if pad_token_id is not None else pad_id(self.model, eos)
        sampler = sampling.sampler(device)
        stats = SpeculativeStats(batch_size=ids.shape[0], draft_engine=self.draft_engine)
        state = Committed(ids, mask, ids.shape[1] + max_new_tokens, eos, pad, streamer)
        t = time.perf_counter()
        state.commit(sampler.pick(self.verifier.prefill(state, mask))[:, None])
        stats.prefill_seconds = time.perf_counter() - t
        while not state.done(max_new_tokens, stop_rows):
            step = plain_step([], self.verifier, state, sampler)
            stats.plain_steps += 1
            stats.plain_seconds += step.verify_seconds
        state.end()
        stats.new_tokens = state.new_tokens
        stats.total_seconds = time.perf_counter() - start
        return SpeculativeOutput(state.outputs, stats)


__all__ = ["PlainDecoder"]
