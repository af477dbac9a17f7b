"""`skiplm heal`: heal a block plan with a registered healing method (:data:`skiplm.registry.HEALERS`) and write the
heal folder; optionally one line of held-out perplexity (full / unhealed / healed) on text the fit did not see."""

from __future__ import annotations

import time

import click

from ..registry import HEALERS
from .common import (
    MODEL_ARGUMENT,
    _load,
    _load_plan,
    _model_options,
    _progress,
    cli,
    console,
)
from .options import POSITIVE, Output


def _method_help() -> str:
    return f"healing method: {', '.join(HEALERS.names())}"


@cli.command()
@MODEL_ARGUMENT
@click.option("--plan", "plan_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="block plan to heal (skiplm plan)")
@click.option("--method", default="bridge", show_default=True, help=_method_help())
@click.option("--option", "extra_options", multiple=True, metavar="KEY=VALUE",
              help="an option of the method, e.g. --option ridge=1e-3 (repeatable)")
@click.option("--corpus", default="gsm8k", show_default=True, help="calibration text: gsm8k, pydoc, or a text file")
@click.option("--sequences", type=POSITIVE, help="calibration sequences  [default: per method; bridge 16]")
@click.option("--length", type=POSITIVE, help="tokens per calibration sequence  [default: per method; bridge 256]")
@click.option("--eval-corpus", "eval_corpora", multiple=True,
              help="held-out perplexity after healing on this corpus (repeatable; the calibration corpus is scored "
                   "on the tokens after the calibration slice)")
@click.option("--eval-tokens", type=POSITIVE, default=2048, show_default=True, help="tokens scored per --eval-corpus")
@click.option("--out", "-o", type=Output("folder"), required=True, help="heal folder to write")
@click.option("--force", is_flag=True, help="heal a plan even if made for other weights")
@_model_options
def heal(model, plan_path, method, extra_options, corpus, sequences, length, eval_corpora, eval_tokens, out, force,
         dtype, device):
    """Heal a block plan of MODEL (fit it back toward the full model) and write the heal folder."""
    from ..heal import heal as heal_plan
    from ..planners.common import load_calibration

    spec = HEALERS.get(method)
    options = spec.parse_options(extra_options)
    hf_model, tokenizer = _load(model, dtype, device)
    skip_plan = _load_plan(plan_path, hf_model, force)
    sequences = spec.calibration[0] if sequences is None else sequences
    length = spec.calibration[1] if length is None else length
    calibration = load_calibration(tokenizer, corpus, sequences, length)
    start = time.perf_counter()
    with _progress() as progress:
        task = progress.add_task(f"healing ({method})", total=None)
        healed = heal_plan(hf_model, skip_plan, method, calibration=calibration,
                           progress=lambda done, total: progress.update(task, completed=done, total=total), **options)
    elapsed = time.perf_counter() - start
    healed.save(out)
    console.print(f"{healed.describe()} — fitted on {sequences} x {length} tokens of {calibration.source} in "
                  f"{elapsed:.1f} s")
    for span, fit in zip(healed.spans, healed.fit):
        console.print(f"  blocks {span.start}..{span.end} (into {span.parameter}): relative error of the stream "
                      f"after the span {fit.get('residual_before', float('nan')):.4f} -> "
                      f"{fit.get('residual_after', float('nan')):.4f}")
    for name in eval_corpora:
        _held_out_line(hf_model, tokenizer, skip_plan, healed, name, eval_tokens,
                       skip=sequences * length if name == corpus else 0)
    console.print(f"wrote {out}")


def _held_out_line(model, tokenizer, plan, healed, corpus: str, tokens: int, skip: int) -> None:
    """Perplexity of the full, the unhealed and the healed model on ``tokens`` tokens of ``corpus`` after ``skip``."""
    from ..measure.perplexity import perplexity, tokenize_corpus
    from ..models.data import corpus_label, load_corpus
    from ..skipper import apply

    ids = tokenize_corpus(tokenizer, load_corpus(corpus), skip + tokens)[skip:]
    context = min(1024, ids.numel())
    stride = max(1, context // 2)
    scores = {"full": perplexity(model, ids, context=context, stride=stride).perplexity}
    with apply(model, plan, check_model=False):
        scores["unhealed"] = perplexity(model, ids, context=context, stride=stride).perplexity
    with apply(model, healed, check_model=False):
        scores["healed"] = perplexity(model, ids, context=context, stride=stride).perplexity
    where = f"{ids.numel() - 1} tokens" + (f" after the {skip} calibration tokens" if skip else "")
    click.echo(f"held-out perplexity, {corpus_label(corpus)} ({where}): full {scores['full']:.2f}, unhealed "
               f"{scores['unhealed']:.2f}, healed {scores['healed']:.2f}")
