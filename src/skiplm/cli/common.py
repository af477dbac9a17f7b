"""What every command shares: the consoles, model loading, plan files, the options every model command takes
(``--device``, ``--dtype``, ``--threads``), the `skiplm` group and main(), which turns every error into one message
(see :func:`main`)."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
import traceback
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..errors import SkipLMError
from .options import DTYPE, POSITIVE, Device

console = Console(stderr=True)  # status, progress and messages
TRACEBACK_VARIABLE = "SKIPLM_TRACEBACK"  # set to 1: an unexpected error shows its full traceback (as --traceback)


MODEL_ARGUMENT = click.argument("model", default="smollm2-135m", required=False)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False,
    )


@contextlib.contextmanager
def _reporting():
    """A progress display and the callback the library's workflows report to, ``progress(description, done, total)``
    (:mod:`skiplm.measure.workflows`): a new bar for each stage, i.e. each new total."""
    with _progress() as progress:
        task, stage_total = None, None

        def report(description: str, done: int, total: int) -> None:
            nonlocal task, stage_total
            if task is None or total != stage_total:
                task, stage_total = progress.add_task(description, total=total), total
            progress.update(task, completed=done, description=description)

        yield report


@contextlib.contextmanager
def _training_progress(label, *, command: str, out, total: int | None = None, held_out: tuple[str, ...] = ("kl",)):
    """A progress bar for a training run (``skiplm.train.distill``) and the callback it reports to,
    ``report(done, total, info)``: ``label`` (a text, or ``label(done, info)``), then the loss, tokens/s and the last
    held-out evaluation's ``held_out`` measures. Ctrl-C (the run's ``TrainingInterrupted``, after a checkpoint) ends
    the command with exit code 130 and how to continue: ``skiplm COMMAND ... --out OUT --resume``."""
    from ..train.distill import TrainingInterrupted

    names = {"kl": ("held-out KL", ".4f"), "acceptance": ("held-out acceptance", ".3f")}
    with _progress() as progress:
        task = progress.add_task(label if isinstance(label, str) else label(0, None), total=total)

        def report(done, total, info=None):
            text = label if isinstance(label, str) else label(done, info)
            if info:
                text += f"  loss {info['loss']:.4f}  {info['tokens_per_second']:,.0f} tok/s"
                for key in held_out:
                    if f"held_out_{key}" in info:
                        name, spec = names[key]
                        text += f"  {name} {info[f'held_out_{key}']:{spec}}"
            progress.update(task, completed=done, total=total, description=text)

        try:
            yield report
        except TrainingInterrupted as exc:
            console.print(f"{exc} (skiplm {command} ... --out {out} --resume)")
            sys.exit(130)


def _print_table(headers: list[str], rows: list[list[str]], *, left_columns: int = 1, min_width: int | None = None,
                 **table_options) -> None:
    """A result table on stdout (the progress and messages go to stderr): the first ``left_columns`` columns left
    aligned, the numbers right aligned; ``table_options`` go to rich's Table (title, caption, box, ...)."""
    table = Table(**table_options)
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i < left_columns else "right", min_width=min_width)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def _load(model: str, dtype: str, device: str):
    from ..models.loading import load_model

    with console.status(f"loading {model} ({dtype}, {device})"):
        return load_model(model, dtype=dtype, device=device)


def _set_threads_option(ctx, param, threads):
    _set_threads(threads)


THREADS_OPTION = click.option(
    "--threads", type=POSITIVE, expose_value=False, callback=_set_threads_option,
    help="torch CPU threads  [default: torch's choice, one per core]; on a machine other work shares, fewer threads "
         "than cores is often much faster (a busy core stalls every step of a multi-threaded run)")


def _model_options(function):
    """``--device`` (checked: a device this torch can use), ``--dtype`` and ``--threads`` (set as soon as parsed):
    every command that loads and runs a model takes them."""
    function = THREADS_OPTION(function)
    function = click.option("--device", type=Device(), default="cpu", show_default=True,
                            help="torch device: cpu, cuda (or cuda:N), mps or xpu")(function)
    function = click.option("--dtype", type=DTYPE, default="float32", show_default=True,
                            help="the weights' precision")(function)
    return function


def _load_plan(path: str | None, model, force: bool, *, heal: bool = False):
    """A plan file or a policy file (`skiplm policy`) — with ``heal``, a heal folder (`skiplm heal`; what --heal
    gives) —, checked against ``model`` unless ``force``."""
    from ..skipper import load_skipper

    if path is None:
        return None
    if heal:
        from ..heal import load_healed

        plan = load_healed(path)
    else:
        plan = load_skipper(path)
    if not force:
        plan.check_model(model)
    return plan


# -- heal folders: a healed plan where a plan goes ---------------------------------------------------------------------
HEALED_SUFFIX = " (healed)"  # a heal folder's row: the folder's name and this (beside the row of the plan it heals)

HEAL_OPTION = click.option(
    "--heal", "heal_dir", type=click.Path(exists=True),
    help="heal folder made by `skiplm heal` (a plan and the weights that heal it), in place of --plan; checked "
         "against the model like a plan")
HEALS_OPTION = click.option(
    "--heal", "heal_dirs", multiple=True, type=click.Path(exists=True),
    help="heal folder made by `skiplm heal`: its healed plan as one more row, named after the folder with "
         f"'{HEALED_SUFFIX.strip()}', checked against the model like a plan (repeat for several). In a sweep or "
         "compare: one more point, at the target its plan was made for (else its ideal speedup), drawn as its own "
         "series with its own frontier")


def _plan_source(plan_path: str | None, heal_dir: str | None, *, required: bool = False) -> tuple[str | None, bool]:
    """What a single-plan command applies: (``--plan`` or ``--heal``, whether it is a heal folder), for
    :func:`_load_plan`. A heal folder carries its own plan, so both is a usage error, said before the model loads."""
    if plan_path is not None and heal_dir is not None:
        raise click.UsageError("--heal and --plan do not combine: a heal folder carries its own plan (the one it "
                               "heals); give one of them.")
    if required and plan_path is None and heal_dir is None:
        raise click.UsageError("give --plan PLAN or --heal DIR.")
    return (heal_dir, True) if heal_dir is not None else (plan_path, False)


def _load_skippers(plan_paths, heal_dirs, model, force: bool, *, reserved=None) -> dict:
    """The rows of a command that compares several skippers: each plan or policy file (named by
    :func:`~skiplm.measure.rows.plan_names`), then each heal folder (named after the folder, with
    :data:`HEALED_SUFFIX`), each checked against ``model`` unless ``force``. ``reserved``: names no plan may take
    (default: the full model's)."""
    from ..errors import DataError
    from ..heal import HEAL_FILE
    from ..measure.rows import FULL, plan_names

    reserved = (FULL,) if reserved is None else reserved
    rows = {name: _load_plan(p, model, force) for name, p in plan_names(plan_paths, reserved=reserved).items()}
    folders = [Path(d).parent if Path(d).name == HEAL_FILE else Path(d) for d in heal_dirs]  # a heal.json: its folder
    for name, folder in plan_names(folders, reserved=(), folders=True).items():
        if name + HEALED_SUFFIX in rows:
            raise DataError(f"plan file {name + HEALED_SUFFIX}.json takes the name of heal folder {folder}'s row: "
                            "rename the plan file.")
        rows[name + HEALED_SUFFIX] = _load_plan(folder, model, force, heal=True)
    return rows


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="skiplm")
@click.option("--traceback", "traceback_", is_flag=True,
              help=f"show the full traceback of an unexpected error (also: {TRACEBACK_VARIABLE}=1)")
def cli(traceback_):
    """Skip layers of Hugging Face decoder-only LLMs, and measure what each skip costs.

    MODEL is the shipped default `smollm2-135m`, a local model folder, a local .gguf file, or a hub id (needs a
    network).
    """
    # (--traceback is read by main(), which owns what an error shows)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import transformers

    from ..system import keep_freed_memory

    keep_freed_memory()

    transformers.utils.logging.disable_progress_bar()  # our own progress bars only


def _check_stride(stride: int, context: int) -> None:
    """Windows advance by less than their length (every scored token has context): checked before the model loads."""
    if stride >= context:
        raise click.BadParameter(f"{stride} is not less than --context {context}: windows advance by less than their "
                                 f"length (e.g. --stride {context // 2}).", param_hint="--stride")


def _command_line() -> str:
    """The command that is running, as a user would type it (stored in results; `skiplm report` shows it)."""
    return shlex.join(["skiplm", *sys.argv[1:]])


def _set_threads(threads):
    if threads:
        import torch

        torch.set_num_threads(threads)


def _error(message: str) -> None:
    console.print(f"[red]error:[/red] {message}", markup=True, highlight=False, soft_wrap=True)


def main():
    """The `skiplm` command. No traceback for anything a user can fix: a :class:`~skiplm.errors.SkipLMError` or a
    usage error is one message and exit code 2; a file the system refuses (``OSError``) is one message and exit 1;
    Ctrl-C exits 130. Anything else is a bug in skiplm: one line that says so (the exception's type and message),
    exit 1, and the full traceback with ``skiplm --traceback ...`` or ``SKIPLM_TRACEBACK=1``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    show_traceback = os.environ.get(TRACEBACK_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")
    try:
        with cli.make_context("skiplm", sys.argv[1:]) as ctx:  # what cli.main() does, with --traceback readable here
            show_traceback = show_traceback or ctx.params.get("traceback_", False)
            cli.invoke(ctx)
    except click.exceptions.Exit as exc:  # --help, --version
        sys.exit(exc.exit_code)
    except SkipLMError as exc:
        _error(_escape(str(exc)))
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except OSError as exc:
        if show_traceback:
            traceback.print_exc()
        _error(_escape(str(exc)))
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 (the last resort: a bug, said in one line)
        if show_traceback:
            traceback.print_exc()
            hint = ""
        else:
            hint = f" Run it again with `skiplm --traceback ...` (or {TRACEBACK_VARIABLE}=1) for the full traceback."
        _error(_escape(f"internal error, a bug in skiplm: {type(exc).__name__}: {exc}.{hint} Please report it "
                       "with the command you ran."))
        sys.exit(1)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
