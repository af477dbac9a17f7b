"""How tokens are chosen, and which drafts the full model accepts: the sampling settings as one object
(:class:`Sampling`), the random stream of one generation (:class:`Sampler`), and the two acceptance rules.

Greedy: a draft is accepted while it is the full model's argmax (:func:`greedy_acceptance`). Sampling (temperature,
top-k, top-p, applied alike to draft and full distributions): speculative rejection sampling (Leviathan et al. 2023,
Chen et al. 2023, :func:`rejection_sampling`) — accept d_i with probability min(1, p(d_i) / q(d_i)); at the first
rejection draw from norm(max(0, p - q)); if every draft is accepted, draw a bonus token from p_k. Every committed
token is then distributed as the full model's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import DataError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The sampling settings: greedy (``do_sample=False``), or sampling with ``temperature``, ``top_k`` (0: off) and
    ``top_p`` (1: off), from a stream seeded with ``seed`` (None: a random seed)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

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

    def sampler(self, device: torch.device) -> Sampler:
        """The random stream of one generation on ``device`` (none is drawn from when greedy)."""
        return Sampler(self, device)


class Sampler:
    """:class:`Sampling` settings with the random stream of one generation: every token the loop chooses, drafted or
    committed, is chosen here, in the order the loop asks (so a seed reproduces a generation)."""

    def __init__(self, settings: Sampling, device: torch.device):
        self.settings = settings
        self.generator: torch.Generator | None = None
        if settings.do_sample:
            self.generator = torch.Generator(device=device)
            seed = settings.seed if settings.seed is not None else int(torch.randint(2**62, ()).item())
            self.generator.manual_seed(seed)

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token per row from logits [B, V] -> [B]: the argmax, or a draw from the sampling distribution."""
        if not self.settings.do_sample:
            return logits.argmax(-1)
        return self._draw(self.settings.probabilities(logits))

    def propose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A draft token per row from the draft's logits [B, V], and the distribution q [B, V] it came from (its top-1
        is the draft's confidence; sampling needs q for the acceptance rule)."""
        q = self.settings.probabilities(logits)
        return (self._draw(q) if self.settings.do_sample else logits.argmax(-1)), q

    def accept(self, drafts: torch.Tensor, draft_probs: Sequence[torch.Tensor] | None,
               logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drafts [B, k] against the full model's logits [B, k + 1, V] at ``[last committed, d1..dk]`` -> (accepted
        [B]: the leading drafts each row keeps, tokens [B, k + 1]: a row's first ``accepted + 1`` tokens are what it
        commits). ``draft_probs``: per draft, the distribution [B, V] it was drawn from (None: proposed with
        certainty, as prompt lookup does)."""
        if not self.settings.do_sample:
            return greedy_acceptance(drafts, logits)
        p = self.settings.probabilities(logits)  # [B, k + 1, V]
        q = (torch.stack(list(draft_probs), dim=1) if draft_probs is not None  # [B, k, V]
             else nn.functional.one_hot(drafts, p.shape[-1]).to(p.dtype))
        return rejection_sampling(drafts, q, p, self.generator)

    def _draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per row of ``probs`` [B, V] -> [B]."""
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


def greedy_acceptance(drafts: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy: a row accepts its drafts while each is the full model's argmax; its tokens are the argmaxes
    themselves (equal to the drafts where accepted, then the correction or the bonus)."""
    k = drafts.shape[1]
    target = logits.argmax(-1)  # [B, k + 1]: the full model's greedy choices
    accepted = (drafts == target[:, :k]).long().cumprod(-1).sum(-1)
    return accepted, target


def rejection_sampling(drafts: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                       generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative rejection sampling: drafts [B, k] drawn from q [B, k, V], full-model distributions p [B, k + 1, V].
    Accept d_i while u_i < p(d_i) / q(d_i); at the first rejection (or after all k, as the bonus from p_k) draw from
    norm(max(0, p - q))."""
    batch, k = drafts.shape
    p_d = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    q_d = q.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(p_d.shape, generator=generator, device=p.device)
    accept = u * q_d < p_d  # u < min(1, p/q), q(d) > 0 since d was drawn from q
    accepted = accept.long().cumprod(-1).sum(-1)  # [B] leading accepted drafts
    rows = torch.arange(batch, device=p.device)
    q_padded = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)  # at accepted == k: the bonus, from p_k
    residual = (p[rows, accepted] - q_padded[rows, accepted]).clamp(min=0)
    empty = residual.sum(-1, keepdim=True) <= 0
    residual = torch.where(empty, p[rows, accepted], residual)
    correction = torch.multinomial(residual / residual.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)
    tokens = torch.cat([drafts, drafts[:, :1]], dim=1).scatter(1, accepted[:, None], correction[:, None])
    return accepted, tokens


__all__ = ["Sampler", "Sampling", "greedy_acceptance", "rejection_sampling"]
