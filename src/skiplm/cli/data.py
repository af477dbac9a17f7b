"""`skiplm self-generate`: text the full model writes itself, cached for distillation (:mod:`skiplm.train.data`)."""

from __future__ import annotations

import time

import click

from .common import MODEL_ARGUMENT, _load, _model_options, _progress, cli, console
from .options import NON_NEGATIVE, POSITIVE, TEMPERATURE, TOP_P, Output


# (the defaults are GenerationSettings', written out so --help imports no torch; tests/train/test_data.py checks them)
@cli.command("self-generate")
@MODEL_ARGUMENT
@click.option("--sequences", type=POSITIVE, default=256, show_default=True, help="how many sequences")
@click.option("--length", type=click.IntRange(min=8), default=256, show_default=True,
              help="tokens per sequence (prompt and generated; a row that ends early is padded)")
@click.option("--batch-size", type=POSITIVE, default=32, show_default=True, help="sequences generated at once")
@click.option("--temperature", type=TEMPERATURE, default=1.0, show_default=True, help="0 means greedy")
@click.option("--top-p", type=TOP_P, default=0.95, show_default=True)
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True)
@click.option("--chat-fraction", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="share of the sequences seeded from GSM8K chat prompts (the others from one random token)")
@click.option("--cache-dir", type=Output("folder"),
              help="where the generated batches are cached  [default: $SKIPLM_CACHE_DIR/self-generated, else "
                   "~/.cache/skiplm/self-generated]")
@click.option("--out", "-o", type=Output("file"), help="also write the sequences as a text file (blank-line separated)")
@_model_options
def self_generate_command(model, sequences, length, batch_size, temperature, top_p, seed, chat_fraction, cache_dir,
                          out, dtype, device):
    """Sequences MODEL generates itself (half from chat prompts, half from one random token), cached on disk: the
    data `heal` distills a skipped model on. An interrupted run resumes; a cache of more sequences serves fewer."""
    from ..models.generation import context_length
    from ..train.data import GenerationSettings, self_generated

    settings = GenerationSettings(sequences=sequences, length=length, batch_size=batch_size, temperature=temperature,
                                  top_p=top_p, seed=seed, chat_fraction=chat_fraction)
    hf_model, tokenizer = _load(model, dtype, device)
    context = context_length(hf_model)
    if context is not None and length > context:
        raise click.BadParameter(f"{length} is more than the model's context of {context} tokens: use {context} or "
                                 "less.", param_hint="--length")
    start = time.perf_counter()
    total = settings.batches * settings.batch_size
    with _progress() as progress:
        task = progress.add_task("self-generating", total=total)

        def report(done: int, total: int) -> None:
            elapsed = time.perf_counter() - start
            rate = done * length / elapsed if elapsed > 0 else 0.0
            progress.update(task, completed=done, description=f"self-generating ({rate:,.0f} tokens/s)")

        data = self_generated(hf_model, tokenizer, settings, cache_dir=cache_dir, progress=report)
    seconds = time.perf_counter() - start
    grid = len(data) * length
    click.echo(f"cache: {data.path}")
    click.echo(f"{len(data)} sequences x {length} tokens: {data.tokens:,} tokens ({data.generated_tokens:,} "
               f"generated, {grid - data.tokens:,} padding); {data.generated} generated now, "
               f"{len(data) - data.generated} from the cache")
    made = data.seconds
    click.echo(f"generation: {made:.1f} s, {grid / made if made > 0 else 0:,.0f} tokens/s "
               f"({data.generated_tokens / made if made > 0 else 0:,.0f} generated tokens/s); this run {seconds:.1f} s")
    click.echo(f"chat prompts used: {len(data.prompts)} of {settings.prompt_set} (indices "
               f"{_ranges(data.prompts)})" if data.prompts else "chat prompts used: none")
    if out:
        path = data.to_text_file(out)
        console.print(f"wrote {path}")


def _ranges(indices) -> str:
    if not indices:
        return "-"
    parts, start, previous = [], indices[0], indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == previous + 1:
            previous = i
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if i is not None:
            start = previous = i
    return ", ".join(parts)
