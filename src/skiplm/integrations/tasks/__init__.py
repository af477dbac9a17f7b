"""Offline lm-evaluation-harness tasks built from data shipped with installed packages: ``skiplm_gsm8k`` (generative,
exact match of the final number) and ``skiplm_gpqa_diamond`` (four-way multiple choice); the tag ``skiplm_offline``
runs both. ``skiplm lm-eval`` finds them by itself; the plain harness with ``--include_path`` and :data:`TASKS_DIR`.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent  # the harness's --include_path for these tasks
OFFLINE_TASKS = ("skiplm_gsm8k", "skiplm_gpqa_diamond")

__all__ = ["OFFLINE_TASKS", "TASKS_DIR"]
