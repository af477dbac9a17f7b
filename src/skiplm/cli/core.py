"""The ``skiplm`` command line: a thin shell over the library (analyze, plan, eval, bench, generate, agree, compare,
export, demo, info, lm-eval)."""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..errors import SkipLMError
from ..speculative.decoder import DEFAULT_MAX_DRAFT

console = Console(stderr=True)
MODEL_ARGUMENT = click.argument("model", default="smollm2-135m", required=False)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False,
    )


def _load(model: str, dtype: str, device: str):
    from ..models.loading import load_model

    with console.status(f"loading {model} ({dtype}, {device})"):
        return load_model(model, dtype=dtype, device=device)


def _model_options(function):
    function = click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda")(function)
    function = click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16")(function)
    return function


def _load_plan(path: str | None, model, force: bool):
    """A plan file or a policy file (`skiplm policy`), checked against ``model`` unless ``force``."""
    from ..skipper import load_skipper

    if path is None:
        return None
    plan = load_skipper(path)
    if not force:
        plan.check_model(model)
    return plan


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="skiplm")
def cli():
    """Skip layers of Hugging Face decoder-only LLMs, and measure what each skip costs.

    MODEL is the shipped default `smollm2-135m`, a local model folder, a local .gguf file, or a hub id (needs a
    network).
    """
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import transformers

    from ..system import keep_freed_memory

    keep_freed_memory()

    transformers.utils.logging.disable_progress_bar()  # our own progress bars only


@cli.command()
@MODEL_ARGUMENT
@click.option("--method", default="uniform", show_default=True,
              help="planning method: uniform, block-influence, angular, similarity, greedy-loss")
@click.option("--speedup", type=float, help="target ideal speedup, e.g. 1.25")
@click.option("--skip", type=int, help="number of units to skip: blocks, or sublayers for --unit attention/mlp/joint")
@click.option("--unit", help="similarity: attention, mlp, block or joint (attention and MLP ranked together)  "
                             "[default: block]")
@click.option("--latency-ms", type=float, help="search: target decode step time on this device (ms)")
@click.option("--max-kl", type=float, help="search: quality budget, the largest mean KL to the full model allowed")
@click.option("--iterative", is_flag=True, help="similarity: re-score the remaining units after each drop")
@click.option("--corpus", help="calibration text of data-driven methods: gsm8k, pydoc, or a text file  [default: gsm8k]")
@click.option("--sequences", type=int, help="calibration sequences  [default: per method; 8, greedy-loss 4]")
@click.option("--length", type=int, help="tokens per calibration sequence  [default: per method; 256, greedy-loss 128]")
@click.option("--prefill", type=click.Choice(["same", "full"]), default="same", show_default=True,
              help="prefill skips the same layers, or runs at full depth")
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True, help="plan file to write (JSON)")
@_model_options
def plan(model, method, speedup, skip, latency_ms, max_kl, unit, iterative, corpus, sequences, length, prefill, out,
         dtype, device):
    """Make a skip plan for MODEL and save it."""
    import inspect

    from ..measure.costs import CostModel
    from ..errors import PlanError
    from ..planners import get_planner, load_calibration
    from ..planners.common import DEFAULT_CORPUS, Target

    planner = get_planner(method)
    accepted = inspect.signature(planner).parameters
    if latency_ms is None and max_kl is None:
        Target.of(speedup, skip)  # a bad target fails before the model loads
    options = {"unit": unit, "iterative": iterative or None, "latency_ms": latency_ms, "max_kl": max_kl}
    for option, value in options.items():
        if value is not None and option not in accepted:
            raise PlanError(f"--{option.replace('_', '-')} does not apply to the {method!r} method.")
    kwargs = {option: value for option, value in options.items() if value is not None}
    defaults = getattr(planner, "calibration_defaults", None)
    if defaults is None and (corpus, sequences, length) != (None, None, None):
        raise PlanError(f"the {method!r} method uses no calibration text: drop --corpus / --sequences / --length.")
    hf_model, tokenizer = _load(model, dtype, device)
    if defaults is not None:
        corpus = DEFAULT_CORPUS if corpus is None else corpus
        sequences = defaults[0] if sequences is None else sequences
        length = defaults[1] if length is None else length
        kwargs["calibration"] = load_calibration(tokenizer, corpus, sequences, length)
    start = time.perf_counter()
    if defaults is not None and "progress" in accepted:  # @calibrated planners report progress(done, total)
        with _progress() as progress:
            task = progress.add_task(f"planning ({method})", total=None)
            kwargs["progress"] = lambda done, total: progress.update(task, completed=done, total=total)
            skip_plan = planner(hf_model, speedup=speedup, skip=skip, prefill=prefill, name=model, **kwargs)
    else:
        skip_plan = planner(hf_model, speedup=speedup, skip=skip, prefill=prefill, name=model, **kwargs)
    elapsed = time.perf_counter() - start
    skip_plan.save(out)
    ideal = CostModel.from_parameter_counts(hf_model).ideal_speedup(skip_plan.decode)
    calibration = kwargs.get("calibration")
    data = f" on {sequences} x {length} tokens of {calibration.source}" if calibration is not None else ""
    console.print(f"{skip_plan.describe()} — ideal decode speedup {ideal:.3f}x ({method}{data}, {elapsed:.1f} s)")
    console.print(f"wrote {out}")


@cli.command("policy")
@MODEL_ARGUMENT
@click.option("--method", required=True, type=click.Choice(["ffn-skip", "lac"]),
              help="ffn-skip (FFN-SkipLLM: MLP saturation) or lac (L2 Adaptive Computation: residual norm change)")
@click.option("--skip-ratio", type=float, help="target share of all token-MLPs skipped on the calibration text")
@click.option("--speedup", type=float,
              help="target decode speedup at batch 1; the skip ratio comes from a latency model measured now")
@click.option("--parts", type=click.Choice(["layer", "mlp"]), default="layer", show_default=True,
              help="lac: what a halted token skips (layer: attention contribution and MLP)")
@click.option("--window", type=click.IntRange(min=1), default=2, show_default=True,
              help="ffn-skip: consecutive saturated layers before a token halts")
@click.option("--protect-first", type=click.IntRange(min=1),
              help="first layers that always run  [default: layers / 8, rounded up]")
@click.option("--protect-last", type=click.IntRange(min=0),
              help="last layers that always run  [default: layers / 16, rounded up]")
@click.option("--warmup", type=click.IntRange(min=0), default=4, show_default=True,
              help="the first N positions of a sequence always run every layer")
@click.option("--prefill", type=click.Choice(["same", "full"]), default="same", show_default=True,
              help="prefill uses the same threshold, or runs every layer")
@click.option("--last-check", default="auto", show_default=True,
              help="last layer whose signal may halt a token: a layer index, 'all' (every layer that can), or 'auto' "
                   "(the horizon where later halts stop paying for the checks on the calibration text)")
@click.option("--corpus", default="gsm8k", show_default=True, help="calibration text: gsm8k, pydoc, or a text file")
@click.option("--sequences", default=4, show_default=True, type=click.IntRange(min=1), help="calibration sequences")
@click.option("--length", default=256, show_default=True, type=click.IntRange(min=2), help="tokens per sequence")
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True, help="policy file to write (JSON)")
@_model_options
def policy_command(model, method, skip_ratio, speedup, parts, window, protect_first, protect_last, warmup, prefill,
                   last_check, corpus, sequences, length, out, dtype, device):
    """Calibrate an input-adaptive skipping policy for MODEL and save it.

    The threshold is set so that the policy skips --skip-ratio of all token-MLPs on the calibration text (or the
    ratio a measured latency model says reaches --speedup). Use the file with `generate --policy`, `eval --policy`,
    `bench --policy`, `agree --policy`.
    """
    from ..errors import PlanError
    from ..measure.latency import LatencyModel
    from ..planners import load_calibration
    from ..policies.core import calibrate, skip_ratio_for_speedup

    if (skip_ratio is None) == (speedup is None):
        raise PlanError("give exactly one of --skip-ratio (e.g. 0.25) or --speedup (e.g. 1.2).")
    named = {"auto": "auto", "all": None}
    if last_check not in named and not last_check.isdigit():
        raise PlanError(f"--last-check must be a layer index, 'all' or 'auto', got {last_check!r}.")
    last_check = named[last_check] if last_check in named else int(last_check)
    settings = {"protect_first": protect_first, "protect_last": protect_last, "warmup": warmup}
    settings.update({"window": window} if method == "ffn-skip" else {"parts": parts})
    hf_model, tokenizer = _load(model, dtype, device)
    calibration = load_calibration(tokenizer, corpus, sequences, length)
    start = time.perf_counter()
    latency = None
    if speedup is not None:
        with console.status("measuring the latency of the MLP sublayers on this device"):
            latency = LatencyModel.measure(hf_model)
        skip_ratio = skip_ratio_for_speedup(latency, latency.num_layers, speedup)
    with _progress() as progress:
        task = progress.add_task(f"calibrating {method}", total=None)
        policy = calibrate(hf_model, method, calibration, skip_ratio, prefill=prefill, last_check=last_check,
                           progress=lambda done, total: progress.update(task, completed=done, total=total), **settings)
    policy.provenance.update({"corpus": calibration.source, "sequences": sequences, "length": length,
                              "model_name": model, "seconds": time.perf_counter() - start})
    if latency is not None:
        policy.provenance.update({"target_speedup": speedup, "latency": latency.to_json()})
    policy.save(out)
    console.print(f"{policy.describe()} ({time.perf_counter() - start:.1f} s)")
    console.print(f"wrote {out}")


@cli.command("cola")
@MODEL_ARGUMENT
@click.option("--limit", type=click.IntRange(min=1), default=4, show_default=True, help="GSM8K problems searched")
@click.option("--iterations", type=click.IntRange(min=1), default=300, show_default=True,
              help="MCTS iterations per problem (one forward pass per new chain)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--chat/--raw", default=True, show_default=True, help="wrap each problem in the model's chat template")
@click.option("--out", "-o", type=click.Path(file_okay=False), default="results/cola", show_default=True,
              help="output folder")
@_model_options
def cola_command(model, limit, iterations, seed, chat, out, dtype, device):
    """CoLa: per-problem search over chains of layers (skip or loop each layer) — an analysis, not a runtime.

    Each GSM8K problem is given with its worked solution; the model must state the final number. A Monte Carlo
    Tree Search over skip / once / twice per layer finds the shortest chain that still gives the answer and, where
    the full model gets it wrong, a chain that gets it right. Costs one forward pass per distinct chain visited.
    """
    from ..analysis.cola import gsm8k_final_answer_samples, search
    from ..report.files import markdown_table, write_json

    hf_model, tokenizer = _load(model, dtype, device)
    samples = gsm8k_final_answer_samples(tokenizer, limit, chat=chat)
    rows, records = [], []
    started = time.perf_counter()
    with _progress() as progress:
        task = progress.add_task("CoLa search", total=len(samples) * iterations)
        for index, sample in enumerate(samples):
            result = search(hf_model, sample.prompt_ids, sample.answer_ids, iterations=iterations, seed=seed,
                            progress=lambda done, total: progress.update(task, completed=index * iterations + done))
            records.append({"question": sample.question, "answer": sample.answer,
                            "prompt_tokens": len(sample.prompt_ids), **result.to_json()})
            shortest = result.shortest_kept
            rows.append([str(index), sample.answer, "yes" if result.full.kept else "no",
                         "-" if shortest is None else f"{len(shortest.chain)} layers",
                         "-" if shortest is None else _chain_text(shortest.chain, result.num_layers),
                         "yes" if result.fixed else "-", str(result.evaluations), f"{result.seconds:.1f} s"])
    right = [r for r in records if r["full"]["kept"]]
    wrong = [r for r in records if not r["full"]["kept"]]
    summary = {
        "problems": len(records),
        "full_model_right": len(right),
        "right_with_a_shorter_chain": sum(r["shortest_kept"] is not None and r["shortest_kept"]["layers"] < r["num_layers"]
                                          for r in right),
        "wrong_fixed_by_a_chain": sum(r["fixed"] for r in wrong),
        "mean_layers_of_shortest_chain": (sum(r["shortest_kept"]["layers"] for r in records if r["shortest_kept"])
                                          / max(1, sum(r["shortest_kept"] is not None for r in records))),
        "evaluations": sum(r["evaluations"] for r in records),
        "seconds": time.perf_counter() - started,
    }
    result = {"kind": "cola", "command": _command_line(), "model": model, "settings": {
        "limit": limit, "iterations": iterations, "seed": seed, "chat": chat}, "summary": summary, "problems": records}
    out_path = Path(out)
    write_json(out_path / "cola.json", result)
    headers = ["#", "answer", "full model right", "shortest chain keeping the answer", "chain (layer x times)",
               "fixed a wrong answer", "chains evaluated", "time"]
    (out_path / "cola.md").write_text(
        f"# CoLa chain search, {model}\n\n{iterations} MCTS iterations per problem; one forward pass per distinct "
        f"chain. Full model right on {len(right)} of {len(records)}; a shorter chain kept the answer on "
        f"{summary['right_with_a_shorter_chain']} of those; a chain fixed {summary['wrong_fixed_by_a_chain']} of "
        f"{len(wrong)} wrong answers. {summary['evaluations']} chains in {summary['seconds']:.0f} s.\n\n"
        + markdown_table(headers, rows))
    console.print(markdown_table(headers, rows))
    console.print(f"wrote {out_path / 'cola.json'}, {out_path / 'cola.md'}")


def _chain_text(chain, num_layers: int) -> str:
    """A chain as per-layer run counts, e.g. '1 1 0 2 1' (layer 2 skipped, layer 3 looped)."""
    return " ".join(str(chain.count(layer)) for layer in range(num_layers))


@cli.command("eval")
@MODEL_ARGUMENT
@click.option("--plan", "--policy", "plan_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="plan file (skiplm plan) or policy file (skiplm policy); repeat for several; the full model is "
                   "always evaluated too")
@click.option("--corpus", "corpora", multiple=True, default=("gsm8k",), show_default=True,
              help="gsm8k, pydoc, or a text file (repeatable)")
@click.option("--tokens", default=16384, show_default=True, help="tokens scored per corpus")
@click.option("--context", default=1024, show_default=True, help="window length")
@click.option("--stride", default=512, show_default=True, help="window advance")
@click.option("--out", "-o", type=click.Path(), default="results/eval", show_default=True, help="output folder")
@click.option("--force", is_flag=True, help="apply plans even if made for other weights")
@_model_options
def eval_command(model, plan_paths, corpora, tokens, context, stride, out, force, dtype, device):
    """Perplexity of the full model and of each plan, side by side."""
    hf_model, tokenizer = _load(model, dtype, device)
    plans = {"full": None} | {Path(p).stem: _load_plan(p, hf_model, force) for p in plan_paths}
    result = evaluate_and_report(hf_model, tokenizer, plans, corpora, tokens, context, stride, Path(out), model, device)
    _print_quality(result)


# -- bench --sweep: the scoreboard -----------------------------------------------------------------------------------
_SWEEP_OPTIONS = [
    click.option("--fresh", is_flag=True, help="--sweep: discard the finished points and plans in -o and start over"),
    click.option("--seed", type=int, default=0, show_default=True, help="--sweep: torch seed"),
    click.option("--length", type=click.IntRange(min=1), default=512, show_default=True,
                 help="--sweep: tokens per calibration sequence"),
    click.option("--sequences", type=click.IntRange(min=1), default=2, show_default=True,
                 help="--sweep: calibration sequences of the data-driven planners"),
    click.option("--calibration-corpus", default="gsm8k", show_default=True,
                 help="--sweep: text the data-driven planners are fitted on"),
    click.option("--chat/--raw", default=True, show_default=True,
                 help="--sweep: wrap agreement prompts in the model's chat template"),
    click.option("--agree-tokens", type=click.IntRange(min=1), default=64, show_default=True,
                 help="--sweep: greedy tokens generated per agreement prompt (--new-tokens is the timed decode steps)"),
    click.option("--limit", type=click.IntRange(min=1), default=16, show_default=True,
                 help="--sweep: agreement on the first N prompts"),
    click.option("--prompts", default="gsm8k", show_default=True,
                 help="--sweep: agreement prompts: gsm8k, or a file (one per line, or JSON Lines)"),
    click.option("--stride", type=click.IntRange(min=1), default=512, show_default=True,
                 help="--sweep: perplexity window advance"),
    click.option("--context", type=click.IntRange(min=2), default=1024, show_default=True,
                 help="--sweep: perplexity window length"),
    click.option("--tokens", type=click.IntRange(min=1), default=4096, show_default=True,
                 help="--sweep: perplexity tokens scored"),
    click.option("--corpus", default="pydoc", show_default=True,
                 help="--sweep: held-out perplexity text: gsm8k, pydoc, or a text file"),
    click.option("--targets", default="1.1,1.2,1.3", show_default=True, help="--sweep: comma-separated target speedups"),
    click.option("--methods", default=",".join(["uniform", "block-influence", "angular", "similarity-block",
                 "similarity-attention", "similarity-mlp", "similarity-joint", "greedy-loss", "search"]),
                 show_default=True, help="--sweep: comma-separated methods (see skiplm.sweep.compare.METHODS); the policies "
                 "ffn-skip, lac, lac-mlp are calibrated per target"),
    click.option("--sweep", is_flag=True,
                 help="the scoreboard: plan every method at every target and measure quality and speed against the "
                      "full model, resumable (results in -o, default results/sweep)"),
]


def _sweep_options(function):
    for option in _SWEEP_OPTIONS:
        function = option(function)
    return function


def _given(ctx, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)


_SWEEP_PARAMS = ("methods", "targets", "corpus", "tokens", "context", "stride", "prompts", "limit", "agree_tokens",
                 "chat", "calibration_corpus", "sequences", "length", "seed", "fresh")


def _check_sweep_options(ctx, sweep: bool) -> None:
    """Sweep options only with --sweep; options of a plain bench that a sweep does not take, refused with it."""
    if not sweep:
        given = [p.opts[0] for p in ctx.command.params if p.name in _SWEEP_PARAMS and _given(ctx, p.name)]
        if given:
            raise click.UsageError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} with --sweep.")
        return
    for name, option, why in (("plan_paths", "--plan", "a sweep makes its own plans (see --methods, --targets)"),
                              ("compare_pruned", "--compare-pruned", "a sweep times each plan against the full model"),
                              ("force", "--force", "a sweep's plans are made for the model"),
                              ("decode_prompts", "--decode-prompts", "a sweep decodes after chunks of GSM8K text")):
        if _given(ctx, name):
            raise click.UsageError(f"{option} does not apply with --sweep: {why}.")


def _sweep(ctx, model, batch_sizes, prompt_tokens, decode_prompt_tokens, new_tokens, repeats, warmup, threads, out,
           dtype, device, *, methods, targets, corpus, tokens, context, stride, prompts, limit, agree_tokens, chat,
           calibration_corpus, sequences, length, seed, fresh):
    import datetime

    from ..measure.agreement import load_prompts
    from ..measure.speed import BenchSettings
    from ..sweep.core import SweepProgress, SweepSettings, compact_table, run_sweep

    out = Path("results/sweep" if not _given(ctx, "out") else out)
    settings = SweepSettings(
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
        targets=_floats(targets, "--targets"),
        corpus=corpus, tokens=tokens, context=context, stride=stride, prompts=prompts, limit=limit,
        agree_tokens=agree_tokens, chat=chat, calibration_corpus=calibration_corpus, sequences=sequences,
        length=length, seed=seed,
        bench=BenchSettings(_ints(batch_sizes, "--batch-sizes"), prompt_tokens, decode_prompt_tokens, new_tokens,
                            repeats, warmup),
    )
    settings.check()  # bad settings fail before the model loads
    load_prompts(prompts, limit)
    _set_threads(threads)
    hf_model, tokenizer = _load(model, dtype, device)
    command = _command_line()

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False,
                  speed_estimate_period=24 * 3600) as bar:  # the ETA averages over the whole run, not the last 30 s

        class Report(SweepProgress):
            def __init__(self):
                self.planning_task = self.task = None
                self.done = self.points = 0

            def planning(self, text):
                if self.planning_task is None:
                    self.planning_task = bar.add_task(text, total=None)
                if text.startswith("planning ") and not console.is_terminal:
                    console.print(text)  # no live display (e.g. output to a file): say what takes the time
                bar.update(self.planning_task, description=text)

            def start(self, total_steps, points, resumed):
                if self.planning_task is not None:
                    bar.update(self.planning_task, description="planning done", total=1, completed=1)
                if resumed:
                    console.print(f"resuming: {resumed} finished point(s) loaded from {out}/points.jsonl")
                self.points = points
                self.task = bar.add_task(f"{points} point(s) to measure", total=max(total_steps, 1))

            def step(self, description, steps=1):
                bar.update(self.task, advance=steps, description=description)

            def finished(self, record):
                # also a line per point, with the ETA: a log file (no live display) shows the run's progress too
                self.done += 1
                target = "" if record["method"] == "full" else f" @ {record['target']:g}"
                remaining = bar.tasks[self.task].time_remaining
                eta = "" if remaining is None else f", eta {datetime.timedelta(seconds=round(remaining))}"
                console.print(f"finished {record['method']}{target} ({self.done} of {self.points}{eta}); saved to "
                              f"{out}/points.jsonl")

        try:
            result = run_sweep(hf_model, tokenizer, settings, out, model_name=model, dtype=dtype, device=device,
                               command=command, fresh=fresh, progress=Report())
        except KeyboardInterrupt:
            bar.stop()
            console.print(f"interrupted: the finished points are saved in {out}/points.jsonl; run the same command "
                          "again to resume.")
            raise
    headers, rows = compact_table(result)
    table = Table(title=f"scoreboard: {model}", caption="speed: full time / plan time, paired per round (the full "
                  "model's row: against itself); intervals and more in sweep.md")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    console.print(f"wrote {out}/sweep.json, {out}/sweep.md, {out}/pareto.png "
                  f"({result['resumed_points']} point(s) resumed)")


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}.", param_hint=option) from None


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}.", param_hint=option) from None


@cli.command()
@MODEL_ARGUMENT
@click.option("--plan", "--policy", "plan_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="plan file (repeat for several); the full model is always measured too")
@click.option("--batch-sizes", default="1,8", show_default=True)
@click.option("--prompt-tokens", default=256, show_default=True, help="prefill length")
@click.option("--decode-prompt-tokens", default=64, show_default=True, help="prompt length before decoding")
@click.option("--decode-prompts", type=click.Choice(["corpus", "gsm8k-chat"]), default="corpus", show_default=True,
              help="decode prompts: chunks of GSM8K text, or the last --decode-prompt-tokens tokens of GSM8K "
                   "questions in the chat template (the model answers, as in use; input-adaptive policies decide on it)")
@click.option("--new-tokens", default=64, show_default=True, help="decode steps")
@click.option("--repeats", default=5, show_default=True)
@click.option("--warmup", default=1, show_default=True)
@click.option("--compare-pruned/--no-compare-pruned", default=True, show_default=True,
              help="also time a copy with the plan's blocks physically deleted")
@click.option("--threads", type=int, help="torch CPU threads (default: torch's choice)")
@click.option("--out", "-o", type=click.Path(), default="results/bench", show_default=True, help="output folder")
@click.option("--force", is_flag=True, help="apply plans even if made for other weights")
@_sweep_options
@_model_options
@click.pass_context
def bench(ctx, model, plan_paths, batch_sizes, prompt_tokens, decode_prompt_tokens, decode_prompts, new_tokens, repeats,
          warmup, compare_pruned, threads, out, force, dtype, device, sweep, **sweep_options):
    """Prefill latency and decode tokens/s of the full model and each plan, interleaved, in one run.

    With --sweep: the scoreboard. Every method of --methods at every target of --targets is planned and measured
    against the full model — perplexity, generation agreement, prefill and decode speed — in one resumable run.
    """
    from ..measure.speed import BenchSettings

    _check_sweep_options(ctx, sweep)
    if sweep:
        return _sweep(ctx, model, batch_sizes, prompt_tokens, decode_prompt_tokens, new_tokens, repeats, warmup, threads,
                      out, dtype, device, **sweep_options)
    _set_threads(threads)
    hf_model, tokenizer = _load(model, dtype, device)
    plans = {Path(p).stem: _load_plan(p, hf_model, force) for p in plan_paths}
    settings = BenchSettings(tuple(int(b) for b in batch_sizes.split(",")), prompt_tokens, decode_prompt_tokens,
                             new_tokens, repeats, warmup, decode_prompts)
    result = bench_and_report(hf_model, tokenizer, plans, settings, compare_pruned, Path(out), model, device)
    _print_speed(result)


@cli.command()
@MODEL_ARGUMENT
@click.option("--plan", "--draft-plan", "plan_path", type=click.Path(exists=True, dir_okay=False),
              help="plan file (with --speculative: the draft's plan)")
@click.option("--prompt", "-p", required=True, help="the user message")
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--chat/--raw", default=True, show_default=True, help="wrap the prompt in the model's chat template")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="keep the k most likely tokens when sampling (0: off; without --speculative, 0 keeps the model's "
                   "generation config)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--speculative", is_flag=True,
              help="lossless self-speculative decoding: the model under --plan (and/or --draft-dtype) drafts, the full "
                   "model verifies; the output is the full model's")
@click.option("--max-draft", type=click.IntRange(min=1), default=DEFAULT_MAX_DRAFT, show_default=True,
              help="--speculative: most tokens drafted per round (fewer when the draft is unsure)")
@click.option("--adapt", is_flag=True,
              help="--speculative: choose the draft's skip set on the fly (SWIFT-style) among the draft plan and the "
                   "runner-ups `skiplm draft-search` recorded in it")
@click.option("--draft-dtype", help="--speculative: draft with a copy of the weights in this precision: bfloat16, "
                                    "float16, int8 (int8 weights, bfloat16 arithmetic) or int8-dynamic (int8 weights "
                                    "and activations); default: the one a draft plan from `skiplm draft-search` "
                                    "names, else the model's own weights")
@click.option("--prompt-lookup", type=click.IntRange(min=0), default=3, show_default=True,
              help="--speculative: when the last N tokens occurred earlier in the text, draft what followed them "
                   "(n-gram prompt lookup, no draft forward), kept only while it pays; 0: off")
@click.option("--draft-engine", type=click.Choice(["auto", "lean", "modules"]), default="auto", show_default=True,
              help="--speculative with a draft precision: run the copy through skiplm's lean forward (fused "
                   "products, in-place cache; Llama, Mistral, Qwen2/3) or through the model's own modules; auto: lean "
                   "where the family allows")
@click.option("--policy", "policy_path", help="input-adaptive policy file made by `skiplm policy` (ffn-skip, lac)")
@click.option("--activation-map", type=click.Path(dir_okay=False),
              help="--policy: write which layers ran for which tokens to this PNG (and a JSON next to it)")
@click.option("--force", is_flag=True, help="apply the plan even if made for other weights")
@_model_options
def generate(model, plan_path, prompt, max_new_tokens, chat, temperature, top_p, top_k, seed, speculative, max_draft,
             adapt, draft_dtype, prompt_lookup, draft_engine, policy_path, activation_map, force, dtype, device):
    """Generate text with MODEL (under a plan if given, or speculatively with --speculative), streaming to stdout."""
    import torch
    from transformers import TextStreamer

    from ..errors import DataError, PlanError
    from ..skipper import apply

    if not prompt.strip():
        raise DataError("the prompt is empty: pass some text with --prompt.")
    policy = None
    if policy_path is not None:
        policy = _policy_file(policy_path, plan_path, speculative)
    elif activation_map:
        raise PlanError("--activation-map records what a --policy decided; give a --policy.")
    hf_model, tokenizer = _load(model, dtype, device)
    skip_plan = _load_plan(plan_path, hf_model, force)
    if policy is not None:
        if not force:
            policy.check_model(hf_model)
        skip_plan = policy
    if chat and tokenizer.chat_template:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    torch.manual_seed(seed)
    if speculative:
        from ..speculative.decoder import draft_alternatives, draft_precision
        from ..speculative.decoder import generate as speculative_generate

        if draft_dtype is None and skip_plan is None:
            raise PlanError("--speculative needs a draft: a --plan (the layers the draft skips) and/or --draft-dtype.")
        alternatives = draft_alternatives(skip_plan) if adapt else []
        if adapt and not alternatives:
            raise PlanError("--adapt needs a --plan made by `skiplm draft-search --alternatives N` (N >= 1); this plan "
                            "records no runner-up skip sets.")
        start = time.perf_counter()
        result = speculative_generate(
            hf_model, tokenizer, inputs["input_ids"], inputs.get("attention_mask"), plan=skip_plan,
            draft_dtype=draft_dtype, alternatives=alternatives, draft_engine=draft_engine,
            prompt_lookup=prompt_lookup or None,
            max_new_tokens=max_new_tokens, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0, top_k=top_k, top_p=top_p, max_draft=max_draft,
            seed=seed, streamer=TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True), check_model=False)
        elapsed = time.perf_counter() - start
        new = len(result.tokens[0])
        precision = draft_dtype or draft_precision(skip_plan)
        draft = "; ".join(filter(None, [skip_plan.describe() if skip_plan else "",
                                        f"{precision} copy" if precision else ""]))
        console.print(f"[dim]{new} tokens in {elapsed:.2f} s ({new / elapsed:.1f} tokens/s, including prefill); "
                      f"draft: {draft}[/dim]")
        console.print(f"[dim]{result.stats.describe()}[/dim]")
        return
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    if temperature > 0 and top_k:
        sampling["top_k"] = top_k
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    handle = None
    if policy is not None:
        from ..policies.core import apply_policy

        handle = apply_policy(hf_model, policy, check_model=False, record=bool(activation_map))
    elif skip_plan is not None:
        handle = apply(hf_model, skip_plan, check_model=False)
    try:
        start = time.perf_counter()
        output = hf_model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                                   pad_token_id=tokenizer.pad_token_id, **sampling)
        elapsed = time.perf_counter() - start
    finally:
        if handle:
            handle.remove()
    new = output.shape[1] - inputs["input_ids"].shape[1]
    what = f"; {'policy' if policy else 'plan'}: {skip_plan.describe()}" if skip_plan else ""
    console.print(f"[dim]{new} tokens in {elapsed:.2f} s ({new / elapsed:.1f} tokens/s, including prefill){what}[/dim]")
    if policy is not None:
        stats = handle.stats.to_json()
        console.print("[dim]" + "; ".join(f"{phase}: {s['mlp_skip_ratio']:.0%} of MLPs skipped"
                                          + (f", {s['attention_skip_ratio']:.0%} of attention contributions dropped"
                                             if policy.skips_attention else "")
                                          for phase, s in stats.items()) + "[/dim]")
        if activation_map:
            _write_activation_map(handle, activation_map, model)


def _policy_file(path: str, plan_path: str | None, speculative: bool):
    from ..errors import PlanError
    from ..policies.core import POLICIES, is_policy
    from ..skipper import load_skipper

    if plan_path is not None or speculative:
        raise PlanError("--policy runs the model under an input-adaptive policy; it does not combine with --plan or "
                        "--speculative.")
    if not Path(path).is_file():
        hint = (f" `{path}` is a policy method: calibrate one for this model first, e.g. `skiplm policy --method "
                f"{path} --skip-ratio 0.25 -o {path}.json`." if path in POLICIES else "")
        raise PlanError(f"policy file {path} does not exist.{hint}")
    policy = load_skipper(path)
    if not is_policy(policy):
        raise PlanError(f"{path} is a skip plan, not a policy: pass it with --plan.")
    return policy


def _write_activation_map(handle, path: str, model_name: str) -> None:
    from ..policies.core import activation_summary, plot_activation_maps
    from ..report.files import write_json

    png = plot_activation_maps(handle.maps, handle.policy.num_layers, path, f"{model_name}: {handle.policy.method}")
    summary = {"kind": "activation-map", "command": _command_line(), "model": model_name,
               "policy": handle.policy.to_json(), "stats": handle.stats.to_json(),
               "activations": activation_summary(handle.maps, handle.policy.num_layers)}
    write_json(png.with_suffix(".json"), summary)
    console.print(f"wrote {png} and {png.with_suffix('.json')}")


@cli.command("analyze")
@MODEL_ARGUMENT
@click.option("--corpus", default="gsm8k", show_default=True, help="calibration text: gsm8k, pydoc, or a text file")
@click.option("--sequences", default=8, show_default=True, type=click.IntRange(min=1), help="calibration sequences")
@click.option("--length", default=256, show_default=True, type=click.IntRange(min=2), help="tokens per sequence")
@click.option("--span-max", type=click.IntRange(min=1),
              help="largest span n of the angular distance between layer l and l+n  [default: layers // 4]")
@click.option("--skip-one/--no-skip-one", default=True, show_default=True,
              help="also measure skipping each attention / MLP / block alone (3 extra passes per layer)")
@click.option("--out", "-o", type=click.Path(file_okay=False), default="results/analysis", show_default=True,
              help="output folder")
@_model_options
def analyze_command(model, corpus, sequences, length, span_max, skip_one, out, dtype, device):
    """Which layers and sublayers of MODEL matter: per-layer metrics on calibration text, as a table, JSON and plots."""
    from ..analysis.activations import calibration_batches
    from ..analysis.importance import analysis_steps, analyze, write_analysis
    from ..models.data import corpus_label, load_corpus
    from ..errors import DataError
    from ..measure.perplexity import tokenize_corpus
    from ..report.files import machine_info

    text = load_corpus(corpus)
    hf_model, tokenizer = _load(model, dtype, device)
    label = corpus_label(corpus)
    ids = tokenize_corpus(tokenizer, text, sequences * length)
    try:
        batches = calibration_batches(ids, sequences, length)
    except DataError as exc:
        raise DataError(f"corpus {label}: {exc} Use a longer text, fewer --sequences or a shorter --length.") from None
    from ..models.adapters import count_layers

    layers = count_layers(hf_model)
    if span_max is not None and span_max > layers:
        raise click.BadParameter(f"{span_max} is more than the model's {layers} layers.", param_hint="--span-max")
    with _progress() as progress:
        task = progress.add_task("analysis", total=analysis_steps(layers, len(batches), skip_one))
        result = analyze(hf_model, batches, span_max=span_max, skip_one=skip_one, corpus=label, model_name=model,
                         progress=lambda what: progress.update(task, advance=1, description=what))
    paths = write_analysis(result, Path(out), {"machine": machine_info(device)})
    _print_analysis(result)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")


@cli.command()
@MODEL_ARGUMENT
@click.option("--plan", "plan_path", required=True, type=click.Path(exists=True, dir_okay=False), help="plan file")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="folder to write the checkpoint to")
@click.option("--zero-sublayers", is_flag=True,
              help="for attention-/MLP-only skips: zero that branch's weights (same outputs, no speedup)")
@click.option("--force", is_flag=True, help="export even if the plan was made for other weights")
@_model_options
def export(model, plan_path, out, zero_sublayers, force, dtype, device):
    """Save MODEL with a plan baked in, as a checkpoint vanilla transformers loads (skipped blocks deleted)."""
    from ..export.pruned import export_pruned

    from ..errors import PlanError
    from ..policies.core import is_policy

    hf_model, tokenizer = _load(model, dtype, device)
    skip_plan = _load_plan(plan_path, hf_model, force)
    if is_policy(skip_plan):
        raise PlanError(f"{plan_path} is an input-adaptive policy: which layers run depends on each token, so there is "
                        "no fixed set of layers to delete. Export a static plan (skiplm plan).")
    folder = export_pruned(hf_model, skip_plan, out, tokenizer=tokenizer, zero_sublayers=zero_sublayers,
                           check_model=False)
    console.print(f"wrote {folder}: {skip_plan.describe()}; load it with "
                  f"AutoModelForCausalLM.from_pretrained({str(folder)!r})")


@cli.command()
@MODEL_ARGUMENT
@_model_options
def info(model, dtype, device):
    """Show how skiplm sees MODEL: family, layers, and what each sublayer costs."""
    from ..models.adapters import get_adapter, model_type_of
    from ..measure.costs import CostModel

    hf_model, _ = _load(model, dtype, device)
    adapter = get_adapter(hf_model)
    costs = CostModel.from_parameter_counts(hf_model)
    console.print(f"model type {model_type_of(hf_model)}, {len(costs.attention)} decoder layers "
                  f"(at `{adapter.layers}`), {sum(p.numel() for p in hf_model.parameters()) / 1e6:.1f}M parameters")
    console.print(f"per layer: attention {costs.attention[0] / 1e6:.2f}M, MLP {costs.mlp[0] / 1e6:.2f}M parameters; "
                  f"output head {costs.fixed / 1e6:.2f}M ({costs.fixed / costs.total:.0%} of a decode step by the cost model)")


@cli.command()
@click.option("--speedup", default=1.25, show_default=True, help="target ideal speedup of the uniform plan")
@click.option("--tokens", default=4096, show_default=True, help="tokens scored per corpus")
@click.option("--repeats", default=3, show_default=True, help="timed rounds per measure")
@click.option("--out", "-o", type=click.Path(), default="results/demo", show_default=True, help="output folder")
@_model_options
def demo(speedup, tokens, repeats, out, dtype, device):
    """The main job: on the default model, plan a uniform skip, evaluate and bench it against the full model."""
    from ..measure.speed import BenchSettings
    from ..models.loading import DEFAULT_MODEL
    from ..planners import plan_uniform

    out = Path(out)
    hf_model, tokenizer = _load(DEFAULT_MODEL, dtype, device)
    skip_plan = plan_uniform(hf_model, speedup=speedup, name=DEFAULT_MODEL)
    plan_file = skip_plan.save(out / "plan.json")
    console.print(f"[bold]plan[/bold] uniform {speedup}x: {skip_plan.describe()} -> {plan_file}")
    name = f"uniform-{speedup}x"
    quality = evaluate_and_report(hf_model, tokenizer, {"full": None, name: skip_plan}, ("gsm8k", "pydoc"), tokens,
                                  1024, 512, out, DEFAULT_MODEL, device)
    settings = BenchSettings(repeats=repeats)
    speed = bench_and_report(hf_model, tokenizer, {name: skip_plan}, settings, True, out, DEFAULT_MODEL, device)
    _print_quality(quality)
    _print_speed(speed)
    _write_demo_summary(out, skip_plan, quality, speed)
    console.print(f"results in {out}/")


@cli.command()
@MODEL_ARGUMENT
@click.option("--methods", default=",".join(["uniform", "block-influence", "angular", "similarity-block",
              "similarity-attention", "similarity-mlp", "similarity-joint", "greedy-loss", "search"]), show_default=True,
              help="comma-separated methods (see skiplm.sweep.compare.METHODS; policies: ffn-skip, lac, lac-mlp)")
@click.option("--targets", default="1.1,1.2,1.3,1.5", show_default=True, help="comma-separated target speedups")
@click.option("--calibration-corpus", default="gsm8k", show_default=True, help="text the planners are fitted on")
@click.option("--eval-corpus", default="pydoc", show_default=True, help="held-out text for perplexity")
@click.option("--sequences", default=1, show_default=True, help="calibration sequences")
@click.option("--length", default=1024, show_default=True, help="tokens per calibration sequence (default: the held-out context)")
@click.option("--tokens", default=4096, show_default=True, help="held-out tokens scored")
@click.option("--context", default=1024, show_default=True)
@click.option("--stride", default=512, show_default=True)
@click.option("--repeats", default=5, show_default=True, help="paired timing rounds per plan")
@click.option("--new-tokens", default=32, show_default=True, help="decode steps per timing")
@click.option("--out", "-o", type=click.Path(), default="results/compare", show_default=True, help="output folder")
@_model_options
def compare(model, methods, targets, calibration_corpus, eval_corpus, sequences, length, tokens, context, stride,
            repeats, new_tokens, out, dtype, device):
    """Every planner at every target: held-out perplexity vs measured decode speedup, one run (table + Pareto plot)."""
    from ..analysis.activations import calibration_batches
    from ..measure.speed import BenchSettings
    from ..sweep.compare import evaluate_points, make_plans, pareto_table, plot_pareto
    from ..models.data import corpus_label, load_corpus
    from ..measure.perplexity import tokenize_corpus
    from ..report.files import machine_info, markdown_table, write_json

    out = Path(out)
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    target_list = [float(t) for t in targets.split(",")]
    hf_model, tokenizer = _load(model, dtype, device)
    calibration = calibration_batches(tokenize_corpus(tokenizer, load_corpus(calibration_corpus), sequences * length),
                                      sequences, length)
    eval_ids = tokenize_corpus(tokenizer, load_corpus(eval_corpus), tokens)
    corpus_ids = tokenize_corpus(tokenizer, load_corpus("gsm8k"), 4096)
    settings = BenchSettings(batch_sizes=(1,), decode_prompt_tokens=64, new_tokens=new_tokens, repeats=repeats,
                             warmup=1)
    started = time.perf_counter()
    with console.status("planning") as status:
        points = make_plans(hf_model, method_list, target_list, calibration, progress=status.update)
        result = evaluate_points(hf_model, points, eval_ids, corpus_ids, context=context, stride=stride,
                                 bench=settings, progress=status.update)
    result.update({
        "kind": "planner-comparison",
        "command": _command_line(),
        "model": model,
        "machine": machine_info(device),
        "settings": {"methods": method_list, "targets": target_list, "calibration": corpus_label(calibration_corpus),
                     "calibration_tokens": sequences * length, "eval": corpus_label(eval_corpus), "eval_tokens": tokens,
                     "context": context, "stride": stride, "timing": dataclasses.asdict(settings)},
        "seconds": time.perf_counter() - started,
    })
    write_json(out / "compare.json", result)
    headers, rows = pareto_table(result, target_list)
    table = markdown_table(headers, rows)
    (out / "compare.md").write_text(
        f"# Planners compared, {model}\n\nCalibration: {sequences} x {length} tokens of {calibration_corpus}. "
        f"Held-out perplexity: {tokens} tokens of {eval_corpus}, context {context}, stride {stride}. Measured decode "
        f"speedup: batch 1, {new_tokens} steps, paired with the full model over {repeats} rounds. Targets are each "
        "method's own (ideal by the cost model; `search`: predicted by its measured latency model).\n\n"
        + table + "\n![pareto](pareto.png)\n")
    plot_pareto(result, out / "pareto.png", f"{model}: held-out perplexity vs measured decode speedup")
    console.print(table)
    console.print(f"results in {out}/")


@cli.command()
@MODEL_ARGUMENT
@click.option("--plan", "--policy", "plan_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="plan file (repeat for several); the full model always generates the reference")
@click.option("--prompts", default="gsm8k", show_default=True,
              help="gsm8k (the shipped test questions), or a file: one prompt per line, or JSON Lines with a "
                   "\"prompt\" field (and optionally an \"answer\")")
@click.option("--limit", type=click.IntRange(min=1), default=32, show_default=True, help="use the first N prompts")
@click.option("--new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="greedy tokens per prompt (fewer if the model emits EOS)")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--chat/--raw", default=True, show_default=True, help="wrap each prompt in the model's chat template")
@click.option("--out", "-o", type=click.Path(file_okay=False), default="results/agree", show_default=True,
              help="output folder")
@click.option("--force", is_flag=True, help="apply plans even if made for other weights")
@_model_options
def agree(model, plan_paths, prompts, limit, new_tokens, batch_size, chat, out, force, dtype, device):
    """Greedy generation agreement of each plan with the full model (and GSM8K answer accuracy)."""
    from ..measure.agreement import FULL, load_prompts, measure_agreement, summary_rows, write_agreement
    from ..models.data import corpus_label
    from ..report.files import machine_info

    prompt_list = load_prompts(prompts, limit)  # bad prompts fail before the model loads
    hf_model, tokenizer = _load(model, dtype, device)
    plans = {Path(p).stem: _load_plan(p, hf_model, force) for p in plan_paths}
    if FULL in plans:
        raise click.BadParameter(f"a plan file may not be named {FULL}.json: that name is the full model's.",
                                 param_hint="--plan")
    with _progress() as progress:
        task = progress.add_task("generating", total=len(prompt_list) * (1 + len(plans)))
        result = measure_agreement(
            hf_model, tokenizer, prompt_list, plans, new_tokens=new_tokens, batch_size=batch_size, chat=chat,
            source=corpus_label(prompts), check_model=False,
            progress=lambda name, rows: progress.update(task, advance=rows, description=f"generating ({name})"))
    result = {"kind": result.pop("kind"), "command": _command_line(), "model": model, "machine": machine_info(device),
              **result}
    paths = write_agreement(result, Path(out), model)
    headers, rows = summary_rows(result)
    table = Table(title=f"agreement with the full model's greedy output ({len(prompt_list)} prompts, "
                        f"<= {new_tokens} tokens)")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    if not plans:
        console.print("no --plan given: only the full model was run.")
    console.print(f"wrote {paths['json']}, {paths['markdown']}")


@cli.command("bench-speculative")
@MODEL_ARGUMENT
@click.option("--draft-plan", "plan_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="a draft: the model under this plan (repeat for several)")
@click.option("--draft-dtype", "dtypes", multiple=True,
              help="a draft: a copy of the weights in this precision, full depth: bfloat16, float16, int8, "
                   "int8-dynamic; PRECISION:modules drafts through the model's own modules instead of the lean "
                   "engine (repeat for several)")
@click.option("--adapt", is_flag=True,
              help="also run each --draft-plan that records runner-up skip sets (from draft-search) with the skip set "
                   "chosen on the fly among them (SWIFT-style), as a draft named NAME-adapt")
@click.option("--prompt-lookup", "lookup", type=click.IntRange(min=1),
              help="also run every draft combined with n-gram prompt lookup of this length, as NAME+lookup")
@click.option("--prompts", "prompt_sets", default="gsm8k,pydoc", show_default=True,
              help="prompt sets: gsm8k (questions in the chat template), pydoc (64-token text chunks to continue)")
@click.option("--limit", default=8, show_default=True, type=click.IntRange(min=1), help="prompts per set")
@click.option("--batch-sizes", default="1,4,8", show_default=True)
@click.option("--new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--max-draft", default=DEFAULT_MAX_DRAFT, show_default=True, type=click.IntRange(min=1))
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(min=1), help="rounds over every batch")
@click.option("--force", is_flag=True, help="use draft plans made for other weights")
@click.option("--out", "-o", type=click.Path(file_okay=False), default="results/speculative", show_default=True)
@_model_options
def bench_speculative(model, plan_paths, dtypes, adapt, lookup, prompt_sets, limit, batch_sizes, new_tokens, max_draft,
                      repeats, force, out, dtype, device):
    """Self-speculative decoding against plain greedy decoding in the same run: tokens/s, speedup, acceptance,
    fallbacks and identical output, per prompt set, batch size and draft (JSON, markdown, plot in --out)."""
    from ..errors import PlanError
    from ..report.files import machine_info, write_json
    from ..speculative.decoder import draft_alternatives
    from ..speculative.bench import Draft, markdown, plot, prompt_set, run_speculative_bench

    if not plan_paths and not dtypes:
        raise PlanError("give a draft: --draft-plan PLAN (the layers it skips) and/or --draft-dtype DTYPE.")
    batches = _ints(batch_sizes, "--batch-sizes")
    hf_model, tokenizer = _load(model, dtype, device)
    drafts = [Draft(Path(path).stem, plan=_load_plan(path, hf_model, force)) for path in plan_paths]
    if adapt:
        adaptive = [dataclasses.replace(d, name=f"{d.name}-adapt", alternatives=alternatives)
                    for d in drafts if (alternatives := tuple(draft_alternatives(d.plan)))]
        if not adaptive:
            raise PlanError("--adapt needs a --draft-plan made by `skiplm draft-search --alternatives N` (N >= 1): "
                            "none of the plans given records runner-up skip sets.")
        drafts += adaptive
    drafts += [Draft.from_spec(spec) for spec in dtypes]
    if lookup:
        drafts += [dataclasses.replace(d, name=f"{d.name}+lookup", lookup=lookup) for d in drafts]
    prompts = {name: prompt_set(tokenizer, name, limit) for name in prompt_sets.split(",") if name.strip()}
    with console.status("decoding") as status:
        result = run_speculative_bench(hf_model, prompts, drafts, batch_sizes=batches, new_tokens=new_tokens,
                                       repeats=repeats, max_draft=max_draft, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id or 0,
                                       progress=lambda text: status.update(f"decoding: {text}"))
    settings = {"model": model, "command": _command_line(), "machine": machine_info(device), "limit": limit,
                "new_tokens": new_tokens, "max_draft": max_draft, "repeats": repeats, "batch_sizes": list(batches)}
    out = Path(out)
    write_json(out / "speculative.json", {"kind": "speculative-bench", "settings": settings, **result})
    text = markdown(result, settings)
    (out / "speculative.md").write_text(text)
    plot(result, out / "speculative.png", f"self-speculative decoding, {model}")
    console.print(text)
    console.print(f"wrote {out}/speculative.json, speculative.md, speculative.png")


@cli.command("draft-search")
@MODEL_ARGUMENT
@click.option("--max-blocks", default=6, show_default=True, type=click.IntRange(min=1),
              help="candidates: skip the 1..N blocks of lowest Block Influence (ranked on gsm8k calibration text)")
@click.option("--precisions", default="int8,int8-dynamic", show_default=True,
              help="draft precisions to combine with each skip set: float32 (the model's own weights), bfloat16, "
                   "float16, int8 (int8 weights, bfloat16 arithmetic), int8-dynamic (int8 weights and activations, "
                   "CPU only: skipped elsewhere); a copy in another precision also drafts at full depth. On the "
                   "default model every float32 skip set (1-4 blocks) was slower than plain decoding (0.74-0.87x), "
                   "hence the int8 precisions by default")
@click.option("--prompts", "prompt_source", default="gsm8k", show_default=True, type=click.Choice(["gsm8k", "pydoc"]),
              help="calibration prompts the candidates are timed on")
@click.option("--alternatives", default=2, show_default=True, type=click.IntRange(min=0),
              help="runner-up skip sets (same precision) to record in the draft plan for on-the-fly selection")
@click.option("--limit", default=3, show_default=True, type=click.IntRange(min=1), help="calibration prompts")
@click.option("--new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(min=1),
              help="timing rounds per candidate (median); more rounds tell closer candidates apart, and take longer")
@click.option("--max-draft", default=DEFAULT_MAX_DRAFT, show_default=True, type=click.IntRange(min=1))
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True, help="draft plan file to write (JSON)")
@_model_options
def draft_search(model, max_blocks, precisions, prompt_source, alternatives, limit, new_tokens, repeats, max_draft, out,
                 dtype, device):
    """Choose a self-speculative draft for MODEL by measurement: each candidate (a skip set and a precision) drafts
    whole generations on calibration prompts at batch 1, timed against plain greedy decoding; the fastest is saved
    as a draft plan (its precision included) for `generate --speculative --plan` and `bench-speculative
    --draft-plan`."""
    from ..plan import SkipPlan
    from ..planners import get_planner, load_calibration
    from ..speculative.quantize import precision_name, precision_unavailable
    from ..report.files import write_json
    from ..speculative.bench import Draft, prompt_set, search_draft

    precision_list = list(dict.fromkeys(precision_name(p.strip()) for p in precisions.split(",") if p.strip()))
    if not precision_list:
        raise click.UsageError("--precisions needs at least one precision, e.g. float32,int8.")
    hf_model, tokenizer = _load(model, dtype, device)
    model_device = next(hf_model.parameters()).device
    for precision in list(precision_list):
        reason = precision_unavailable(precision, model_device)
        if reason is not None:
            console.print(f"[yellow]not searching {precision} drafts: {reason}[/yellow]")
            precision_list.remove(precision)
    if not precision_list:
        raise click.UsageError("none of --precisions can draft on this device; try --precisions int8.")
    start = time.perf_counter()
    with console.status("ranking blocks by Block Influence"):
        calibration = load_calibration(tokenizer, "gsm8k", 2, 256)
        layers = hf_model.config.num_hidden_layers
        # one ranking: the plan for the most blocks lists them in order, and its prefixes are the smaller candidates
        largest = get_planner("block-influence")(hf_model, skip=min(max_blocks, layers - 1), calibration=calibration,
                                                 name=model)
        order = largest.provenance["order"]
        candidates = [Draft(f"skip-{k}-blocks" + ("" if precision == "float32" else f"-{precision}"),
                            plan=SkipPlan.from_layers(layers, blocks=order[:k], model=largest.model, provenance={
                                **largest.provenance, "target": {"skip": k}, "order": order[:k],
                                "draft": {"precision": precision}}))
                      for precision in precision_list
                      for k in range(0 if precision != "float32" else 1, len(order) + 1)]
    prompts = prompt_set(tokenizer, prompt_source, limit)
    with console.status("timing candidates") as status:
        found = search_draft(hf_model, prompts, candidates, new_tokens=new_tokens, max_draft=max_draft, repeats=repeats,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or 0,
                             progress=lambda text: status.update(f"timing candidates: {text}"))
    seconds = time.perf_counter() - start
    best = found["best"]
    # the runner-ups of the winner's precision, for on-the-fly selection (--adapt)
    runner_ups = sorted((d for d in candidates if d is not best and d.precision == best.precision),
                        key=lambda d: -found["speedups"][d.name])[:alternatives]
    draft = {**best.plan.provenance["draft"], "alternatives": [d.plan.decode.blocks for d in runner_ups]}
    plan = dataclasses.replace(best.plan, provenance={
        **best.plan.provenance, "draft": draft, "draft_search": {"speedups": found["speedups"], "acceptance": found["acceptance"],
                                                 "pays": found["pays"], "seconds": seconds, "prompts": prompt_source,
                                                 "limit": limit, "new_tokens": new_tokens, "repeats": repeats}})
    plan.save(out)
    write_json(Path(out).with_suffix(".search.json"),
               {"kind": "draft-search", "command": _command_line(), "best": best.name, "pays": found["pays"],
                "seconds": seconds, "speedups": found["speedups"], "acceptance": found["acceptance"],
                "measured": found["measured"]})
    for name, speedup in found["speedups"].items():
        console.print(f"{name}: {speedup:.3f}x, {found['acceptance'][name]:.0%} of drafts accepted")
    verdict = ("beats plain decoding" if found["pays"] else
               "does not beat plain decoding here: speculation with it will mostly fall back to plain steps")
    console.print(f"best draft {best.name} ({plan.describe()}) {verdict}; search took {seconds:.1f} s")
    console.print(f"wrote {out}")


@cli.command("report")
@click.argument("results", nargs=-1, required=True, type=click.Path())
@click.option("--out", "-o", type=click.Path(dir_okay=False), default="report.html", show_default=True,
              help="HTML file to write")
@click.option("--title", default="skiplm report", show_default=True, help="page title")
def report_command(results, out, title):
    """One self-contained HTML page (tables, embedded plots, plan grids, commands, machine) from RESULTS: folders or
    JSON files written by bench --sweep, compare, bench, eval and agree."""
    from ..report.html import write_report

    path = write_report(results, out, title)
    console.print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB, no external references)")


@cli.command("lm-eval", add_help_option=False,
             context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lm_eval_command(args):
    """lm-evaluation-harness's command line, with the `skiplm` model type registered; ARGS go to it unchanged.

    e.g. skiplm lm-eval --model skiplm --model_args pretrained=smollm2-135m,plan=plan.json --tasks arc_easy
    """
    try:
        from ..integrations.lm_eval import main as lm_eval_main
    except ImportError as exc:
        raise click.ClickException(str(exc)) from None
    lm_eval_main(list(args))


# -- shared by the commands ------------------------------------------------------------------------------------------
def _command_line() -> str:
    """The command that is running, as a user would type it (stored in results; `skiplm report` shows it)."""
    return shlex.join(["skiplm", *sys.argv[1:]])


def evaluate_and_report(model, tokenizer, plans, corpora, tokens, context, stride, out: Path, model_name, device):
    from ..models.data import corpus_label, load_corpus
    from ..measure.perplexity import compare_perplexity, tokenize_corpus
    from ..report.files import machine_info, markdown_table, write_json

    texts = {corpus_label(c): tokenize_corpus(tokenizer, load_corpus(c), tokens) for c in corpora}
    per_corpus = {}
    with _progress() as progress:
        task = progress.add_task("perplexity", total=sum((ids.numel() - 1) * len(plans) for ids in texts.values()))
        for label, ids in texts.items():
            progress.update(task, description=f"perplexity on {label}")
            per_corpus[label] = compare_perplexity(model, ids, plans, context=context, stride=stride,
                                                   progress=lambda n: progress.advance(task, n))
    result = {
        "kind": "perplexity",
        "command": _command_line(),
        "model": model_name,
        "machine": machine_info(device),
        "settings": {"tokens": tokens, "context": context, "stride": stride, "corpora": list(texts)},
        "plans": {name: (p.to_json() if p else None) for name, p in plans.items()},
        "perplexity": {c: {n: r.to_json() for n, r in rs.items()} for c, rs in per_corpus.items()},
    }
    write_json(out / "eval.json", result)
    headers = ["config"] + [f"ppl {c} ({tokens} tok)" for c in texts]
    rows = [[name] + [f"{per_corpus[c][name].perplexity:.3f}" for c in texts] for name in plans]
    (out / "eval.md").write_text(f"# Perplexity, {model_name}\n\ncontext {context}, stride {stride}; plans' decode skip "
                                 f"set applied to every token.\n\n" + markdown_table(headers, rows))
    return result


def bench_and_report(model, tokenizer, plans, settings, compare_pruned, out: Path, model_name, device):
    import dataclasses

    from ..measure.speed import make_configs, run_bench, total_work
    from ..models.data import load_corpus
    from ..measure.perplexity import tokenize_corpus
    from ..report.files import (machine_info, markdown_table, plot_speedups, policy_rows, settings_line, speed_rows,
                            write_json)

    corpus_ids = tokenize_corpus(tokenizer, load_corpus("gsm8k"), 8 * max(settings.prompt_tokens, settings.decode_prompt_tokens))
    configs = make_configs(model, plans, compare_pruned=compare_pruned)
    chat_prompts = None
    if settings.decode_prompts == "gsm8k-chat":
        from ..measure.agreement import encode_prompts, gsm8k_prompts

        chat_prompts = encode_prompts(tokenizer, gsm8k_prompts(200), chat=True)
    with _progress() as progress:
        task = progress.add_task("bench", total=total_work(configs, settings))
        speed = run_bench(configs, corpus_ids, settings,
                          progress=lambda what: progress.update(task, advance=1, description=f"bench {what}"),
                          chat_prompts=chat_prompts)
    result = {
        "kind": "speed",
        "command": _command_line(),
        "model": model_name,
        "machine": machine_info(device),
        "settings": dataclasses.asdict(settings),
        "plans": {name: p.to_json() for name, p in plans.items()},
        "speed": speed,
    }
    write_json(out / "bench.json", result)
    headers, rows = speed_rows(speed, result["settings"])
    policy_headers, policy_table = policy_rows(speed, result["settings"])
    policy_text = ""
    if policy_table:
        policy_text = ("\n## Input-adaptive policies\n\nMLP time: (full - static probe) / skippable layers, per token. "
                       "Saved: (full - policy) per token. Decision overhead: (decisions only - full) per token.\n\n"
                       + markdown_table(policy_headers, policy_table))
    (out / "bench.md").write_text(
        f"# Speed, {model_name}\n\n{result['machine']['cpu']}, {result['machine']['torch_threads']} threads, "
        f"torch {result['machine']['torch']}; medians of {settings.repeats} interleaved rounds after "
        f"{settings.warmup} warm-up. {settings_line(result['settings'])}.\n\n" + markdown_table(headers, rows)
        + policy_text + "\n![speedups](bench.png)\n")
    if len(configs) > 1:
        plot_speedups(speed, result["settings"], out / "bench.png", f"{model_name}: measured vs ideal speedup")
    return result


def _print_quality(result):
    table = Table(title=f"perplexity ({result['settings']['tokens']} tokens, context {result['settings']['context']})")
    table.add_column("config")
    corpora = list(result["perplexity"])
    for corpus in corpora:
        table.add_column(corpus, justify="right")
    for name in result["plans"]:
        full = [result["perplexity"][c]["full"]["perplexity"] for c in corpora] if "full" in result["plans"] else None
        cells = []
        for i, corpus in enumerate(corpora):
            value = result["perplexity"][corpus][name]["perplexity"]
            cells.append(f"{value:.2f}" + (f" ({value / full[i]:.2f}x)" if full and name != "full" else ""))
        table.add_row(name, *cells)
    Console().print(table)


def _print_speed(result):
    from ..report.files import settings_line, speed_rows

    headers, rows = speed_rows(result["speed"], result["settings"])
    table = Table(title="speed (medians; speedup = full time / config time)", caption=settings_line(result["settings"]))
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i < 2 else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


_ANALYSIS_HEADERS = {"lens KL gain": ("lens", "gain"), "skip Δloss attn": ("Δloss", "attn"),
                     "skip Δloss mlp": ("Δloss", "mlp"), "skip Δloss block": ("Δloss", "blk")}


def _print_analysis(result):
    """Layers as rows, the main metrics as columns (fits 80 columns); per column the 3 most important layers bold,
    the 3 least dim."""
    from rich import box

    from ..analysis.importance import format_value

    columns = [column for column in result.columns() if column.in_table]
    s = result.settings
    table = Table(
        title=f"{result.model_name}: per-layer metrics ({s['sequences']} x {s['length']} tokens of {s['corpus']})",
        caption="cos: cos(in, out) (LLM-Drop); BI: 1 - cos of the block (ShortGPT); rel: ||out - in|| / ||in|| "
                "(Csordás); ΔL2: | ||out|| - ||in|| | (LAC); lens gain: drop of the logit-lens KL at the layer; "
                "Δloss: loss increase when skipped alone (SLEB); ZD: share of weights with |z| > 1 (low: heavy tails). "
                "↑/↓: a high/low value marks an important layer; bold: the 3 most important per column, dim: the 3 "
                f"least. Full-model loss {result.full_loss:.3f}.",
        box=box.SIMPLE_HEAD, padding=(0, 0), pad_edge=False, caption_justify="left",
    )
    table.add_column("layer", justify="right")
    marks = []
    for column in columns:
        metric, unit = _ANALYSIS_HEADERS.get(column.label) or column.label.split(" ", 1)
        unit = unit.replace("block", "blk")
        table.add_column(f"{metric}\n{unit}{'↑' if column.important == 'high' else '↓'}", justify="right", min_width=5)
        order = column.importance().argsort(descending=True).tolist()
        marks.append({i: "bold" for i in order[:3]} | {i: "dim" for i in order[-3:]})
    for layer in range(result.num_layers):
        cells = []
        for column, mark in zip(columns, marks):
            text = format_value(column.values[layer], short=True)
            style = mark.get(layer)
            cells.append(f"[{style}]{text}[/{style}]" if style else text)
        table.add_row(str(layer), *cells)
    Console().print(table)


def _write_demo_summary(out: Path, skip_plan, quality, speed):
    from ..report.files import markdown_table, measure_label, settings_line

    names = list(speed["speed"])
    headers = ["config"] + [f"ppl {c}" for c in quality["perplexity"]] + [
        measure_label(m, speed["settings"]) for m in speed["speed"]["full"]]
    rows = []
    for name in names:
        plan_name = name.replace(" (layers deleted)", "")
        ppl = [f"{quality['perplexity'][c][plan_name]['perplexity']:.2f}" for c in quality["perplexity"]]
        times = [f"{r['tokens_per_s']:.1f} tok/s ({r['speedup']:.2f}x, ideal {r['ideal_speedup']:.2f}x)"
                 for r in speed["speed"][name].values()]
        rows.append([name] + ppl + times)
    (out / "summary.md").write_text(
        f"# skiplm demo: {skip_plan.describe()}\n\n{settings_line(speed['settings'])}.\n\n" + markdown_table(headers, rows)
        + "\nThe layers-deleted copy has the same perplexity as the plan (same computation).\n")


def _set_threads(threads):
    if threads:
        import torch

        torch.set_num_threads(threads)


def main():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cli(standalone_mode=False)
    except SkipLMError as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        console.print("aborted")
        sys.exit(130)


if __name__ == "__main__":
    main()
