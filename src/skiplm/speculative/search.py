"""Offline draft search (``skiplm draft-search``): the candidates — skip sets of the blocks of lowest Block Influence,
in each draft precision — timed against plain greedy decoding on calibration prompts; the fastest becomes a draft plan
that records its precision, the runner-up skip sets (for on-the-fly selection) and what the search measured.

Trained drafts (:mod:`skiplm.speculative.trained`) join the search two ways: ``train=(2, 4)`` trains a LoRA adapter
for the skip sets of 2 and 4 blocks (once per skip set: the adapter is merged before each precision casts or quantizes
the weights) and times each at every precision, as ``skip-K-blocks-PRECISION-lora``; ``trained=`` adds draft plans
trained earlier (``skiplm draft-train``). The training time counts in the search's time. A trained winner is saved
with its adapter beside the plan, and records no runner-ups (its adapter was trained for its own skip set only).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DataError
from ..plan import SkipPlan
from ..planners import get_planner, load_calibration
from ..report.files import write_json
from .bench import Draft, prompt_set, run_speculative_bench
from .decoder import DEFAULT_MAX_DRAFT
from .quantize import precision_name, precision_unavailable
from .trained import save_trained_draft


def search_draft(model: nn.Module, prompts: list[list[int]], candidates: Sequence[Draft], *, new_tokens: int = 32,
                 max_draft: int = DEFAULT_MAX_DRAFT, repeats: int = 1, eos_token_id=None, pad_token_id: int = 0,
                 batch_sizes: Sequence[int] = (1,),
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Offline draft search: each candidate drafts for the whole generation (no fallback) on the calibration
    ``prompts`` at each of ``batch_sizes``, timed against plain greedy decoding in the same run; the winner is the
    candidate with the highest measured speedup of the whole speculative loop (acceptance, draft cost and verify cost
    all count) — over several batch sizes, the highest geometric mean of its speedups (``speedups``; each batch
    size's own in ``by_batch``). ``pays`` says whether it beats plain decoding at every batch size. ``repeats``: rounds
    over the prompts, in alternating order (the median speedup counts); one round tells apart candidates more than
    ~5% apart."""
    if not candidates:
        raise DataError("the draft search needs at least one candidate.")
    batch_sizes = tuple(dict.fromkeys(int(b) for b in batch_sizes))
    if not batch_sizes or min(batch_sizes) < 1:
        raise DataError("the draft search needs positive batch sizes, e.g. 1 or 1,4.")
    if len(prompts) < max(batch_sizes):
        raise DataError(f"batch {max(batch_sizes)} needs at least as many calibration prompts; there are "
                        f"{len(prompts)}: raise --limit to {max(batch_sizes)} or more.")
    start = time.perf_counter()
    result = run_speculative_bench(model, {"calibration": prompts}, candidates, batch_sizes=batch_sizes,
                                   repeats=repeats, new_tokens=new_tokens, max_draft=max_draft,
                                   eos_token_id=eos_token_id, pad_token_id=pad_token_id, fallback=False,
                                   progress=progress)
    measured = {b: result["results"][f"calibration_b{b}"] for b in batch_sizes}
    # each candidate's speedup per batch size (keyed "1", "4", ...: as the JSON files keep them)
    by_batch = {d.name: {str(b): measured[b][d.name]["speedup"] for b in batch_sizes} for d in candidates}
    speedups = {name: math.prod(per.values()) ** (1 / len(per)) for name, per in by_batch.items()}
    best = max(candidates, key=lambda d: speedups[d.name])
    # acceptance: the mean over the batch sizes
    acceptance = {d.name: statistics.fmean(measured[b][d.name]["acceptance_rate"] for b in batch_sizes)
                  for d in candidates}
    return {"best": best, "pays": min(by_batch[best.name].values()) > 1.0, "speedups": speedups,
            "by_batch": by_batch, "batch_sizes": list(batch_sizes), "acceptance": acceptance,
            "seconds": time.perf_counter() - start, "measured": result}


def searchable_precisions(precisions: Sequence[str], device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The draft precisions to search (canonical names, once each) that can draft on ``device``, and why each other
    one cannot."""
    names = list(dict.fromkeys(precision_name(p) for p in precisions))
    reasons = {p: reason for p in names if (reason := precision_unavailable(p, device)) is not None}
    return [p for p in names if p not in reasons], reasons


def draft_candidates(model: nn.Module, tokenizer, precisions: Sequence[str], max_blocks: int, *,
                     name: str | None = None) -> list[Draft]:
    """Candidates: per precision, the plans skipping the 1..``max_blocks`` blocks of lowest Block Influence (ranked
    once, on gsm8k calibration text: the plan for the most blocks lists them in order, and its prefixes are the smaller
    candidates), and a copy in another precision at full depth too."""
    calibration = load_calibration(tokenizer, "gsm8k", 2, 256)
    layers = model.config.num_hidden_layers
    largest = get_planner("block-influence")(model, skip=min(max_blocks, layers - 1), calibration=calibration,
                                             name=name)
    order = largest.provenance["order"]
    return [Draft(f"skip-{k}-blocks" + ("" if precision == "float32" else f"-{precision}"),
                  plan=SkipPlan.from_layers(layers, blocks=order[:k], model=largest.model, provenance={
                      **largest.provenance, "target": {"skip": k}, "order": order[:k],
                      "draft": {"precision": precision}}))
            for precision in precisions
            for k in range(0 if precision != "float32" else 1, len(order) + 1)]


def _with_vocab(drafts: list[Draft], vocab) -> list[Draft]:
    """``drafts`` each with the reduced-vocabulary head ``vocab`` (None: as they are), recorded in its plan's
    provenance (``draft.vocab``: :func:`skiplm.speculative.vocab.plan_draft_vocab` reads it back)."""
    if vocab is None:
        return drafts
    return [dataclasses.replace(d, vocab=vocab, plan=dataclasses.replace(d.plan, provenance={
        **d.plan.provenance, "draft": {**(d.plan.provenance.get("draft") or {}), "vocab": vocab.to_json()}}))
            for d in drafts]


@dataclasses.dataclass
class DraftSearch:
    """What ``skiplm draft-search`` found: the winning draft plan, and the search's measurements."""

    plan: SkipPlan
    best: Draft
    found: dict[str, Any]  # search_draft's result
    seconds: float  # ranking and timing together

    def save(self, out: str | Path, command: str = "") -> Path:
        """The draft plan to ``out`` (a trained winner's adapter beside it, :func:`~skiplm.speculative.trained.
        save_trained_draft`), and the search's record beside it (``.search.json``)."""
        if self.best.adapter is not None:
            path = save_trained_draft(self.plan, self.best.adapter, out)
        else:
            path = self.plan.save(out)
        found = self.found
        write_json(Path(out).with_suffix(".search.json"),
                   {"kind": "draft-search", "command": command, "best": self.best.name, "pays": found["pays"],
                    "seconds": self.seconds, "speedups": found["speedups"], "acceptance": found["acceptance"],
                    "batch_sizes": found["batch_sizes"], "speedups_by_batch": found["by_batch"],
                    "measured": found["measured"]})
        return path


def trained_candidates(model: nn.Module, tokenizer, candidates: Sequence[Draft], precisions: Sequence[str],
                       train: Sequence[int], *, trainer: Callable[..., Any] | None = None,
                       progress: Callable[[str], None] | None = None) -> list[Draft]:
    """For each block count in ``train``, the skip set of that many blocks among ``candidates`` with a LoRA adapter
    trained for it (``trainer(model, plan)`` -> a :class:`~skiplm.speculative.trained.DraftAdapter`; by default
    :func:`~skiplm.speculative.trained.train_draft` on :func:`~skiplm.speculative.trained.draft_training_data`), as
    one candidate per precision named ``skip-K-blocks-PRECISION-lora``."""
    from .trained import draft_training_data, train_draft

    by_blocks = {len(d.plan.decode.blocks): d.plan for d in candidates if d.plan is not None}
    missing = sorted(set(train) - set(by_blocks) - {0})
    if 0 in train or missing:
        raise DataError(f"--train takes block counts of skip-set candidates (1..{max(by_blocks, default=0)}), got "
                        f"{', '.join(map(str, sorted(set(train))))}.")
    if trainer is None:
        data = None

        def trainer(model_, plan):
            nonlocal data
            data = data if data is not None else draft_training_data(model_, tokenizer)
            return train_draft(model_, plan, data)
    out = []
    for blocks in dict.fromkeys(train):
        if progress:
            progress(f"training a draft adapter for {blocks} skipped block(s)")
        base = by_blocks[blocks]
        adapter = trainer(model, base)
        for precision in precisions:
            plan = dataclasses.replace(base, provenance={**base.provenance, "draft": {"precision": precision}})
            suffix = "" if precision == "float32" else f"-{precision}"
            out.append(Draft(f"skip-{blocks}-blocks{suffix}-lora", plan=plan, adapter=adapter))
    return out


def run_draft_search(model: nn.Module, tokenizer, *, precisions: Sequence[str], max_blocks: int = 6,
                     prompts: str = "gsm8k", alternatives: int = 2, limit: int = 3, new_tokens: int = 64,
                     repeats: int = 1, max_draft: int = DEFAULT_MAX_DRAFT, name: str | None = None,
                     train: Sequence[int] = (), trained: Sequence[Draft] = (), trainer: Callable[..., Any] | None = None,
                     progress: Callable[[str], None] | None = None, vocab=None,
                     batch_sizes: Sequence[int] = (1,)) -> DraftSearch:
    """Rank blocks, time every candidate (:func:`draft_candidates`, :func:`search_draft`) on ``limit`` prompts of
    ``prompts``, and make the winner a draft plan: its provenance records its precision, the ``alternatives`` fastest
    other skip sets of that precision (runner-ups, for on-the-fly selection) and the search's settings and
    measurements. Trained drafts: ``train`` (block counts: adapters trained now, :func:`trained_candidates`, with
    ``trainer`` if given) and ``trained`` (trained drafts made earlier) are candidates too. ``vocab``: every candidate
    drafts with this reduced-vocabulary head (a :class:`~skiplm.speculative.vocab.DraftVocab`), recorded in the draft
    plan (``draft.vocab``). ``batch_sizes``: timed at each (the winner by the geometric mean of its speedups)."""
    start = time.perf_counter()
    if progress:
        progress("ranking blocks by Block Influence")
    candidates = _with_vocab(draft_candidates(model, tokenizer, precisions, max_blocks, name=name), vocab)
    trained_now = trained_candidates(model, tokenizer, candidates, precisions, train, trainer=trainer,
                                     progress=progress) if train else []
    candidates += trained_now + _with_vocab(list(trained), vocab)
    calibration = prompt_set(tokenizer, prompts, limit)
    found = search_draft(model, calibration, candidates, new_tokens=new_tokens, max_draft=max_draft, repeats=repeats,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or 0,
                         batch_sizes=batch_sizes,
                         progress=(lambda text: progress(f"timing candidates: {text}")) if progress else None)
    seconds = time.perf_counter() - start
    best = found["best"]
    # runner-ups: untrained skip sets of the winner's precision (a trained winner's adapter fits its skip set only)
    runner_ups = [] if best.adapter is not None else sorted(
        (d for d in candidates if d is not best and d.precision == best.precision and d.adapter is None),
        key=lambda d: -found["speedups"][d.name])[:alternatives]
    draft = {**(best.plan.provenance.get("draft") or {}), "precision": best.precision or "float32",
             "alternatives": [d.plan.decode.blocks for d in runner_ups]}
    draft.pop("adapter", None)  # (written again, for the winner's own adapter, when it is saved)
    plan = dataclasses.replace(best.plan, provenance={
        **best.plan.provenance, "draft": draft,
        "draft_search": {"speedups": found["speedups"], "acceptance": found["acceptance"], "pays": found["pays"],
                         "seconds": seconds, "prompts": prompts, "limit": limit, "new_tokens": new_tokens,
                         "repeats": repeats, "batch_sizes": found["batch_sizes"],
                         "speedups_by_batch": found["by_batch"],
                         "trained": any(d is best for d in trained_now),  # its training is in these seconds
                         "trained_candidates": [d.name for d in candidates if d.adapter is not None]}})
    return DraftSearch(plan, best, found, seconds)


__all__ = ["DraftSearch", "draft_candidates", "run_draft_search", "search_draft", "searchable_precisions",
           "trained_candidates"]
