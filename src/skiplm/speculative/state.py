"""The committed tokens of a batch being decoded (:class:`Committed`), what drafts read and rounds extend; and the
end-of-sequence / padding ids a generation uses.

Rows are left padded and share one column index (the KV caches are [B, columns]). A step appends the same number of
columns to every row. A row that commits fewer tokens than the step's columns (a speculative round in which it
accepted fewer drafts than another row, :meth:`Committed.commit` with ``lengths``) leaves *holes*: columns masked out
(attention mask 0) that hold the drafts it rejected, which its later tokens never attend to; its last committed token
always sits in the step's last column. So one slow row does not hold the others back, and every row's real tokens —
its unmasked columns, at position ids counted over them — are what it would hold decoded alone.

A row that emits an end-of-sequence token, or reaches ``limit`` new tokens, is finished: it keeps advancing, its tokens
replaced by padding and ignored, until every row has finished. Its output ends at the first EOS, which is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..errors import DataError


class Committed:
    """The prompt and the tokens committed so far, per row: ``seq`` [B, capacity] holds ``committed`` columns
    (left padded: row r starts after ``pads[r]`` padding tokens; holes, see the module docstring), ``mask``
    [B, capacity] is the attention mask over them (and the columns to come: 1), ``outputs`` the new tokens per row up
    to its first EOS (at most ``limit``, where given). ``streamer`` (optional) receives what each step commits (see
    :meth:`commit`). ``ragged``: rounds commit per row (holes), which the draft's length rule reads. Capacity grows
    when a step needs more (:meth:`reserve`)."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, capacity: int, eos: torch.Tensor, pad: int,
                 streamer: Any = None, limit: int | None = None, ragged: bool = False):
        batch, self.prompt_length = ids.shape
        self.eos, self.pad, self.streamer, self.limit, self.ragged = eos, pad, streamer, limit, ragged
        self.seq = torch.full((batch, capacity), pad, dtype=torch.long, device=ids.device)
        self.seq[:, :self.prompt_length] = ids
        self.mask = torch.cat([mask, mask.new_ones(batch, capacity - self.prompt_length)], dim=1)
        self.pads = self.prompt_length - mask.sum(-1)  # [B] left padding per row
        self.holes = torch.zeros(batch, dtype=torch.long, device=ids.device)  # [B] masked columns after the prompt
        self.finished = torch.zeros(batch, dtype=torch.bool, device=ids.device)
        self.outputs: list[list[int]] = [[] for _ in range(batch)]
        self.committed = self.prompt_length

    @property
    def batch_size(self) -> int:
        return self.seq.shape[0]

    @property
    def new_tokens(self) -> int:
        """The most tokens a row committed since the prompt (finished rows' padding included; holes not; at most
        ``limit``)."""
        most = self.committed - self.prompt_length - int(self.holes.min())
        return most if self.limit is None else min(most, self.limit)

    def room(self, max_new_tokens: int) -> int:
        """The most tokens an unfinished row may still commit (0 when every row has finished)."""
        left = max_new_tokens - (self.committed - self.prompt_length - self.holes)
        return int(left[self.active].max()) if bool(self.active.any()) else 0

    @property
    def active(self) -> torch.Tensor:
        """[B] True for the rows that have not finished."""
        return ~self.finished

    def done(self, max_new_tokens: int, stop_rows: Callable[[], Iterable[int]] | None = None) -> bool:
        """Whether the generation is over; first, the rows ``stop_rows()`` names (if given) finish now."""
        if stop_rows is not None:
            self.finish(stop_rows())
        self.finished |= (self.committed - self.prompt_length - self.holes) >= max_new_tokens
        return bool(self.finished.all())

    def finish(self, rows: Iterable[int]) -> None:
        """Finish ``rows`` now, as if they had emitted an end-of-sequence token: their outputs end here, they are
        padded from now on and no longer count in a round's acceptance (the other rows are unaffected)."""
        rows = sorted({int(row) for row in rows})
        if rows:
            self.finished[torch.tensor(rows, device=self.finished.device)] = True

    def positions(self, start: int, n: int) -> torch.Tensor:
        """Position ids [B, n] of columns ``start..start + n - 1``: each row counts its unmasked columns from its first
        token (a hole column gets its predecessor's position; it is never attended to)."""
        if not bool(self.holes.any()):  # no holes: the column minus the row's left padding
            return (torch.arange(start, start + n, device=self.seq.device)[None] - self.pads[:, None]).clamp(min=0)
        return (self.mask[:, :start + n].cumsum(-1) - 1)[:, start:].clamp(min=0)

    def row_tokens(self, row: int) -> torch.Tensor:
        """Row ``row``'s committed tokens, prompt included, padding and holes left out: [tokens]."""
        tokens = self.seq[row, int(self.pads[row]):self.committed]
        if bool(self.holes[row]):
            tokens = tokens[self.mask[row, int(self.pads[row]):self.committed].bool()]
        return tokens

    def reserve(self, columns: int) -> None:
        """Make room for ``columns`` columns in all (holes make a generation longer than its tokens)."""
        capacity = self.seq.shape[1]
        if columns > capacity:
            extra = max(columns, 2 * capacity) - capacity
            self.seq = torch.cat([self.seq, self.seq.new_full((self.batch_size, extra), self.pad)], dim=1)
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.batch_size, extra)], dim=1)

    def commit(self, new: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        """Append ``new`` [B, n] to every row (n columns each); rows finish at their first EOS, or at ``limit``.

        ``lengths`` [B] (1..n; None: n for every row): row r commits only ``new[r, :lengths[r]]``; its last token goes
        to the last column and the columns between are holes (see the module docstring). Finished rows: padding."""
        finished, pad = self.finished, self.pad
        n = new.shape[1]
        real = torch.ones_like(new, dtype=torch.bool)
        if lengths is not None:
            lengths = torch.where(finished, torch.full_like(lengths, n), lengths)
            columns = torch.arange(n, device=new.device)[None]
            last = (lengths - 1)[:, None]
            new = torch.where(columns == n - 1, new.gather(1, last), new)  # each row's last token in the last column
            real = (columns < last) | (columns == n - 1)
        new = torch.where(finished[:, None], torch.full_like(new, pad), new)
        is_eos = torch.isin(new, self.eos) & real & ~finished[:, None]
        after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0  # columns after a row's first EOS in `new`
        new = new.masked_fill(after_eos, pad)
        keep_mask = (real & ~after_eos).tolist()
        streamed = []
        for row, tokens in enumerate(new.tolist()):
            keep = [] if finished[row] else [t for t, k in zip(tokens, keep_mask[row]) if k]
            if self.limit is not None:
                keep = keep[:max(self.limit - len(self.outputs[row]), 0)]
            self.outputs[row].extend(keep)
            streamed.append(keep)
        finished.logical_or_(is_eos.any(-1))
        self.reserve(self.committed + n)
        self.seq[:, self.committed:self.committed + n] = new
        if lengths is not None:
            self.mask[:, self.committed:self.committed + n] = real.to(self.mask.dtype)
            self.holes += n - lengths
        self.committed += n
        _stream(self.streamer, streamed)

    def end(self) -> None:
        """The generation is over: tell the streamer."""
        if self.streamer is not None and hasattr(self.streamer, "end"):
            self.streamer.end()


def eos_ids(model: nn.Module, eos_token_id) -> list[int]:
    """``eos_token_id`` (an id or a list of them) as a list, else the model's generation config's; [] for none."""
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(i) for i in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])]


def pad_id(model: nn.Module, eos: torch.Tensor) -> int:
    """The padding id: the model's generation config's, else its first EOS id, else 0."""
    configured = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if configured is not None:
        return int(configured if not isinstance(configured, (list, tuple)) else configured[0])
    return int(eos[0]) if eos.numel() else 0


def _stream(streamer, rows: list[list[int]]) -> None:
    """Hand each row's newly committed tokens to a ``put()`` streamer (batch 1) or a callable."""
    if streamer is None:
        return
    if hasattr(streamer, "put"):
        if len(rows) != 1:
            raise DataError("a put()/end() streamer (e.g. TextStreamer) supports batch size 1 only; pass a callable.")
        if rows[0]:
            streamer.put(torch.tensor(rows[0]))
    else:
        streamer(rows)


__all__ = ["Committed", "eos_ids", "pad_id"]
