"""Quality: perplexity of the full model and of plans, on the same tokens, side by side.

Sliding-window perplexity: the first ``tokens`` tokens of the corpus (no special tokens added) are scored in windows of
``context`` tokens that advance by ``stride``; each token is scored exactly once, and every token after the first
window sees at least ``context - stride`` tokens of left context. Under a plan, the plan's *decode* skip set is applied
to every token (a perplexity is teacher-forced next-token prediction, i.e. what decoding would predict), even when
the plan runs prefill at full depth.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..errors import DataError
from ..plan import SkipPlan
from ..skipper import apply
from .rows import FULL


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens_scored: int
    context: int
    stride: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def tokenize_corpus(tokenizer, text: str, tokens: int) -> torch.Tensor:
    """The first ``tokens`` token ids of ``text`` (1-D). Tokenizes only a prefix long enough to cover them."""
    if not text.strip():
        raise DataError("the evaluation text is empty.")
    chars = max(tokens * 8, 4096)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False, return_tensors="pt").input_ids[0]
        if ids.numel() > tokens or chars >= len(text):
            break
        chars *= 2
    if ids.numel() < 2:
        raise DataError("the evaluation text has fewer than two tokens.")
    return ids[: tokens + 1]  # +1: the first token is context only, `tokens` tokens are scored


def windows(total: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) per window over positions 0..total-1; every position >= 1 is scored once."""
    if not 0 < stride < context:
        raise DataError(
            f"stride must be in 1..{context - 1} (less than the context, {context}, so that the first token scored in "
            f"a window has a token before it in that window), got {stride}."
        )
    spans, scored_until = [], 1  # position 0 has no left context: never scored
    for start in range(0, total, stride):
        end = min(start + context, total)
        if scored_until < end:
            spans.append((start, end, scored_until))
        scored_until = end
        if end == total:
            break
    return spans


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    context: int = 1024,
    stride: int = 512,
    progress: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` (as it is: apply a plan around this call to evaluate the plan) on 1-D ``ids``."""
    device = next(model.parameters()).device
    total_nll, scored = 0.0, 0
    for start, end, first_scored in windows(ids.numel(), context, stride):
        window = ids[start:end].unsqueeze(0).to(device)
        logits = model(window, use_cache=False).logits[0].float()  # [T, vocab]
        # position p predicts token p+1; score targets first_scored..end-1
        predictions = logits[first_scored - start - 1 : end - start - 1]
        targets = ids[first_scored:end].to(device)
        total_nll += torch.nn.functional.cross_entropy(predictions, targets, reduction="sum").item()
        scored += targets.numel()
        if progress:
            progress(targets.numel())
    mean = total_nll / scored
    return PerplexityResult(math.exp(mean), mean, scored, context, stride)


def compare_perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    plans: Mapping[str, SkipPlan | None],
    *,
    context: int = 1024,
    stride: int = 512,
    progress: Callable[[int], None] | None = None,
    check_model: bool = True,
) -> dict[str, PerplexityResult]:
    """Perplexity under each plan (``None`` = the full model), same tokens, same windows. A plan may not take the full
    model's name (:data:`~skiplm.measure.rows.FULL`): its numbers would be read as the baseline. ``check_model=False``:
    apply plans made for other weights too."""
    if plans.get(FULL, None) is not None:
        raise DataError(f"a plan may not be named {FULL!r}: that name is the full model's row; give the plan another "
                        "name (skiplm.measure.rows.plan_names).")
    results = {}
    for name, plan in plans.items():
        teacher_forced = None if plan is None else plan.teacher_forced()
        if teacher_forced is None or teacher_forced.is_empty():
            results[name] = perplexity(model, ids, context=context, stride=stride, progress=progress)
            continue
        with apply(model, teacher_forced, check_model=check_model):
            results[name] = perplexity(model, ids, context=context, stride=stride, progress=progress)
    return results
