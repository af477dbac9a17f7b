"""What decides, during a generation, how the speculative loop goes: how far to draft (:class:`AdaptiveDraftLength`),
whether to speculate at all (:class:`SpeedMonitor`), and which skip set drafts (:class:`DraftSelector`). Each only
observes and answers; the decoder acts on the answers. Kept by a decoder, what they measured carries over between
generations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import DataError, PlanError
from ..plan import SkipPlan


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

    def confident(self, confidence: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` [B] (bool) less those whose draft just now (top-1 probability ``confidence`` [B]) is below the
        threshold: the rows still likely to accept what is drafted next."""
        return rows & (confidence >= self.threshold)

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

    One-time costs never enter the estimates: the first observation from each ``source`` (the decoder passes the
    drafter, and ``"plain"`` for plain steps) is a warm-up — a first call pays for compiling, lazy quantization,
    packing a head, adopting a cache — recorded in ``warmups`` and left out. Without that, one 1-second first round
    kept a draft that ran at 0.6x plain decoding's cost per token out for good: each retry was blended into the
    poisoned average and failed, and the back-off doubled. Each fallback event says when (``at_token``), how long
    (``plain_steps``) and why (both rates, and ``reason``).
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
        self.events: list[dict[str, float | str]] = []
        self.warmups: list[dict[str, float | str]] = []  # first observations, left out of the estimates
        self._seen: set = set()

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

    def _warmup(self, source, kind: str, seconds: float, tokens: int) -> bool:
        """Whether this is ``source``'s first observation (then recorded as a warm-up, not estimated from)."""
        if source is None or source in self._seen:
            return False
        self._seen.add(source)
        self.warmups.append({"kind": kind, "seconds": seconds, "tokens": tokens})
        return True

    def observe_plain(self, seconds: float, tokens: int = 1, source=None) -> None:
        if self.plain_left > 0:
            self.plain_left -= 1
            if self.plain_left == 0:
                self.rounds, self.retrying = 0, True  # retry, keeping what speculation measured so far
        if self._warmup(source, "plain", seconds, tokens):
            return
        self.plain = self._smooth(self.plain, seconds, tokens)
        self.plain_observed += 1

    def observe_round(self, seconds: float, tokens: int, at_token: int = 0, source=None) -> None:
        if self._warmup(source, "speculative", seconds, tokens):
            return
        self.spec = self._smooth(self.spec, seconds, tokens)
        self.rounds += 1
        if self.rounds < (self.retry_rounds if self.retrying else self.min_rounds) or self.plain is None:
            return
        spec, plain = self.rate(self.spec), self.rate(self.plain)
        if spec > plain * (1 + self.margin):
            self.events.append({"at_token": at_token, "plain_steps": self.backoff, "speculative_s_per_token": spec,
                                "plain_s_per_token": plain,
                                "reason": f"speculation {spec * 1e3:.1f} ms/token > plain decoding "
                                          f"{plain * 1e3:.1f} ms/token" + (" (a retry)" if self.retrying else "")})
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

    def observe(self, index: int, seconds: float, tokens: float) -> None:
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


__all__ = ["AdaptiveDraftLength", "DraftSelector", "SpeedMonitor"]
