"""`skiplm bench --sweep`, `skiplm compare` and `skiplm report`: methods x targets, side by side."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..registry import PLANNERS, POLICIES
from ..sweep.compare import default_methods
from ..sweep.settings import SweepSettings
from .common import (HEALS_OPTION, MODEL_ARGUMENT, _check_stride, _command_line, _load, _load_skippers, _model_options,
                     cli, console)
from .options import NON_NEGATIVE, POSITIVE, FloatList, Output


def _methods_help(what: str) -> str:
    policies = ", ".join(POLICIES.names()) or "none registered"
    return (f"{what}comma-separated methods: any of {', '.join(PLANNERS.names())}; the policies {policies} are "
            "calibrated per target")


DEFAULT_METHODS = ",".join(default_methods())


class _Names(click.ParamType):
    """Comma-separated names (empty: none), as a tuple; SweepSettings.check says which are unknown."""

    name = "names"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        return tuple(part.strip() for part in str(value).split(",") if part.strip())


# settings without a minimum in SweepSettings that still have one, and those that are not numbers
_SETTING_TYPES = {"seed": NON_NEGATIVE, "tasks": _Names()}


def _setting_option(field) -> click.Option:
    """The ``bench --sweep`` option of one :class:`~skiplm.sweep.settings.SweepSettings` field."""
    flag = field.metadata["flag"] or f"--{field.name.replace('_', '-')}"
    kind = click.IntRange(min=field.metadata["minimum"]) if field.metadata["minimum"] is not None else None
    kind = _SETTING_TYPES.get(field.name, kind)
    default = ",".join(field.default) if isinstance(field.default, tuple) else field.default
    return click.option(flag, field.name, type=kind, default=default, show_default=default not in ("", None),
                        help=f"--sweep: {field.metadata['help']}")


_SWEEP_OPTIONS = [
    click.option("--fresh", is_flag=True, help="--sweep: discard the finished points and plans in -o and start over"),
    *[_setting_option(field) for field in reversed(SweepSettings.options())],
    click.option("--targets", type=FloatList(), default="1.1,1.2,1.3", show_default=True,
                 help="--sweep: comma-separated target speedups, each greater than 1"),
    click.option("--methods", default=DEFAULT_METHODS, show_default=True, help=_methods_help("--sweep: ")),
    click.option("--sweep", is_flag=True,
                 help="the scoreboard: plan every method at every target and measure quality and speed against the "
                      "full model, resumable (results in -o, default results/sweep)"),
]
# the options only a sweep takes (a plain bench refuses them)
_SWEEP_PARAMS = ("methods", "targets", "fresh", *(field.name for field in SweepSettings.options()))


def _sweep_options(function):
    for option in _SWEEP_OPTIONS:
        function = option(function)
    return function


def _given(ctx, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)


def _check_sweep_options(ctx, sweep: bool) -> None:
    """Sweep options only with --sweep; options of a plain bench that a sweep does not take, refused with it."""
    if not sweep:
        given = [p.opts[0] for p in ctx.command.params if p.name in _SWEEP_PARAMS and _given(ctx, p.name)]
        if given:
            raise click.UsageError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} with --sweep.")
        return
    for name, option, why in (("plan_paths", "--plan", "a sweep makes its own plans (see --methods, --targets)"),
                              ("compare_pruned", "--compare-pruned", "a sweep times each plan against the full model"),
                              ("force", "--force", "a sweep's plans are made for the model, and its heal folders "
                                                   "must be too"),
                              ("decode_prompts", "--decode-prompts", "a sweep decodes after chunks of GSM8K text")):
        if _given(ctx, name):
            raise click.UsageError(f"{option} does not apply with --sweep: {why}.")


def _sweep(ctx, model, heal_dirs, batch_sizes, prompt_tokens, decode_prompt_tokens, new_tokens, repeats, warmup, out,
           dtype, device, *, methods, targets, fresh, **settings):
    import datetime

    from ..errors import SkipLMError
    from ..files import check_output
    from ..measure.agreement import load_prompts
    from ..measure.speed import BenchSettings
    from ..sweep.core import SweepProgress, run_sweep
    from ..sweep.settings import is_full_model
    from ..sweep.tables import compact_table

    out = Path("results/sweep" if not _given(ctx, "out") else out)
    if not _given(ctx, "out"):  # (-o's own check ran on the plain bench's default)
        try:
            check_output(out, kind="folder")
        except SkipLMError as exc:
            raise click.BadParameter(str(exc), param_hint="--out") from None
    settings = SweepSettings(
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
        targets=targets,
        bench=BenchSettings(batch_sizes, prompt_tokens, decode_prompt_tokens, new_tokens, repeats, warmup),
        **settings,
    )
    if not settings.tasks:
        given = [f"--{name.replace('_', '-')}" for name in ("task_limit", "task_max_tokens") if _given(ctx, name)]
        if given:
            raise click.UsageError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} with --tasks "
                                   "(e.g. --tasks skiplm_gsm8k,skiplm_gpqa_diamond).")
    settings.check()  # bad settings fail before the model loads
    load_prompts(settings.prompts, settings.limit)
    hf_model, tokenizer = _load(model, dtype, device)
    healed = _load_skippers((), heal_dirs, hf_model, force=False)
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
                target = "" if is_full_model(record) else f" @ {record['target']:g}"
                remaining = bar.tasks[self.task].time_remaining
                eta = "" if remaining is None else f", eta {datetime.timedelta(seconds=round(remaining))}"
                console.print(f"finished {record['method']}{target} ({self.done} of {self.points}{eta}); saved to "
                              f"{out}/points.jsonl")

        try:
            result = run_sweep(hf_model, tokenizer, settings, out, model_name=model, dtype=dtype, device=device,
                               command=command, fresh=fresh, healed=healed, progress=Report())
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


@cli.command()
@MODEL_ARGUMENT
@click.option("--methods", default=DEFAULT_METHODS, show_default=True, help=_methods_help(""))
@click.option("--targets", type=FloatList(1.0, minimum_open=True), default="1.1,1.2,1.3,1.5", show_default=True,
              help="comma-separated target speedups, each greater than 1")
@click.option("--calibration-corpus", default="gsm8k", show_default=True, help="text the planners are fitted on")
@click.option("--eval-corpus", multiple=True, default=("pydoc", "gsm8k"), show_default=True,
              help="held-out text for perplexity (repeatable; the first is the table's and the plot's; the "
                   "calibration corpus is scored on the tokens after the calibration text)")
@click.option("--sequences", type=POSITIVE, default=1, show_default=True, help="calibration sequences")
@click.option("--length", type=POSITIVE, default=1024, show_default=True,
              help="tokens per calibration sequence (default: the held-out context)")
@click.option("--tokens", type=POSITIVE, default=4096, show_default=True, help="held-out tokens scored")
@click.option("--context", type=click.IntRange(min=2), default=1024, show_default=True, help="window length")
@click.option("--stride", type=POSITIVE, default=512, show_default=True, help="window advance (less than --context)")
@click.option("--repeats", type=POSITIVE, default=5, show_default=True, help="paired timing rounds per plan")
@click.option("--new-tokens", type=POSITIVE, default=32, show_default=True, help="decode steps per timing")
@click.option("--out", "-o", type=Output("folder"), default="results/compare", show_default=True, help="output folder")
@HEALS_OPTION
@click.option("--force", is_flag=True, help="use heal folders even if made for other weights")
@_model_options
def compare(model, methods, targets, calibration_corpus, eval_corpus, sequences, length, tokens, context, stride,
            repeats, new_tokens, out, heal_dirs, force, dtype, device):
    """Every planner at every target: held-out perplexity vs measured decode speedup, one run (table + Pareto plot);
    heal folders beside them."""
    from ..sweep.compare import run_compare, write_compare

    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    target_list = list(targets)
    _check_stride(stride, context)
    hf_model, tokenizer = _load(model, dtype, device)
    healed = _load_skippers((), heal_dirs, hf_model, force)
    with console.status("planning") as status:
        result = run_compare(hf_model, tokenizer, method_list, target_list, model_name=model, healed=healed,
                             calibration_corpus=calibration_corpus, eval_corpus=list(eval_corpus), sequences=sequences,
                             length=length, tokens=tokens, context=context, stride=stride, repeats=repeats,
                             new_tokens=new_tokens, device=device, command=_command_line(), progress=status.update)
    table = write_compare(result, out)
    console.print(table)
    console.print(f"results in {Path(out)}/")


@cli.command("report")
@click.argument("results", nargs=-1, required=True, type=click.Path())
@click.option("--out", "-o", type=Output("file"), default="report.html", show_default=True,
              help="HTML file to write")
@click.option("--title", default="skiplm report", show_default=True, help="page title")
def report_command(results, out, title):
    """One self-contained HTML page (tables, embedded plots, plan grids, commands, machine) from RESULTS: folders or
    JSON files written by bench --sweep, compare, bench, eval and agree."""
    from ..report.html import write_report

    path = write_report(results, out, title)
    console.print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB, no external references)")
