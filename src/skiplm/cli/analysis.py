"""`skiplm analyze` (which layers matter) and `skiplm cola` (chains of layers per problem)."""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from .common import MODEL_ARGUMENT, _command_line, _load, _model_options, _progress, cli, console



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
