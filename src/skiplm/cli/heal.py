"""`skiplm heal`: heal a block plan with a registered healing method (:data:`skiplm.registry.HEALERS`) — or a
combination such as ``bridge+lora`` — and write the heal folder; optionally held-out perplexity (full / unhealed /
healed) on text the healing did not see.

Training methods (``lora``, ``partial``) train on text the full model generates itself (``--data self``, cached on
disk) or on a corpus; their run folder (``OUT.run``, checkpoints) lets Ctrl-C stop a run that ``--resume``
continues, and is removed once the heal folder is written."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click

from ..registry import HEALERS
from .common import (
    MODEL_ARGUMENT,
    _load,
    _load_plan,
    _model_options,
    _progress,
    _training_progress,
    cli,
    console,
)
from .options import POSITIVE, Output

SELF = "self"


def _method_help() -> str:
    return f"healing method: {', '.join(HEALERS.names())}, or a combination such as bridge+lora"


def _options_help() -> str:
    return "; ".join(f"{spec.name}: " + ", ".join(f"{o.name}={o.default}" for o in spec.options) for spec in HEALERS)


@cli.command()
@MODEL_ARGUMENT
@click.option("--plan", "plan_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="block plan to heal (skiplm plan)")
@click.option("--method", default="bridge", show_default=True, help=_method_help())
@click.option("--option", "extra_options", multiple=True, metavar="KEY=VALUE",
              help="an option of the method(s), e.g. --option ridge=1e-3, --option steps=300 (repeatable). "
                   + _options_help())
@click.option("--data", "--corpus", "corpus", default=None,
              help="what to fit or train on: 'self' (text the full model generates itself, cached), gsm8k, pydoc, "
                   "or a text file  [default: self for training methods, gsm8k for bridge]")
@click.option("--sequences", type=POSITIVE, help="sequences of data  [default: per method; bridge 16, lora 136]")
@click.option("--length", type=POSITIVE, help="tokens per sequence  [default: per method; 256]")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True),
              help="bound on training wall time (training methods; the same as --option minutes=...)")
@click.option("--eval-corpus", "eval_corpora", multiple=True,
              help="held-out perplexity after healing on this corpus (repeatable; a corpus the healing read is "
                   "scored on the tokens after what it read)")
@click.option("--eval-tokens", type=POSITIVE, default=2048, show_default=True, help="tokens scored per --eval-corpus")
@click.option("--out", "-o", type=Output("folder"), required=True, help="heal folder to write")
@click.option("--resume", is_flag=True, help="continue the interrupted training run of this --out (OUT.run)")
@click.option("--force", is_flag=True, help="heal a plan even if made for other weights")
@_model_options
def heal(model, plan_path, method, extra_options, corpus, sequences, length, minutes, eval_corpora, eval_tokens, out,
         resume, force, dtype, device):
    """Heal a block plan of MODEL (fit or train it back toward the full model) and write the heal folder."""
    from ..heal import heal as heal_plan
    from ..heal import methods
    names = _methods(methods, method)
    specs = [HEALERS.get(name) for name in names]
    options = _parse_options(specs, extra_options)
    trains = any(spec.extra.get("trains") for spec in specs)
    for spec in specs:
        if spec.extra.get("trains"):
            _check_training(spec.name, {k: v for k, v in options.items() if k in {o.name for o in spec.options}})
    if minutes is not None:
        if not trains:
            raise click.UsageError("--minutes bounds a training method's time; the bridge fits in seconds.")
        options["minutes"] = minutes
    if resume and not trains:
        raise click.UsageError("--resume continues a training run; the bridge has none.")
    corpus = corpus or (SELF if trains else "gsm8k")
    default = max((spec.calibration for spec in specs), key=lambda c: c[0])
    sequences = default[0] if sequences is None else sequences
    length = default[1] if length is None else length
    run_dir = Path(f"{out}.run")
    if trains and run_dir.exists() and not resume:
        raise click.UsageError(f"{run_dir} holds an interrupted training run of this --out: continue it with --resume, "
                               "or delete that folder to start over.")
    hf_model, tokenizer = _load(model, dtype, device)
    skip_plan = _load_plan(plan_path, hf_model, force)
    data, read = _data(hf_model, tokenizer, corpus, sequences, length, options.get("seed", 0))
    start = time.perf_counter()
    with _training_progress(f"healing ({method})", command="heal", out=out) as report:
        healed = heal_plan(hf_model, skip_plan, method, calibration=data, progress=report,
                           run_dir=run_dir if trains else None, resume=resume, **options)
    elapsed = time.perf_counter() - start
    healed.save(out)
    if trains:
        shutil.rmtree(run_dir, ignore_errors=True)
    console.print(f"{healed.describe()} — on {read} in {elapsed:.1f} s")
    for span, fit in zip(healed.spans, healed.fit):
        console.print(f"  blocks {span.start}..{span.end} (into {span.parameter}): relative error of the stream "
                      f"after the span {fit.get('residual_before', float('nan')):.4f} -> "
                      f"{fit.get('residual_after', float('nan')):.4f}")
    if trains:
        _training_lines(healed.provenance[names[-1]]["training"])
    for name in eval_corpora:
        _held_out_line(hf_model, tokenizer, skip_plan, healed, name, eval_tokens,
                       skip=sequences * length if name == corpus else 0)
    console.print(f"wrote {out}")


def _methods(methods, method: str) -> list[str]:
    from ..errors import SkipLMError

    try:
        return methods(method)
    except SkipLMError as exc:
        raise click.BadParameter(str(exc), param_hint="--method") from None


def _check_training(method: str, options: dict) -> None:
    from ..heal.spans import HealError
    from ..heal.train import check_training_options

    try:
        check_training_options(method, options)
    except HealError as exc:
        raise click.BadParameter(str(exc), param_hint="--option") from None


def _parse_options(specs, pairs) -> dict:
    """``--option key=value`` pairs, each typed by the method that has that option."""
    from ..errors import SkipLMError

    values = {}
    for pair in pairs:
        key = pair.partition("=")[0].strip().replace("-", "_")
        owner = next((spec for spec in specs if key in {o.name for o in spec.options}), specs[-1])
        try:
            values.update(owner.parse_options([pair]))
        except SkipLMError as exc:
            raise click.BadParameter(str(exc), param_hint="--option") from None
    return values


def _data(model, tokenizer, corpus: str, sequences: int, length: int, seed: int):
    """The token-id sequences to heal on and a description of them."""
    from ..planners.common import load_calibration

    if corpus != SELF:
        calibration = load_calibration(tokenizer, corpus, sequences, length, model=model)
        return calibration, f"{sequences} x {length} tokens of {calibration.source}"
    from ..train.data import GenerationSettings, self_generated

    settings = GenerationSettings(sequences=sequences, length=length, seed=seed)
    with _progress() as progress:
        task = progress.add_task("self-generated data", total=sequences)
        data = self_generated(model, tokenizer, settings,
                              progress=lambda done, total: progress.update(task, completed=done, total=total))
    where = "from the cache" if not data.generated else f"generated in {data.seconds:.0f} s"
    return data, (f"{len(data)} x {length} tokens the model generated itself ({data.generated_tokens:,} generated "
                  f"tokens, {where}; {data.path})")


def _training_lines(record: dict) -> None:
    first, best = record["evaluations"][0], record["held_out"]
    console.print(f"  trained {record['steps']} steps ({record['tokens']:,} tokens, {record['seconds'] / 60:.1f} min, "
                  f"stopped: {record['stopped']}; best step {record['best_step']}), on held-out sequences of the "
                  f"same data: KL to the full model {first['kl']:.4f} -> {best['kl']:.4f}, acceptance "
                  f"{first['acceptance']:.3f} -> {best['acceptance']:.3f}, top-1 agreement "
                  f"{first['agreement']:.3f} -> {best['agreement']:.3f}")


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
    where = f"{ids.numel() - 1} tokens" + (f" after the {skip} tokens healing read" if skip else "")
    click.echo(f"held-out perplexity, {corpus_label(corpus)} ({where}): full {scores['full']:.2f}, unhealed "
               f"{scores['unhealed']:.2f}, healed {scores['healed']:.2f}")
