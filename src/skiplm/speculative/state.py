"""The committed tokens of a batch being decoded (:class:`Committed`), what drafts read and rounds extend; and the
end-of-sequence / padding ids a generation uses.

Rows are left padded. Every row advances by the same number of tokens per step; a row that emits an end-of-sequence
token is finished: it keeps advancing, its tokens replaced by padding and ignored, until every row has finished. Its
output ends at the first EOS, which is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..errors import DataError


class Committed:
    """The prompt and the tokens committed so far, per row: ``seq`` [B, capacity] holds ``committed`` tokens
    (left padded: row r starts after ``pads[r]`` padding tokens), ``mask`` [B, capacity] is the attention mask over
    them (and the tokens to come), ``outputs`` the new tokens per row up to its first EOS. ``streamer`` (optional)
    receives what each step commits (see :meth:`commit`)."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, capacity: int, eos: torch.Tensor, pad: int,
                 streamer: Any = None):
        batch, self.prompt_length = ids.shape
        self.eos, self.pad, self.streamer = eos, pad, streamer
        self.seq = torch.full((batch, capacity), pad, dtype=torch.long, device=ids.device)
        self.seq[:, :self.prompt_length] = ids
        self.mask = torch.cat([mask, mask.new_ones(batch, capacity - self.prompt_length)], dim=1)
        self.pads = self.prompt_length - mask.sum(-1)  # [B] left padding per row
        self.finished = torch.zeros(batch, dtype=torch.bool, device=ids.device)
        self.outputs: list[list[int]] = [[] for _ in range(batch)]
        self.committed = self.prompt_length

    @property
    def batch_size(self) -> int:
        return self.seq.shape[0]

    @property
    def new_tokens(self) -> int:
        """Tokens committed per row since the prompt (finished rows' padding included)."""
        return self.committed - self.prompt_length

    @property
    def active(self) -> torch.Tensor:
        """[B] True for the rows that have not finished."""
        return ~self.finished

    def done(self, max_new_tokens: int, stop_rows: Callable[[], Iterable[int]] | None = None) -> bool:
        """Whether the generation is over; first, the rows ``stop_rows()`` names (if given) finish now."""
        if stop_rows is not None:
            self.finish(stop_rows())
        return self.new_tokens >= max_new_tokens or bool(self.finished.all())

    def finish(self, rows: Iterable[int]) -> None:
        """Finish ``rows`` now, as if they had emitted an end-of-sequence token: their outputs end here, they are
        padded from now on and no longer count in a round's acceptance (the other rows are unaffected)."""
        rows = sorted({int(row) for row in rows})
        if rows:
            self.finished[torch.tensor(rows, device=self.finished.device)] = True

    def positions(self, start: int, n: int) -> torch.Tensor:
        """Position ids [B, n] of sequence indices ``start..start + n - 1`` (each row counts from its first token)."""
        return (torch.arange(start, start + n, device=self.seq.device)[None] - self.pads[:, None]).clamp(min=0)

    def commit(self, new: torch.Tensor) -> None:
        """Append ``new`` [B, n] to every row; rows finish at their first EOS."""
        finished, pad = self.finished, self.pad
        new = torch.where(finished[:, None], torch.full_like(new, pad), new)
        is_eos = torch.isin(new, self.eos) & ~finished[:, None]
        after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0  # positions after a row's first EOS in `new`
        new = new.masked_fill(after_eos, pad)
        streamed = []
        for row, tokens in enumerate(new.tolist()):
            keep = [] if finished[row] else tokens[: int(after_eos[row].logical_not().sum())]
            self.outputs[row].extend(keep)
            streamed.append(keep)
        finished.logical_or_(is_eos.any(-1))
        self.seq[:, self.committed:self.committed + new.shape[1]] = new
        self.committed += new.shape[1]
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
