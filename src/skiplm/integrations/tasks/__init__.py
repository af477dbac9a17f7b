"""Offline lm-evaluation-harness tasks built from data shipped with installed packages: ``skiplm_gsm8k`` (generative,
exact match of the final number) and ``skiplm_gpqa_diamond`` (four-way multiple choice); the tag ``skiplm_offline``
runs both. ``skiplm lm-eval`` finds them by itself; the plain harness with ``--include_path`` and :data:`TASKS_DIR`
(``skiplm lm-eval --print-include-path`` prints it).

:data:`TASKS` says, per task, which of the harness's metrics is *the* accuracy that skiplm reports (the scoreboard's
column): GSM8K's ``exact_match`` under the ``strict-match`` filter (the number after ``####``, the answer format the
few-shot examples teach) and GPQA's ``acc``. The harness's other metrics are kept beside it.

Importing this module does not import the harness (the sweep checks task names before anything heavy loads).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

TASKS_DIR = Path(__file__).parent  # the harness's --include_path for these tasks
TAG = "skiplm_offline"  # the harness tag that runs every offline task
PRINT_INCLUDE_PATH = "--print-include-path"  # `skiplm lm-eval`'s own option: print TASKS_DIR and exit


@dataclasses.dataclass(frozen=True)
class OfflineTask:
    """One offline task: its harness name, what tables call it (in full, and in a narrow column), the harness metric
    reported as its accuracy, how it is scored (in words), and whether it generates text (so a limit on generated
    tokens applies to it)."""

    name: str
    label: str
    short: str
    metric: str
    how: str
    generative: bool
    records: str  # the function of :mod:`.utils` that builds its data

    @property
    def stderr_metric(self) -> str:
        """The harness's key of the metric's standard error: ``acc,none`` -> ``acc_stderr,none``."""
        metric, _, filter_name = self.metric.partition(",")
        return f"{metric}_stderr,{filter_name}"

    def fingerprint(self) -> str:
        """A hash of what the task scores and how: its task file and the records its data is built from."""
        from . import utils

        digest = hashlib.sha256((TASKS_DIR / f"{self.name}.yaml").read_bytes())
        digest.update(json.dumps(getattr(utils, self.records)(), sort_keys=True).encode())
        return digest.hexdigest()[:16]


TASKS = (
    OfflineTask("skiplm_gsm8k", "GSM8K exact match", "GSM8K", "exact_match,strict-match",
                "exact match of the number after '####' (strict match), greedy", True, "gsm8k_records"),
    OfflineTask("skiplm_gpqa_diamond", "GPQA accuracy", "GPQA", "acc,none",
                "four-way multiple choice by the log-likelihood of each answer letter", False, "gpqa_records"),
)
OFFLINE_TASKS = tuple(task.name for task in TASKS)


def offline_task(name: str) -> OfflineTask:
    """The offline task called ``name``; anything else (the tag included: one task at a time) is refused with a
    :class:`~skiplm.errors.DataError` that lists the offline tasks."""
    for task in TASKS:
        if task.name == name:
            return task
    if name == TAG:
        from ...errors import DataError

        raise DataError(f"{TAG} is the tag of all the offline tasks; name one of them: {', '.join(OFFLINE_TASKS)}.")
    raise _unknown([name])


def resolve_tasks(names: Iterable[str]) -> tuple[str, ...]:
    """Offline task names, in the order given, with the tag :data:`TAG` expanded and repeats dropped. An unknown
    name is refused with a :class:`~skiplm.errors.DataError` that lists the offline tasks."""
    resolved: list[str] = []
    unknown = []
    for name in (str(n).strip() for n in names):
        if not name:
            continue
        if name == TAG:
            resolved += OFFLINE_TASKS
        elif name in OFFLINE_TASKS:
            resolved.append(name)
        else:
            unknown.append(name)
    if unknown:
        raise _unknown(unknown)
    return tuple(dict.fromkeys(resolved))


def _unknown(names: list[str]) -> Exception:
    from ...errors import DataError

    listed = ", ".join(f"{task.name} ({task.label})" for task in TASKS)
    return DataError(f"unknown task(s) {', '.join(names)}: the offline tasks are {listed}, and {TAG} for all of "
                     "them. Other harness tasks download their data; run them with `skiplm lm-eval`.")


def print_include_path(args: Iterable[str]) -> bool:
    """If ``args`` (a ``skiplm lm-eval`` command line) asks for :data:`PRINT_INCLUDE_PATH`, print :data:`TASKS_DIR`
    and return True (anything else beside it is refused); otherwise False. Needs no harness import, so it is quick."""
    args = list(args)
    if PRINT_INCLUDE_PATH not in args:
        return False
    if args != [PRINT_INCLUDE_PATH]:
        raise SystemExit(f"{PRINT_INCLUDE_PATH} takes no other arguments: it prints the folder of skiplm's offline "
                         "tasks, for the plain harness's --include_path, and exits.")
    print(TASKS_DIR)
    return True


__all__ = ["OFFLINE_TASKS", "PRINT_INCLUDE_PATH", "TAG", "TASKS", "TASKS_DIR", "OfflineTask", "offline_task",
           "print_include_path", "resolve_tasks"]
