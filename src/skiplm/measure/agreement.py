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
import decimal
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DataError
from ..plan import SkipPlan
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


# -- numeric answers ---------------------------------------------------------------------------------------------------
# An optional minus sign (not a hyphen between two numbers), digits with optional thousands separators, a decimal part.
_NUMBER = re.compile(r"(?:(?<![\d\w])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def normalize_number(text: str) -> str | None:
    """A canonical spelling of a number: commas removed, ``18.00`` -> ``18``, ``0.50`` -> ``0.5``; None if not one."""
    try:
        value = decimal.Decimal(text.replace(",", "").strip())
    except decimal.InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The last number in a model's output, normalized (see :func:`normalize_number`); None if it has no number."""
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


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


def reference_answer(solution: str) -> str | None:
    """The final answer of a reference solution: the number after its last ``####`` (GSM8K), else its last number."""
    if "####" in solution:
        tail = solution.rsplit("####", 1)[1]
        numbers = _NUMBER.findall(tail)
        return normalize_number(numbers[0]) if numbers else None
    return extract_answer(solution)


# -- prompts ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Prompt:
    """A user message, and optionally the reference solution its answer is checked against."""

    text: str
    reference: str | None = None

    @property
    def answer(self) -> str | None:
        return reference_answer(self.reference) if self.reference is not None else None


def gsm8k_prompts(limit: int | None = None) -> list[Prompt]:
    """GSM8K test questions (in file order) with their reference solutions."""
    from ..models.data import gsm8k_records

    return [Prompt(r["question"], r["answer"]) for r in gsm8k_records()[:limit]]


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """Prompts from a file: JSON Lines (``.jsonl``, or a first line that is a JSON object) with a ``"prompt"`` field
    and an optional ``"answer"`` (a reference solution or number), otherwise one prompt per line. Blank lines are
    skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist; pass `gsm8k` or a file with one prompt per line.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"prompt file {path} is not UTF-8 text.") from None
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise DataError(f"prompt file {path} is empty: write one prompt per line, or JSON Lines with a \"prompt\" field.")
    if path.suffix.lower() != ".jsonl" and not numbered[0][1].lstrip().startswith("{"):
        return [Prompt(line.strip()) for _, line in numbered]
    prompts = []
    for number, line in numbered:
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where} is not valid JSON ({exc.msg}); each line of a JSON Lines prompt file must be an "
                            "object such as {\"prompt\": \"...\"}.") from None
        if not isinstance(record, dict) or "prompt" not in record:
            raise DataError(f"{where} has no \"prompt\" field; each line must be an object such as {{\"prompt\": \"...\"}}.")
        text, answer = record["prompt"], record.get("answer")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: \"prompt\" must be a non-empty string, got {text!r}.")
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise DataError(f"{where}: \"answer\" must be a string or a number, got {answer!r}.")
        prompts.append(Prompt(text, None if answer is None else str(answer)))
    return prompts


def load_prompts(source: str, limit: int | None = None) -> list[Prompt]:
    """``"gsm8k"`` (the shipped GSM8K test split) or a prompt file (see :func:`read_prompt_file`); the first ``limit``."""
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1, got {limit}.")
    prompts = gsm8k_prompts(limit) if source == "gsm8k" else read_prompt_file(source)[:limit]
    for i, prompt in enumerate(prompts):
        if not prompt.text.strip():
            raise DataError(f"prompt {i} of {source} is empty.")
    return prompts


def encode_prompts(tokenizer, prompts: Sequence[Prompt], *, chat: bool = True) -> list[list[int]]:
    """Token ids of each prompt: wrapped as a user message in the tokenizer's chat template (with the assistant turn
    opened) when ``chat`` and the tokenizer has one, else the raw text with the tokenizer's usual special tokens."""
    if not prompts:
        raise DataError("there are no prompts.")
    encoded = []
    for prompt in prompts:
        if not prompt.text.strip():
            raise DataError("a prompt is empty.")
        if chat and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}], add_generation_prompt=True,
                                                 tokenize=False)
            ids = tokenizer(text, add_special_tokens=False).input_ids
        else:
            ids = tokenizer(prompt.text).input_ids
        if not ids:
            raise DataError(f"prompt {prompt.text!r} encodes to no tokens.")
        encoded.append(list(ids))
    return encoded


# -- greedy generation -------------------------------------------------------------------------------------------------
def eos_token_ids(model: nn.Module, tokenizer=None) -> list[int]:
    """The ids that end a generation: the model's generation config's, else the tokenizer's end-of-sequence token."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None and tokenizer is not None:
        configured = tokenizer.eos_token_id
    if configured is None:
        raise DataError("the model has no end-of-sequence token id (generation_config.eos_token_id); set one.")
    return [int(i) for i in (configured if isinstance(configured, (list, tuple)) else [configured])]


def truncate_at_eos(tokens: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """``tokens`` up to and including the first end-of-sequence token."""
    out = []
    for token in tokens:
        out.append(int(token))
        if token in eos_ids:
            break
    return out


@torch.inference_mode()
def greedy_continuations(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    new_tokens: int,
    eos_ids: Sequence[int],
    pad_token_id: int,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Greedy continuations of token-id prompts (the model as it is: apply a plan around this call), each at most
    ``new_tokens`` long and ending at its first end-of-sequence token. Prompts are batched in the order given, left
    padded with ``pad_token_id``; ``progress(rows)`` is called after each batch."""
    if new_tokens < 1:
        raise DataError(f"new_tokens must be at least 1, got {new_tokens}.")
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}.")
    if any(len(p) == 0 for p in prompts):
        raise DataError("a prompt has no tokens.")
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        outputs.extend(_greedy_batch(model, batch, new_tokens, eos_ids, pad_token_id))
        if progress:
            progress(len(batch))
    return outputs


def _greedy_batch(model: nn.Module, batch: Sequence[Sequence[int]], new_tokens: int, eos_ids: Sequence[int],
                  pad_token_id: int) -> list[list[int]]:
    """Plain greedy decoding of one left-padded batch: argmax of the logits, nothing else (no sampling, penalties or
    other logits processing a checkpoint's generation_config might ask for), with the KV cache."""
    device = next(model.parameters()).device
    ids, mask = left_pad(batch, pad_token_id)
    return greedy_decode(model, ids.to(device), mask.to(device), new_tokens, eos_ids, pad_token_id)


def left_pad(batch: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as one left-padded [rows, width] batch and its attention mask (1 = token): every row's last
    prompt token is at position -1."""
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, prompt in enumerate(batch):
        ids[row, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


@torch.inference_mode()
def greedy_decode(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, eos_ids: Sequence[int],
                  pad_token_id: int) -> list[list[int]]:
    """Plain greedy decoding of left-padded ``ids`` [batch, width] with ``mask`` (1 = token), on the model's device:
    argmax of the logits, nothing else, with the KV cache; each row ends at its first end-of-sequence token (kept)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [batch, width]: a row's first real token is at position 0
    eos = torch.as_tensor(list(eos_ids), dtype=torch.long, device=ids.device)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    # logits_to_keep=1: only the last position's logits are needed ([batch, 1, vocab], not [batch, width, vocab])
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    steps = []
    for step in range(new_tokens):
        token = out.logits[:, -1].argmax(-1)  # [batch]
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        steps.append(token)
        finished |= torch.isin(token, eos)
        if step == new_tokens - 1 or bool(finished.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # [batch, width + step + 1]
        positions = positions[:, -1:] + 1  # [batch, 1]
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, cache=out.cache,
                    use_cache=True)
    generated = torch.stack(steps, dim=1).tolist()  # [batch, <= new_tokens]; rows that finished early are padded
    return [truncate_at_eos(row, eos_ids) for row in generated]


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
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Generate with the full model and each plan on ``prompts`` and compare (see the module docstring). Returns a
    JSON-ready dict: settings, per-configuration summaries, and per-prompt outputs and metrics."""
    encoded = encode_prompts(tokenizer, prompts, chat=chat)
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
        },
        "plans": {name: (plan.to_json() if plan is not None else None) for name, plan in plans.items()},
        "summary": summary,
        "per_prompt": per_prompt,
    }


# -- reporting ---------------------------------------------------------------------------------------------------------
def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def summary_rows(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per configuration: agreement with the full model, and accuracy where there are reference answers."""
    has_answers = any("accuracy" in s for s in result["summary"].values())
    headers = ["config", "prefix agreement", "prefix (pooled)", "positional match", "exact match",
               "mean matched prefix", "mean length", "stopped at EOS"]
    headers.append("answer agreement")
    if has_answers:
        headers.append("accuracy")
    rows = []
    for name, s in result["summary"].items():
        full = name == FULL
        row = [name] + (["(reference)"] * 5 if full else [
            _percent(s["prefix_agreement"]), _percent(s["prefix_agreement_pooled"]), _percent(s["positional_match"]),
            _percent(s["exact_match"]), f"{s['mean_matched_prefix']:.1f}"])
        row += [f"{s['mean_length'] if full else s['mean_candidate_length']:.1f}", _percent(s["stopped_at_eos"])]
        row += ["(reference)" if full else _percent(s["answer_agreement"])]
        if has_answers:
            row.append(_percent(s.get("accuracy")))
        rows.append(row)
    return headers, rows


def write_agreement(result: Mapping[str, Any], out: Path, model_name: str) -> dict[str, Path]:
    """``agreement.json`` (everything, incl. every output's tokens and text) and ``agreement.md`` (tables)."""
    from ..report.files import markdown_table, write_json

    out = Path(out)
    json_path = write_json(out / "agreement.json", dict(result))
    s = result["settings"]
    headers, rows = summary_rows(result)
    plan_names = [name for name in result["summary"] if name != FULL]
    has_answers = any("reference_answer" in r for r in result["per_prompt"])
    prompt_headers = ["#", "prompt tokens", "full length"]
    for name in plan_names:
        prompt_headers += [f"{name}: first divergence", f"{name}: prefix agreement", f"{name}: exact"]
    prompt_headers += (["reference"] if has_answers else []) + ["full answer"] + [f"{name} answer" for name in plan_names]
    prompt_rows = []
    for record in result["per_prompt"]:
        row = [record["index"], record["prompt_tokens"], len(record[FULL]["tokens"])]
        for name in plan_names:
            o = record[name]
            row += ["—" if o["first_divergence"] is None else o["first_divergence"], _percent(o["prefix_agreement"]),
                    "yes" if o["exact_match"] else "no"]
        if has_answers:
            row.append(record.get("reference_answer", "—"))
        row += [_answer_cell(record[name]) for name in [FULL, *plan_names]]
        prompt_rows.append(row)
    plans = "".join(f"- `{name}`: {p['description']}\n" for name, p in result["plans"].items() if p) or "- none\n"
    text = (
        f"# Generation agreement, {model_name}\n\n"
        f"{s['count']} prompts from {s['prompts']}{' (chat template)' if s['chat_template'] else ''}; up to "
        f"{s['new_tokens']} new tokens, {s['decoding']}; batch size {s['batch_size']}. Agreement is measured against "
        "the full model's output on the same batches. Prefix agreement: share of the full model's tokens reproduced "
        "before the first divergence (mean over prompts; pooled: over all tokens). Positional match: share of positions "
        "with the same token. Answers: the last number in each output; answer agreement: the plan's is the same "
        "number as the full model's, over the prompts where the full model's output has one; accuracy: the same number as the reference's final answer.\n\n"
        f"Plans:\n{plans}\n" + markdown_table(headers, rows) + "\n## Per prompt\n\n"
        + markdown_table(prompt_headers, prompt_rows)
        + "\nEvery output's text and tokens are in agreement.json.\n"
    )
    md_path = out / "agreement.md"
    md_path.write_text(text)
    return {"json": json_path, "markdown": md_path}


def _answer_cell(output: Mapping[str, Any]) -> str:
    answer = output["answer"] if output["answer"] is not None else "none"
    if "correct" in output:
        return f"{answer} {'✓' if output['correct'] else '✗'}"
    return answer
