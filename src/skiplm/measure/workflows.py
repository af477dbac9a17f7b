"""Measure and write: the workflows behind ``skiplm eval``, ``bench``, ``agree`` and ``demo`` (its result files; the
demo itself is :func:`skiplm.demo.run_demo`), for Python users too.

Each takes a loaded model and its tokenizer, the skippers to measure by name, and an output folder; measures them
against the full model (:mod:`~skiplm.measure.perplexity`, :mod:`~skiplm.measure.speed`,
:mod:`~skiplm.measure.agreement`); writes the JSON result (with the machine and the command that ran it), its markdown
tables (:mod:`skiplm.report.files`) and plots (:mod:`skiplm.report.plots`); and returns the result.

``progress(description, done, total)`` is called as the work goes, ``total`` the steps of the current stage.

Rows are keyed by name, and the full model's (:data:`~skiplm.measure.rows.FULL`) is always there and reserved: a plan
given under that name is refused, never reported as the baseline (name plan files with
:func:`~skiplm.measure.rows.plan_names`). The output folder is checked before any measuring
(:func:`skiplm.files.check_output`), and every file is written whole or not at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import DataError
from ..files import check_output
from ..models.data import Prompt, corpus_label, encode_prompts, gsm8k_prompts, load_corpus
from ..report.files import (demo_markdown, machine_info, perplexity_markdown, speed_markdown, write_agreement,
                            write_json, write_text)
from ..report.plots.speed import plot_speedups
from ..skipper import Skipper
from .agreement import measure_agreement
from .perplexity import compare_perplexity, tokenize_corpus
from .rows import FULL, check_row_names
from .speed import BenchSettings, make_configs, run_bench, total_work

Progress = Callable[[str, int, int], None]  # (what runs now, steps done, steps in this stage)


def _provenance(command: str | None, model_name: str, device: str) -> dict[str, Any]:
    return {"command": command, "model": model_name, "machine": machine_info(device)}


def evaluate_and_report(model: nn.Module, tokenizer, plans: Mapping[str, Skipper | None], corpora: Sequence[str],
                        tokens: int, context: int, stride: int, out: Path, model_name: str, device: str, *,
                        command: str | None = None, progress: Progress | None = None,
                        check_model: bool = True) -> dict[str, Any]:
    """Perplexity of the full model and each of ``plans`` on the first ``tokens`` tokens of each corpus (a name or
    a text file), in windows of ``context`` advancing by ``stride``; writes ``eval.json`` and ``eval.md``. The full
    model is always measured, as the first row (``plans`` may list it as ``"full": None``). ``check_model=False``:
    plans made for other weights too (the CLI checked them, unless --force)."""
    plans = _with_full_model(plans)
    out = check_output(out, kind="folder", what="eval output folder")
    texts = {corpus_label(c): tokenize_corpus(tokenizer, load_corpus(c), tokens) for c in corpora}
    total, done = sum((ids.numel() - 1) * len(plans) for ids in texts.values()), 0
    per_corpus = {}
    for label, ids in texts.items():
        def advance(n: int, label: str = label) -> None:
            nonlocal done
            done += n
            if progress:
                progress(f"perplexity on {label}", done, total)

        advance(0)
        per_corpus[label] = compare_perplexity(model, ids, plans, context=context, stride=stride, progress=advance,
                                               check_model=check_model)
    result = {
        "kind": "perplexity",
        **_provenance(command, model_name, device),
        "settings": {"tokens": tokens, "context": context, "stride": stride, "corpora": list(texts)},
        "plans": {name: (p.to_json() if p else None) for name, p in plans.items()},
        "perplexity": {c: {n: r.to_json() for n, r in rs.items()} for c, rs in per_corpus.items()},
    }
    write_json(out / "eval.json", result)
    write_text(out / "eval.md", perplexity_markdown(result, model_name))
    return result


def bench_and_report(model: nn.Module, tokenizer, plans: Mapping[str, Skipper], settings: BenchSettings,
                     compare_pruned: bool, out: Path, model_name: str, device: str, *, command: str | None = None,
                     progress: Progress | None = None, check_model: bool = True) -> dict[str, Any]:
    """Prefill latency and decode throughput of the full model and each of ``plans`` (and, with ``compare_pruned``,
    a copy with a block plan's layers deleted), interleaved; writes ``bench.json``, ``bench.md`` and ``bench.png``.
    ``check_model=False``: plans made for other weights too."""
    check_row_names(plans)
    out = check_output(out, kind="folder", what="bench output folder")
    corpus_ids = tokenize_corpus(tokenizer, load_corpus("gsm8k"),
                                 8 * max(settings.prompt_tokens, settings.decode_prompt_tokens))
    configs = make_configs(model, plans, compare_pruned=compare_pruned, check_model=check_model)
    chat_prompts = None
    if settings.decode_prompts == "gsm8k-chat":
        chat_prompts = encode_prompts(tokenizer, gsm8k_prompts(200), chat=True)
    total, done = total_work(configs, settings), 0

    def step(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(f"bench {what}", done, total)

    speed = run_bench(configs, corpus_ids, settings, progress=step, chat_prompts=chat_prompts)
    result = {
        "kind": "speed",
        **_provenance(command, model_name, device),
        "settings": dataclasses.asdict(settings),
        "plans": {name: p.to_json() for name, p in plans.items()},
        "speed": speed,
    }
    write_json(out / "bench.json", result)
    write_text(out / "bench.md", speed_markdown(result, model_name))
    if len(configs) > 1:
        plot_speedups(speed, result["settings"], out / "bench.png", f"{model_name}: measured vs ideal speedup")
    return result


def agree_and_report(model: nn.Module, tokenizer, prompts: Sequence[Prompt], plans: Mapping[str, Skipper], *,
                     new_tokens: int, batch_size: int, chat: bool, source: str, out: Path, model_name: str,
                     device: str, command: str | None = None,
                     progress: Progress | None = None) -> tuple[dict[str, Any], dict[str, Path]]:
    """Greedy generation agreement of each of ``plans`` with the full model on ``prompts`` (from ``source``: a prompt
    set's name or a file); writes ``agreement.json`` and ``agreement.md``. Returns the result and the paths."""
    if FULL in plans:
        raise DataError(f"a plan may not be named {FULL!r}: that name is the full model's.")
    out = check_output(out, kind="folder", what="agreement output folder")
    total, done = len(prompts) * (1 + len(plans)), 0

    def advance(name: str, rows: int) -> None:
        nonlocal done
        done += rows
        if progress:
            progress(f"generating ({name})", done, total)

    result = measure_agreement(model, tokenizer, prompts, plans, new_tokens=new_tokens, batch_size=batch_size,
                               chat=chat, source=source, check_model=False, progress=advance)
    result = {"kind": result.pop("kind"), **_provenance(command, model_name, device), **result}
    return result, write_agreement(result, Path(out), model_name)


def _with_full_model(plans: Mapping[str, Skipper | None]) -> dict[str, Skipper | None]:
    """``plans`` after the full model's row (``None``, under :data:`FULL`); any other ``None`` or a plan named
    :data:`FULL` is refused: it would be a second baseline, or a plan reported as the baseline."""
    if plans.get(FULL, None) is not None:
        check_row_names([FULL])  # raises: a plan took the full model's name
    others = {name: plan for name, plan in plans.items() if name != FULL}
    check_row_names(others)
    unnamed = [name for name, plan in others.items() if plan is None]
    if unnamed:
        raise DataError(f"{', '.join(map(repr, unnamed))}: None stands for the full model, which is always measured "
                        f"as {FULL!r}; give a plan or drop the entry.")
    return {FULL: None, **others}


def write_demo_summary(out: Path, result: Mapping[str, Any]) -> dict[str, Path]:
    """The demo's result (:func:`skiplm.demo.run_demo`: the headline rows, the speculative check, the healing, the
    timings, what to try next) as ``demo.json`` (which ``skiplm report`` renders) and ``summary.md``."""
    out = Path(out)
    return {"json": write_json(out / "demo.json", dict(result)), "markdown": write_text(out / "summary.md",
                                                                                      demo_markdown(result))}
