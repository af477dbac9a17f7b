"""The scheduler: requests that arrive while a batch decodes wait, and go together into the next batch.

One worker thread owns the model. It takes the oldest waiting request, then every other waiting request that can
share its batch, up to ``max_batch`` rows — same sampling settings (a batch has one sampler; a request with a seed
runs alone), and the longest prompt plus the most new tokens any of them asks for within the model's context (a batch
is left padded to its longest prompt and decodes up to its largest ``max_tokens``) — and decodes them in one call of
the decoder (:class:`~skiplm.speculative.SpeculativeDecoder`, or :class:`~skiplm.serve.plain.PlainDecoder`).
``batch_wait`` seconds (0 by default) let requests arriving just after the first one join its batch.

Per row, while the batch runs: its tokens become text (:class:`~skiplm.serve.text.TextStream`) and go to its
request's event queue as they are committed (what a streaming response sends); a row is finished — as if it had
emitted an end-of-sequence token, through the decoder's ``stop_rows`` hook — at its own ``max_tokens``, at a stop
string, or when its client went away (:meth:`Job.cancel`). A finished row no longer holds the batch back and the
other rows are unchanged: greedy rows are each what plain greedy decoding gives them alone (the full model verifies).
A batch ends when all its rows are finished.

The batch is static: a request that arrives while a batch runs waits for it to end (the decoder's caches are one
batch's; rows are not added to a running batch).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..errors import SkipLMError
from ..models.generation import left_pad
from ..speculative.sampling import Sampling
from ..speculative.stats import SpeculativeStats
from .text import TextStream

log = logging.getLogger(__name__)

RECENT_BATCHES = 16  # batches /v1/skiplm/stats lists one by one


@dataclasses.dataclass(frozen=True)
class Event:
    """What a request's queue receives: ``"text"`` (a piece of its text, and the token ids committed with it),
    ``"done"`` (its finish reason) or ``"error"`` (a message and an HTTP status)."""

    kind: str
    text: str = ""
    tokens: tuple[int, ...] = ()
    finish_reason: str | None = None
    status: int = 500


_ids = itertools.count()


class Job:
    """One request's generation: ``prompt`` (token ids), at most ``max_tokens`` new tokens, ``sampling``, ``stop``
    strings. Its :class:`Event` s go to an asyncio queue on ``loop`` (the server's event loop; the worker thread
    posts to it thread-safely)."""

    def __init__(self, prompt: Sequence[int], max_tokens: int, sampling: Sampling, text: TextStream,
                 loop: asyncio.AbstractEventLoop | None = None):
        if not prompt:
            raise SkipLMError("a request needs at least one prompt token.")
        self.id = next(_ids)
        self.prompt = list(prompt)
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.stream = text
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.tokens: list[int] = []  # its new tokens (ending at its first EOS, at most max_tokens)
        self.finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled", "error"
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.started: float | None = None  # when its batch started
        self.batch_size = 0  # the size of the batch it decoded in

    @property
    def key(self) -> Any:
        """Jobs with the same key may share a batch: the same sampling; a seeded job shares with nobody."""
        if not self.sampling.do_sample:
            return "greedy"
        if self.sampling.seed is not None:
            return ("seeded", self.id)
        return dataclasses.replace(self.sampling, seed=None)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """The client went away: its row stops at the next step (or it never starts); nothing more is sent."""
        if not self.finished:
            self.cancelled = True

    # -- called by the worker ----------------------------------------------------------------------------------------
    def _post(self, event: Event) -> None:
        if self.loop is None:
            self.queue.put_nowait(event)
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed (the server is shutting down)
            pass

    def _feed(self, tokens: Sequence[int], eos: set[int]) -> None:
        """This row's newly committed tokens (ending at its first EOS)."""
        if self.finished or not tokens:
            return
        tokens = list(tokens[:self.max_tokens - len(self.tokens)])  # a round may commit past the row's own limit
        self.tokens.extend(tokens)
        self._post(Event("text", self.stream.feed(tokens), tuple(tokens)))
        if self.stream.stopped or (self.tokens and self.tokens[-1] in eos):
            self._finish("stop")
        elif len(self.tokens) >= self.max_tokens:
            self._finish("length")

    def _finish(self, reason: str) -> None:
        if self.finished:
            return
        if reason in ("stop", "length"):
            rest = self.stream.finish()
            if rest:
                self._post(Event("text", rest))
        self.finish_reason = reason
        self._post(Event("done", finish_reason=reason))

    def _fail(self, message: str, status: int) -> None:
        if not self.finished:
            self.finish_reason = "error"
            self._post(Event("error", message, status=status))


class ServeStats:
    """What the server has done since it started: requests, batches, and the decoder's stats summed over batches."""

    SUMMED = ("rounds", "row_rounds", "drafted", "accepted", "committed_from_draft", "discarded", "plain_steps",
              "fallback_steps", "fallbacks", "lookup_rounds", "lookup_committed", "draft_switches", "prefill_seconds",
              "draft_prefill_seconds", "draft_seconds", "verify_seconds", "plain_seconds", "total_seconds")

    def __init__(self):
        self.lock = threading.Lock()
        self.started = time.time()
        self.requests = collections.Counter()  # by finish reason
        self.batch_sizes = collections.Counter()
        self.batches = 0
        self.rows_tokens = 0  # new tokens sent to clients, over all requests
        self.queue_seconds = 0.0  # summed over requests: submitted -> its batch started
        self.decoder = {name: 0 for name in self.SUMMED}
        self.recent: collections.deque = collections.deque(maxlen=RECENT_BATCHES)

    def record(self, jobs: Sequence[Job], stats: SpeculativeStats | None, max_new_tokens: int) -> None:
        with self.lock:
            self.batches += 1
            self.batch_sizes[len(jobs)] += 1
            for job in jobs:
                self.requests[job.finish_reason or "error"] += 1
                self.rows_tokens += len(job.tokens)
                self.queue_seconds += (job.started or job.submitted) - job.submitted
            if stats is not None:
                for name in self.SUMMED:
                    self.decoder[name] += getattr(stats, name)
            self.recent.append({
                "size": len(jobs), "max_new_tokens": max_new_tokens,
                "steps_tokens": stats.new_tokens if stats is not None else 0,  # tokens the batch advanced per row
                "seconds": stats.total_seconds if stats is not None else 0.0,
                "acceptance_rate": stats.acceptance_rate if stats is not None else 0.0,
                "rows": [{"prompt_tokens": len(j.prompt), "max_tokens": j.max_tokens, "new_tokens": len(j.tokens),
                          "finish_reason": j.finish_reason} for j in jobs]})

    def to_json(self) -> dict[str, Any]:
        with self.lock:
            d = dict(self.decoder)
            total = sum(self.requests.values())
            summary = {
                "uptime_seconds": time.time() - self.started,
                "requests": {"total": total, **dict(self.requests)},
                "tokens_generated": self.rows_tokens,
                "mean_queue_seconds": self.queue_seconds / total if total else 0.0,
                "batches": {"total": self.batches, "max_size": max(self.batch_sizes, default=0),
                            "sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}},
                "decoder": {**d,
                            "acceptance_rate": d["accepted"] / d["drafted"] if d["drafted"] else 0.0,
                            "mean_accepted_per_round": d["accepted"] / d["row_rounds"] if d["row_rounds"] else 0.0,
                            "tokens_per_round": (d["committed_from_draft"] / d["row_rounds"] + 1.0
                                                 if d["row_rounds"] else 0.0)},
                "recent_batches": list(self.recent),
            }
        return summary


class Batcher:
    """The worker thread that batches :class:`Job` s through ``decoder`` (see the module docstring). ``context``: the
    model's context in tokens (None: unchecked); ``eos``/``pad``: the ids generation ends at / pads with."""

    def __init__(self, decoder, *, eos: Sequence[int], pad: int, max_batch: int = 8, batch_wait: float = 0.0,
                 max_draft: int | None = None, context: int | None = None):
        if max_batch < 1:
            raise SkipLMError(f"max_batch must be at least 1, got {max_batch}.")
        self.decoder = decoder
        self.eos, self.pad = list(eos), pad
        self.max_batch, self.batch_wait = max_batch, batch_wait
        self.max_draft = max_draft
        self.context = context
        self.stats = ServeStats()
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="skiplm-serve-batcher", daemon=True)
        self._thread.start()

    # -- the server's side -------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise SkipLMError("the server is shutting down.")
            self._waiting.append(job)
            self._cond.notify()

    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking jobs; the batch running ends; jobs still waiting get an error."""
        with self._cond:
            self._closed = True
            left = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for job in left:
            job._fail("the server is shutting down.", 503)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- the worker --------------------------------------------------------------------------------------------------
    def _fits(self, batch: list[Job], job: Job) -> bool:
        if job.key != batch[0].key or len(batch) >= self.max_batch:
            return False
        if self.context is None:
            return True
        prompt = max(len(j.prompt) for j in [*batch, job])
        return prompt + max(j.max_tokens for j in [*batch, job]) <= self.context

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._closed:
                while self._waiting and self._waiting[0].cancelled:  # its client left before it started
                    job = self._waiting.popleft()
                    job.finish_reason = "cancelled"
                    self.stats.record([job], None, 0)
                if self._waiting:
                    break
                self._cond.wait()
            if self._closed:
                return None
            first = self._waiting[0]
        if self.batch_wait > 0:  # let requests arriving just after the first join it
            time.sleep(max(0.0, first.submitted + self.batch_wait - time.perf_counter()))
        with self._cond:
            batch, rest = [], collections.deque()
            for job in self._waiting:
                if job.cancelled:
                    rest.append(job)  # (dropped, counted, at the next call)
                elif not batch or self._fits(batch, job):
                    batch.append(job)
                else:
                    rest.append(job)
            self._waiting = rest
        return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._decode(batch)

    def _decode(self, jobs: list[Job]) -> None:
        started = time.perf_counter()
        for job in jobs:
            job.started, job.batch_size = started, len(jobs)
        eos = set(self.eos)
        ids, mask = left_pad([job.prompt for job in jobs], self.pad)
        max_new_tokens = max(job.max_tokens for job in jobs)

        def stream(rows: list[list[int]]) -> None:
            for job, tokens in zip(jobs, rows):
                job._feed(tokens, eos)

        def stop_rows() -> list[int]:
            return [row for row, job in enumerate(jobs) if job.finished or job.cancelled]

        options: dict[str, Any] = {}
        if self.max_draft is not None:
            options["max_draft"] = self.max_draft
        stats = None
        try:
            output = self.decoder.generate(ids, mask, max_new_tokens=max_new_tokens, sampling=jobs[0].sampling,
                                           streamer=stream, eos_token_id=self.eos, pad_token_id=self.pad,
                                           stop_rows=stop_rows, **options)
            stats = output.stats
        except SkipLMError as exc:
            for job in jobs:
                job._fail(str(exc), 400)
        except Exception as exc:  # noqa: BLE001 (one bad batch must not stop the server)
            log.exception("decoding a batch of %d failed", len(jobs))
            for job in jobs:
                job._fail(f"internal error while decoding: {type(exc).__name__}: {exc}", 500)
        finally:
            for job in jobs:
                if job.cancelled and not job.finished:
                    job.finish_reason = "cancelled"
                job._finish("length")  # (a row still open decoded the batch's every step: its limit)
            self.stats.record(jobs, stats, max_new_tokens)


__all__ = ["Batcher", "Event", "Job", "ServeStats"]
