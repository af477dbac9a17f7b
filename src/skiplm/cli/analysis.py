"""`skiplm analyze` (which layers matter) and `skiplm cola` (chains of layers per problem)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import MODEL_ARGUMENT, _command_line, _load, _model_options, _print_table, _progress, _reporting, cli, console
from .options import NON_NEGATIVE, Output


@cli.command("analyze")
@MODEL_ARGUMENT
@click.option("--corpus", default="gsm8k", show_default=True, help="calibration text: gsm8k, pydoc, or a text file")
@click.option("--sequences", default=8, show_default=True, type=click.IntRange(min=1), help="calibration sequences")
@click.option("--length", default=256, show_default=True, type=click.IntRange(min=2), help="tokens per sequence")
@click.option("--span-max", type=click.IntRange(min=1),
              help="largest span n of the angular distance between layer l and l+n  [default: layers // 4]")
@click.option("--skip-one/--no-skip-one", default=True, show_default=True,
              help="also measure skipping each attention / MLP / block alone (3 extra passes per layer)")
@click.option("--out", "-o", type=Output("folder"), default="results/analysis", show_default=True,
              help="output folder")
@_model_options
def analyze_command(model, corpus, sequences, length, span_max, skip_one, out, dtype, device):
    """Which layers and sublayers of MODEL matter: per-layer metrics on calibration text, as a table, JSON and plots."""
    from ..analysis.activations import calibration_batches
    from ..analysis.importance import analysis_steps, analyze, write_analysis
    from ..errors import DataError
    from ..measure.perplexity import tokenize_corpus
    from ..models.adapters import count_layers
    from ..models.data import corpus_label, load_corpus
    from ..report.files import machine_info

    text = load_corpus(corpus)
    hf_model, tokenizer = _load(model, dtype, device)
    label = corpus_label(corpus)
    ids = tokenize_corpus(tokenizer, text, sequences * length)
    try:
        batches = calibration_batches(ids, sequences, length)
    except DataError as exc:
        raise DataError(f"corpus {label}: {exc} Use a longer text, fewer --sequences or a shorter --length.") from None
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


_ANALYSIS_HEADERS = {"lens KL gain": ("lens", "gain"), "skip Δloss attn": ("Δloss", "attn"),
                     "skip Δloss mlp": ("Δloss", "mlp"), "skip Δloss block": ("Δloss", "blk")}


def _print_analysis(result):
    """Layers as rows, the main metrics as columns (fits 80 columns); per column the 3 most important layers bold,
    the 3 least dim."""
    from rich import box

    from ..report.files import format_value

    columns = [column for column in result.columns() if column.in_table]
    s = result.settings
    headers, marks = ["layer"], []
    for column in columns:
        metric, unit = _ANALYSIS_HEADERS.get(column.label) or column.label.split(" ", 1)
        unit = unit.replace("block", "blk")
        headers.append(f"{metric}\n{unit}{'↑' if column.important == 'high' else '↓'}")
        most, least = column.most_and_least_important(3)
        marks.append({i: "bold" for i in most} | {i: "dim" for i in least})
    rows = []
    for layer in range(result.num_layers):
        cells = []
        for column, mark in zip(columns, marks):
            text = format_value(column.values[layer], short=True)
            style = mark.get(layer)
            cells.append(f"[{style}]{text}[/{style}]" if style else text)
        rows.append([str(layer), *cells])
    _print_table(
        headers, rows, left_columns=0, min_width=5,
        title=f"{result.model_name}: per-layer metrics ({s['sequences']} x {s['length']} tokens of {s['corpus']})",
        caption="cos: cos(in, out) (LLM-Drop); BI: 1 - cos of the block (ShortGPT); rel: ||out - in|| / ||in|| "
                "(Csordás); ΔL2: | ||out|| - ||in|| | (LAC); lens gain: drop of the logit-lens KL at the layer; "
                "Δloss: loss increase when skipped alone (SLEB); ZD: share of weights with |z| > 1 (low: heavy tails). "
                "↑/↓: a high/low value marks an important layer; bold: the 3 most important per column, dim: the 3 "
                f"least. Full-model loss {result.full_loss:.3f}.",
        box=box.SIMPLE_HEAD, padding=(0, 0), pad_edge=False, caption_justify="left",
    )


@cli.command("cola")
@MODEL_ARGUMENT
@click.option("--limit", type=click.IntRange(min=1), default=4, show_default=True, help="GSM8K problems searched")
@click.option("--iterations", type=click.IntRange(min=1), default=300, show_default=True,
              help="MCTS iterations per problem (one forward pass per new chain)")
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True)
@click.option("--chat/--raw", default=True, show_default=True, help="wrap each problem in the model's chat template")
@click.option("--out", "-o", type=Output("folder"), default="results/cola", show_default=True,
              help="output folder")
@_model_options
def cola_command(model, limit, iterations, seed, chat, out, dtype, device):
    """CoLa: per-problem search over chains of layers (skip or loop each layer) — an analysis, not a runtime.

    Each GSM8K problem is given with its worked solution; the model must state the final number. A Monte Carlo
    Tree Search over skip / once / twice per layer finds the shortest chain that still gives the answer and, where
    the full model gets it wrong, a chain that gets it right. Costs one forward pass per distinct chain visited.
    """
    from ..analysis.cola import gsm8k_final_answer_samples, search_problems
    from ..report.files import cola_rows, markdown_table, write_cola

    hf_model, tokenizer = _load(model, dtype, device)
    samples = gsm8k_final_answer_samples(tokenizer, limit, chat=chat)
    with _reporting() as progress:
        found = search_problems(hf_model, samples, iterations=iterations, seed=seed,
                                progress=lambda done, total: progress("CoLa search", done, total))
    result = {"kind": "cola", "command": _command_line(), "model": model,
              "settings": {"limit": limit, "iterations": iterations, "seed": seed, "chat": chat}, **found}
    paths = write_cola(result, Path(out))
    console.print(markdown_table(*cola_rows(result)))
    console.print(f"wrote {paths['json']}, {paths['markdown']}")
