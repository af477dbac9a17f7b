"""Generation agreement: how closely a plan's greedy output follows the full model's, token by token and answer by answer.

Method. Each prompt is formatted (with the tokenizer's chat template, by default) and tokenized once; the full model
and every plan then decode the *same* left-padded batches greedily (plain argmax, KV cache on, no sampling, no
repetition penalty or other logits processing), up to ``new_tokens`` new tokens per row. A row's continuation ends at
its first end-of-sequence token, which is kept: stopping is a decision of the model, and a plan that fails to stop where
the full model does (or stops early) has not matched it.

Per prompt, with ``reference`` the full model's continuation and ``candidate`` the plan's:

* ``matched_prefix`` — how many leading tokens are equal (the position of the first divergence);
* ``prefix_agreement`` — ``matched_prefix / len(reference)``: the share of the full model's output reproduced before
  the first divergence (1.0 when both are empty; 0.0 when only the reference is);
* ``positional_match`` — the share of positions ``0 .. max(len) - 1`` holding the same token in both (a position only
  one sequence reaches counts as a mismatch), so agreement that resumes after a divergence is visible too;
* ``exact_match`` — the two continuations are identical.

Aggregates: the mean of the per-prompt ``prefix_agreement``, the pooled ``prefix_agreement_pooled`` (sum of matched
prefixes / sum of reference lengths), the pooled ``positional_match`` (matching positions / compared positions over all
prompts) and the share of exact matches.

Answers (GSM8K, or a prompt file whose records carry an ``answer``): the reference answer is the number after the last
``####`` of the reference solution (else its last number); a model's answer is the last number in its decoded output,
commas removed. ``answer_agreement`` is the share of the prompts whose full-model output has a number
(``answer_compared_prompts``) where the plan's answer is that same number; ``accuracy`` is the share of prompts with a
reference answer where a configuration's answer equals it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from ..errors import DataError
from ..models.data import (Prompt, encode_prompts, extract_answer, gsm8k_prompts, load_prompts, normalize_number,
                           read_prompt_file, reference_answer)
from ..models.generation import (check_context, eos_token_ids, greedy_continuations, greedy_decode, left_pad,
                                 truncate_at_eos)
from ..plan import SkipPlan
from ..report.files import agreement_rows as summary_rows
from ..skipper import apply

FULL = "full"


# -- metrics on token sequences ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TokenAgreement:
    """How a candidate token sequence agrees with a reference one (see the module docstring)."""

    reference_length: int
    candidate_length: int
    matched_prefix: int
    matching_positions: int
    compared_positions: int

    @property
    def exact_match(self) -> bool:
        return self.matched_prefix == self.reference_length == self.candidate_length

    @property
    def prefix_agreement(self) -> float:
        if self.reference_length == 0:
            return 1.0 if self.candidate_length == 0 else 0.0
        return self.matched_prefix / self.reference_length

    @property
    def positional_match(self) -> float:
        return 1.0 if self.compared_positions == 0 else self.matching_positions / self.compared_positions

    @property
    def first_divergence(self) -> int | None:
        """The first position where the sequences differ (a missing token differs), or None if they are equal."""
        return None if self.exact_match else self.matched_prefix

    def to_json(self) -> dict[str, Any]:
        return {
            "reference_length": self.reference_length,
            "candidate_length": self.candidate_length,
            "matched_prefix": self.matched_prefix,
            "first_divergence": self.first_divergence,
            "prefix_agreement": self.prefix_agreement,
            "positional_match": self.positional_match,
            "exact_match": self.exact_match,
        }


def token_agreement(reference: Sequence[int], candidate: Sequence[int]) -> TokenAgreement:
    """Compare two token sequences (each already truncated at its end-of-sequence token)."""
    reference, candidate = list(reference), list(candidate)
    matched = 0
    for ref, cand in zip(reference, candidate):
        if ref != cand:
            break
        matched += 1
    matching = sum(ref == cand for ref, cand in zip(reference, candidate))
    return TokenAgreement(len(reference), len(candidate), matched, matching, max(len(reference), len(candidate)))


def summarize(agreements: Sequence[TokenAgreement]) -> dict[str, float | int]:
    """Aggregate per-prompt agreements: per-prompt means, pooled shares, and the exact-match rate."""
    if not agreements:
        raise DataError("no prompts to summarize.")
    n = len(agreements)
    reference_tokens = sum(a.reference_length for a in agreements)
    compared = sum(a.compared_positions for a in agreements)
    return {
        "prompts": n,
        "prefix_agreement": sum(a.prefix_agreement for a in agreements) / n,
        "prefix_agreement_pooled": (sum(a.matched_prefix for a in agreements) / reference_tokens
                                    if reference_tokens else float(all(a.candidate_length == 0 for a in agreements))),
        "positional_match": sum(a.matching_positions for a in agreements) / compared if compared else 1.0,
        "exact_match": sum(a.exact_match for a in agreements) / n,
        "mean_matched_prefix": sum(a.matched_prefix for a in agreements) / n,
        "mean_reference_length": reference_tokens / n,
        "mean_candidate_length": sum(a.candidate_length for a in agreements) / n,
    }


# -- numeric answers (read by skiplm.models.data) -----------------------------------------------------------------
def answers_agree(candidate: str | None, reference: str | None) -> bool:
    """Whether an extracted answer is the same number as a reference answer (no answer never is)."""
    return candidate is not None and candidate == reference


def answer_agreement(candidate: Sequence[str | None], reference: Sequence[str | None]) -> tuple[float | None, int]:
    """(share, count): over the ``count`` prompts whose reference output has an answer, the share where the candidate
    has the same one; share None when no reference output has an answer."""
    answered = [i for i, a in enumerate(reference) if a is not None]
    if not answered:
        return None, 0
    return sum(candidate[i] == reference[i] for i in answered) / len(answered), len(answered)


# -- the generations, compared ------------------------------------------------------------------------------------
def compare_generations(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    plans: Mapping[str, SkipPlan | None],
    *,
    new_tokens: int,
    eos_ids: Sequence[int],
    pad_token_id: int,
    batch_size: int = 8,
    check_model: bool = True,
    progress: Callable[[str, int], None] | None = None,
) -> tuple[dict[str, list[list[int]]], dict[str, float]]:
    """Greedy continuations of the full model (key ``"full"``) and of each plan (``None``: the full model again) on the
    same batches, and the seconds each took. Prompts are batched by length (less padding); outputs are in input
    order."""
    if not prompts:
        raise DataError("there are no prompts.")
    if FULL in plans:
        raise DataError(f"{FULL!r} names the full model; give the plan another name.")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    ordered = [prompts[i] for i in order]
    continuations, seconds = {}, {}
    for name, plan in {FULL: None, **plans}.items():
        report = (lambda rows, name=name: progress(name, rows)) if progress else None
        start = time.perf_counter()
        if plan is None:
            sorted_out = greedy_continuations(model, ordered, new_tokens=new_tokens, eos_ids=eos_ids,
                                              pad_token_id=pad_token_id, batch_size=batch_size, progress=report)
        else:
            with apply(model, plan, check_model=check_model):
                sorted_out = greedy_continuations(model, ordered, new_tokens=new_tokens, eos_ids=eos_ids,
                                                  pad_token_id=pad_token_id, batch_size=batch_size, progress=report)
        seconds[name] = time.perf_counter() - start
        out: list[list[int]] = [[] for _ in prompts]
        for position, index in enumerate(order):
            out[index] = sorted_out[position]
        continuations[name] = out
    return continuations, seconds


# -- the whole measurement, on text -----------------------------------------------------------------------------------
def measure_agreement(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    plans: Mapping[str, SkipPlan | None],
    *,
    new_tokens: int = 128,
    batch_size: int = 8,
    chat: bool = True,
    source: str = "prompts",
    check_model: bool = True,
    truncate: bool = False,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Generate with the full model and each plan on ``prompts`` and compare (see the module docstring). Returns a
    JSON-ready dict: settings, per-configuration summaries, and per-prompt outputs and metrics.

    A prompt that does not fit the model's context with ``new_tokens`` more is refused before anything runs
    (:func:`~skiplm.models.generation.check_context`); with ``truncate``, every configuration sees its last tokens
    that fit instead, and the settings count the prompts cut."""
    encoded = encode_prompts(tokenizer, prompts, chat=chat)
    keep = check_context(model, max(map(len, encoded)), new_tokens, truncate=truncate,
                         what="the prompt" if len(encoded) == 1 else "the longest prompt")
    truncated = sum(len(ids) > keep for ids in encoded)
    encoded = [ids[-keep:] for ids in encoded]
    eos_ids = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    continuations, seconds = compare_generations(model, encoded, plans, new_tokens=new_tokens, eos_ids=eos_ids,
                                                 pad_token_id=pad, batch_size=batch_size, check_model=check_model,
                                                 progress=progress)
    graded = [i for i, p in enumerate(prompts) if p.answer is not None]  # prompts with a usable reference answer
    texts = {name: [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in outs]
             for name, outs in continuations.items()}
    answers = {name: [extract_answer(t) for t in ts] for name, ts in texts.items()}
    agreements = {name: [token_agreement(ref, cand) for ref, cand in zip(continuations[FULL], outs)]
                  for name, outs in continuations.items() if name != FULL}

    summary: dict[str, dict[str, Any]] = {}
    for name, outs in continuations.items():
        entry: dict[str, Any] = {}
        if name != FULL:
            entry.update(summarize(agreements[name]))
            entry["answer_agreement"], entry["answer_compared_prompts"] = answer_agreement(answers[name], answers[FULL])
        else:
            entry["prompts"] = len(prompts)
            entry["mean_length"] = sum(map(len, outs)) / len(outs)
        entry["stopped_at_eos"] = sum(bool(o) and o[-1] in eos_ids for o in outs) / len(outs)
        entry["answers_found"] = sum(a is not None for a in answers[name]) / len(prompts)
        if graded:
            entry["graded_prompts"] = len(graded)
            entry["accuracy"] = sum(answers_agree(answers[name][i], prompts[i].answer) for i in graded) / len(graded)
        entry["seconds"] = seconds[name]
        entry["generated_tokens"] = sum(map(len, outs))
        summary[name] = entry

    per_prompt = []
    for i, prompt in enumerate(prompts):
        record: dict[str, Any] = {"index": i, "prompt": prompt.text, "prompt_tokens": len(encoded[i])}
        if prompt.answer is not None:
            record["reference_answer"] = prompt.answer
        for name in continuations:
            output = {"text": texts[name][i], "tokens": continuations[name][i], "answer": answers[name][i]}
            if prompt.answer is not None:
                output["correct"] = answers_agree(answers[name][i], prompt.answer)
            if name != FULL:
                output.update(agreements[name][i].to_json())
                output["answer_agrees"] = answers[name][i] == answers[FULL][i] if answers[FULL][i] is not None else None
            record[name] = output
        per_prompt.append(record)

    return {
        "kind": "generation-agreement",
        "settings": {
            "prompts": source,
            "count": len(prompts),
            "new_tokens": new_tokens,
            "batch_size": batch_size,
            "chat_template": bool(chat and getattr(tokenizer, "chat_template", None)),
            "decoding": "greedy (argmax), KV cache, left padding; output ends at the first EOS (kept)",
            "eos_token_ids": list(eos_ids),
            "pad_token_id": pad,
            **({"truncated_prompts": truncated} if truncate else {}),
        },
        "plans": {name: (plan.to_json() if plan is not None else None) for name, plan in plans.items()},
        "summary": summary,
        "per_prompt": per_prompt,
    }


# Prompts and answers live in skiplm.models.data, greedy generation in skiplm.models.generation, the agreement tables
# and files in skiplm.report.files; these names stay importable from here for the callers that still do.
__all__ = [
    "FULL", "TokenAgreement", "answer_agreement", "answers_agree", "compare_generations", "measure_agreement",
    "summarize", "token_agreement",
    # from skiplm.models.data
    "Prompt", "encode_prompts", "extract_answer", "gsm8k_prompts", "load_prompts", "normalize_number",
    "read_prompt_file", "reference_answer",
    # from skiplm.models.generation
    "eos_token_ids", "greedy_continuations", "greedy_decode", "left_pad", "truncate_at_eos",
    # from skiplm.report.files (as agreement_rows)
    "summary_rows",
]
