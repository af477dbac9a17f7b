"""What a sweep measures at each point: held-out perplexity, generation agreement with the full model, speed paired
with the full model and, optionally, accuracy on skiplm's offline lm-evaluation-harness tasks — each for a skipper (a
plan or a policy) or, given None, the full model itself."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..measure.agreement import (Prompt, answer_agreement, answers_agree, extract_answer, greedy_continuations,
                                 summarize, token_agreement)
from ..measure.costs import CostModel
from ..measure.perplexity import compare_perplexity
from ..measure.speed import BenchSettings, Config, run_bench
from ..skipper import Skipper, apply, fixed_plan


def ideal_speedups(model: nn.Module, skipper: Skipper) -> tuple[float, float] | None:
    """(decode, prefill) ideal speedups by the parameter-count cost model, for a skipper whose skips are fixed in
    advance (a :class:`~skiplm.plan.SkipPlan`, a healed plan); None for one that decides per input (a policy): its
    ideal speedup is what it skipped while it was timed."""
    plan = fixed_plan(skipper)
    if plan is None:
        return None
    costs = CostModel.from_parameter_counts(model)
    return costs.ideal_speedup(plan.decode), costs.ideal_speedup(plan.prefill)


def healed_target(model: nn.Module, healed: Skipper) -> float:
    """The target a healed point is placed at beside the planned ones: the speedup its plan was made for (its
    provenance's ``target``), else its ideal decode speedup by the cost model."""
    plan = fixed_plan(healed)
    target = plan.provenance.get("target")
    if isinstance(target, dict) and isinstance(target.get("speedup"), (int, float)):
        return float(target["speedup"])
    return ideal_speedups(model, plan)[0]


def measure_perplexity(model: nn.Module, plan: Skipper | None, ids: torch.Tensor, *, context: int, stride: int,
                       progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Held-out perplexity under ``plan`` (None: the full model), its decode skip set applied to every token."""
    return compare_perplexity(model, ids, {"point": plan}, context=context, stride=stride,
                              progress=progress)["point"].to_json()


def generate(model: nn.Module, plan: Skipper | None, prompts: "AgreementInputs",
             progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """Greedy continuations of the prompts under ``plan`` (None: the full model), in input order. Prompts are
    batched by length, the same batches for every configuration (so padding is the same as the reference's)."""
    ordered = [prompts.encoded[i] for i in prompts.order]
    kwargs = dict(new_tokens=prompts.new_tokens, eos_ids=prompts.eos_ids, pad_token_id=prompts.pad_token_id,
                  batch_size=prompts.batch_size, progress=progress)
    if plan is None:
        out_sorted = greedy_continuations(model, ordered, **kwargs)
    else:
        with apply(model, plan, check_model=False):
            out_sorted = greedy_continuations(model, ordered, **kwargs)
    outputs: list[list[int]] = [[] for _ in prompts.encoded]
    for position, index in enumerate(prompts.order):
        outputs[index] = out_sorted[position]
    return outputs


def agreement_summary(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]],
                      prompts: "AgreementInputs", tokenizer) -> dict[str, Any]:
    """How ``candidate`` outputs agree with the full model's ``reference`` (see :mod:`skiplm.measure.agreement`)."""
    agreements = [token_agreement(ref, cand) for ref, cand in zip(reference, candidate)]
    summary: dict[str, Any] = summarize(agreements)
    def answers_of(outputs: Sequence[Sequence[int]]) -> list[str | None]:
        return [extract_answer(tokenizer.decode(list(o), skip_special_tokens=True)) for o in outputs]

    reference_answers, answers = answers_of(reference), answers_of(candidate)
    summary["answer_agreement"], summary["answer_compared_prompts"] = answer_agreement(answers, reference_answers)
    summary["stopped_at_eos"] = sum(bool(o) and o[-1] in prompts.eos_ids for o in candidate) / len(candidate)
    graded = [i for i, p in enumerate(prompts.prompts) if p.answer is not None]
    if graded:
        summary["graded_prompts"] = len(graded)
        summary["accuracy"] = sum(answers_agree(answers[i], prompts.prompts[i].answer) for i in graded) / len(graded)
    summary["per_prompt"] = [
        {"first_divergence": a.first_divergence, "length": a.candidate_length, "answer": answer}
        for a, answer in zip(agreements, answers)
    ]
    return summary


def measure_speed(model: nn.Module, plan: Skipper | None, corpus_ids: torch.Tensor, settings: BenchSettings,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Prefill and decode timing of ``plan`` (None: the full model again, an A/A measurement) paired with the full
    model in one :func:`~skiplm.measure.speed.run_bench` call. Returns run_bench's result, configurations ``full`` and
    ``plan``."""
    candidate = Config("plan", model)
    if plan is not None:
        ideal = ideal_speedups(model, plan)  # None: run_bench fills it in from what the skipper skipped while timed
        candidate = Config("plan", model, plan) if ideal is None else Config("plan", model, plan, *ideal)
    return run_bench([Config("full", model), candidate], corpus_ids, settings, progress)


def measure_task(model: nn.Module, tokenizer, plan: Skipper | None, task: str, *, limit: int, batch_size: int,
                 max_tokens: int | None, task_manager: Any) -> dict[str, Any]:
    """Accuracy on the offline harness task ``task`` under ``plan`` (None: the full model), its first ``limit``
    examples, on the loaded model (:func:`skiplm.integrations.lm_eval.score_task`; its progress bars and its logs
    below errors off, the sweep draws its own)."""
    from ..integrations.lm_eval import score_task

    return score_task(model, tokenizer, plan, task, limit=limit, batch_size=batch_size, max_tokens=max_tokens,
                      task_manager=task_manager, check_model=False, quiet=True)


@dataclasses.dataclass
class AgreementInputs:
    prompts: list[Prompt]
    encoded: list[list[int]]
    order: list[int]  # prompt indices sorted by length: the batching order
    eos_ids: list[int]
    pad_token_id: int
    new_tokens: int
    batch_size: int

    @property
    def batches(self) -> int:
        return math.ceil(len(self.encoded) / self.batch_size)

