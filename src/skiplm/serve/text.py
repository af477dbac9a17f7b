"""A row's tokens as text, piece by piece (:class:`TextStream`): what a streaming response sends, and where a stop
string ends the text.

Each step decodes the row's tokens so far and hands out what is new, holding back text that may still change: an
incomplete UTF-8 character (the replacement character at the end) and an ending that may be the start of a stop string.
The pieces concatenate to the whole text, so a streamed response and a plain one say the same.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

REPLACEMENT = "\ufffd"  # what decoding shows for the first bytes of a character not yet complete


class TextStream:
    """Incremental detokenization of one row with ``tokenizer`` (``lock``: held around every decode, since the
    server's threads share the tokenizer), cut at the first of ``stop`` strings."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), lock: threading.Lock | None = None):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.lock = lock or threading.Lock()
        self.tokens: list[int] = []
        self.text = ""  # handed out so far
        self.stopped = False  # a stop string was found: nothing more comes

    def _decode(self) -> str:
        with self.lock:
            return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def feed(self, tokens: Sequence[int]) -> str:
        """Add ``tokens``; the text that is now final (may be "")."""
        if self.stopped or not tokens:
            return ""
        self.tokens.extend(tokens)
        return self._advance(self._decode(), final=False)

    def finish(self) -> str:
        """The row is over: the rest of its text."""
        if self.stopped:
            return ""
        return self._advance(self._decode(), final=True)

    def _advance(self, full: str, final: bool) -> str:
        if not full.startswith(self.text):  # (decoding changed text already sent: rare; send nothing over it)
            return ""
        # a stop string may straddle what was sent and what is new: search from just before the new text
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            end = max(min(hits), len(self.text))
        elif final:
            end = len(full)
        else:
            end = len(full) - self._held(full)
        piece = full[len(self.text):end]
        self.text += piece
        return piece

    def _held(self, full: str) -> int:
        """Characters at the end of ``full`` not to send yet: a character still incomplete, or the start of a stop
        string."""
        held = 0
        while held < len(full) and full[len(full) - 1 - held] == REPLACEMENT:
            held += 1
        tail = full[:len(full) - held]
        for s in self.stop:
            for n in range(min(len(s) - 1, len(tail)), 0, -1):
                if tail.endswith(s[:n]):
                    held = max(held, len(full) - len(tail) + n)
                    break
        return held


__all__ = ["TextStream"]
