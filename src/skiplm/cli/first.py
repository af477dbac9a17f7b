"""`skiplm first`: train FiRST routers (:mod:`skiplm.routers`) for a target decode speedup and write their folder.

The routers (and a LoRA adapter, as the paper trains) are distilled toward the full model on text the model
generated itself (``--data self``, cached, as ``skiplm heal`` uses) or on a corpus; the run folder (``OUT.run``,
checkpoints) lets Ctrl-C stop a run that ``--resume`` continues. The threshold is then calibrated so the routers skip
the blocks per sequence a measured latency model (``--costs latency``, what ``skiplm policy --speedup`` measures) or
the parameter-count cost model (``--costs params``) says the target needs. Use the folder like a policy file:
``skiplm bench/eval/generate --plan OUT/first.json``."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click

from ..registry import ROUTERS
from .common import MODEL_ARGUMENT, _load, _model_options, _training_progress, cli, console
from .options import POSITIVE, Output


def _options_help() -> str:
    return ", ".join(f"{o.name}={o.default}" for o in ROUTERS.get("first").options)


@cli.command("first")
@MODEL_ARGUMENT
@click.option("--speedup", type=click.FloatRange(min=1, min_open=True),
              help="target decode speedup at batch 1 (blocks per sequence from --costs)")
@click.option("--blocks", type=click.FloatRange(min=0, min_open=True),
              help="target blocks skipped per sequence, in place of --speedup")
@click.option("--costs", type=click.Choice(["latency", "params"]), default="latency", show_default=True,
              help="what turns --speedup into blocks: a latency model measured now on this device, or parameter counts")
@click.option("--data", "--corpus", "corpus", default="self", show_default=True,
              help="what to train on: 'self' (text the full model generates itself, cached), gsm8k, pydoc, or a text "
                   "file")
@click.option("--sequences", type=POSITIVE, default=136, show_default=True, help="sequences of training data")
@click.option("--length", type=POSITIVE, default=256, show_default=True, help="tokens per sequence")
@click.option("--steps", type=POSITIVE, help="optimizer steps at most (the same as --option steps=N)  [default: 200]")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), help="bound on training wall time")
@click.option("--protect-first", type=click.IntRange(min=0), help="first layers without a router  [default: layers/8]")
@click.option("--protect-last", type=click.IntRange(min=0), help="last layers without a router  [default: layers/16]")
@click.option("--option", "extra_options", multiple=True, metavar="KEY=VALUE",
              help="a training option (repeatable): " + _options_help())
@click.option("--out", "-o", type=Output("folder"), required=True, help="FiRST folder to write")
@click.option("--resume", is_flag=True, help="continue the interrupted training run of this --out (OUT.run)")
@_model_options
def first_command(model, speedup, blocks, costs, corpus, sequences, length, steps, minutes, protect_first,
                  protect_last, extra_options, out, resume, dtype, device):
    """Train FiRST routers for MODEL (per-sequence layer skipping decided at prefill) and write their folder."""
    from ..errors import SkipLMError
    from ..heal.train import _settings
    from ..routers import RouterError, train_first
    from ..train.distill import TrainError
    from .heal import _data, _training_lines

    if (speedup is None) == (blocks is None):
        raise click.UsageError("give exactly one of --speedup (e.g. 1.2) or --blocks (blocks skipped per sequence).")
    spec = ROUTERS.get("first")
    try:
        options = {**{o.name: o.default for o in spec.options}, **spec.parse_options(extra_options)}
    except SkipLMError as exc:
        raise click.BadParameter(str(exc), param_hint="--option") from None
    if steps is not None:
        options["steps"] = steps
    if minutes is not None:
        options["minutes"] = minutes
    try:
        _settings(options)  # refused before any model loads
    except TrainError as exc:
        raise click.BadParameter(str(exc), param_hint="--option") from None
    for name in ("held_out", "prompt_tokens"):
        if options[name] < 1:
            raise click.BadParameter(f"{name} must be a whole number >= 1, got {options[name]}.", param_hint="--option")
    if options["rank"] < 0:
        raise click.BadParameter(f"rank must be a whole number >= 0, got {options['rank']}.", param_hint="--option")
    run_dir = Path(f"{out}.run")
    if run_dir.exists() and not resume:
        raise click.UsageError(f"{run_dir} holds an interrupted training run of this --out: continue it with --resume, "
                               "or delete that folder to start over.")
    hf_model, tokenizer = _load(model, dtype, device)
    data, read = _data(hf_model, tokenizer, corpus, sequences, length, options["seed"])
    latency = None
    if speedup is not None and costs == "latency":
        from ..measure.latency import LatencyModel

        with console.status("measuring the latency of skipped blocks on this device"):
            latency = LatencyModel.measure(hf_model)
    start = time.perf_counter()
    def label(done, info):  # (after training, the threshold's calibration reports with no info)
        return "training FiRST routers" if info is not None or done == 0 else "calibrating the threshold"

    with _training_progress(label, command="first", out=out) as report:
        try:
            first = train_first(
                hf_model, data, speedup=speedup, blocks=blocks, latency=latency, rank=options["rank"],
                alpha=options["alpha"], modules=options["modules"], cost_weight=options["cost_weight"],
                prompt_tokens=options["prompt_tokens"], straight_through=options["straight_through"],
                protect_first=protect_first, protect_last=protect_last, held_out=options["held_out"],
                settings=_settings(options), run_dir=run_dir, resume=resume, progress=report)
        except RouterError as exc:
            raise click.UsageError(str(exc)) from None
    first.provenance.update({"data": read, "model_name": model})
    first.save(out)
    shutil.rmtree(run_dir, ignore_errors=True)
    console.print(f"{first.describe()} — on {read} in {time.perf_counter() - start:.1f} s")
    _training_lines(first.provenance["training"])
    console.print(f"wrote {out} (use it as --plan {Path(out) / 'first.json'})")
