"""What every command shares: the console, model loading, plan files, option parsers, the `skiplm` group and main()."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..errors import SkipLMError


console = Console(stderr=True)


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


def _command_line() -> str:
    """The command that is running, as a user would type it (stored in results; `skiplm report` shows it)."""
    return shlex.join(["skiplm", *sys.argv[1:]])


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
