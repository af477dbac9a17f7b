"""`skiplm lora-drop`: train LoRA-Drop's corrections for a model and write the LoRA-Drop folder.

The folder (``lora-drop.json`` + ``corrections.safetensors``) is a skipper: ``skiplm generate --plan DIR/lora-drop.json``,
``skiplm eval --plan ...``, ``skiplm bench --plan ...`` take it as they take a policy file. Training reads text the
model generates itself (``--data self``, cached; the same text ``skiplm heal`` trains on) or a corpus; its run folder
(``OUT.run``) lets Ctrl-C stop a run that ``--resume`` continues, and is removed once the folder is written."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click

from .common import MODEL_ARGUMENT, _load, _model_options, _training_progress, cli, console
from .heal import SELF, _data, _training_lines
from .options import POSITIVE, IntList, Output


@cli.command("lora-drop")
@MODEL_ARGUMENT
@click.option("--anchor-every", "anchor_every", type=POSITIVE, required=True,
              help="K: a full computation (anchor) every K decode tokens; the others reuse it")
@click.option("--rank", type=POSITIVE, default=8, show_default=True, help="rank of each droppable layer's correction")
@click.option("--droppable", type=IntList(0), default=None,
              help="comma-separated droppable layers  [default: the paper's, index > 0 and index % 4 != 0]")
@click.option("--objective", type=click.Choice(["kl", "lm"]), default="kl", show_default=True,
              help="kl: toward the full model's distribution; lm: the paper's next-token loss on the data")
@click.option("--data", "--corpus", "corpus", default=SELF, show_default=True,
              help="what to train on: 'self' (text the full model generates itself, cached), gsm8k, pydoc, or a file")
@click.option("--sequences", type=POSITIVE, default=136, show_default=True, help="sequences of data")
@click.option("--length", type=POSITIVE, default=256, show_default=True, help="tokens per sequence")
@click.option("--held-out", "held_out", type=POSITIVE, default=8, show_default=True,
              help="sequences of the data kept out of training for the evaluations")
@click.option("--steps", type=POSITIVE, default=200, show_default=True, help="optimizer steps at most")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), help="bound on training wall time")
@click.option("--batch-size", type=POSITIVE, default=4, show_default=True, help="sequences per step")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--eval-every", type=POSITIVE, default=20, show_default=True,
              help="steps between held-out evaluations and checkpoints")
@click.option("--patience", type=click.IntRange(min=0), default=3, show_default=True,
              help="evaluations without a better held-out KL before stopping early (0: never)")
@click.option("--bf16", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="bf16 autocast while training")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--no-train", "no_train", is_flag=True,
              help="write the untrained skipper (no correction: pure reuse of the anchor's update)")
@click.option("--out", "-o", type=Output("folder"), required=True, help="LoRA-Drop folder to write")
@click.option("--resume", is_flag=True, help="continue the interrupted training run of this --out (OUT.run)")
@_model_options
def lora_drop(model, anchor_every, rank, droppable, objective, corpus, sequences, length, held_out, steps, minutes,
              batch_size, learning_rate, eval_every, patience, bf16, seed, no_train, out, resume, dtype, device):
    """Train LoRA-Drop (arXiv 2601.02569) for MODEL: droppable layers reuse their last anchor token's update plus a
    rank-r correction on all but every K-th decode token; write the folder."""
    from ..lora_drop import LoraDrop, train_lora_drop
    from ..models.adapters import count_layers
    from ..train.distill import TrainError, TrainSettings

    try:
        settings = TrainSettings(steps=steps, minutes=minutes, batch_size=batch_size, learning_rate=learning_rate,
                                 eval_every=eval_every, patience=patience,
                                 bf16={"auto": None, "on": True, "off": False}[bf16], seed=seed)
    except TrainError as exc:
        raise click.UsageError(str(exc)) from None
    if no_train and resume:
        raise click.UsageError("--resume continues a training run; --no-train has none.")
    if not no_train and sequences <= held_out:
        raise click.UsageError(f"--sequences ({sequences}) must be more than --held-out ({held_out}).")
    run_dir = Path(f"{out}.run")
    if not no_train and run_dir.exists() and not resume:
        raise click.UsageError(f"{run_dir} holds an interrupted training run of this --out: continue it with --resume, "
                               "or delete that folder to start over.")
    hf_model, tokenizer = _load(model, dtype, device)
    droppable = tuple(droppable) if droppable else None
    if no_train:
        skipper = LoraDrop(count_layers(hf_model), anchor_every, rank, droppable).for_model(hf_model, name=model)
        skipper.save(out)
        console.print(f"{skipper.describe()}\nwrote {out}")
        return
    data, read = _data(hf_model, tokenizer, corpus, sequences, length, seed)
    start = time.perf_counter()
    label = f"training LoRA-Drop corrections (K={anchor_every}, r={rank})"
    with _training_progress(label, command="lora-drop", out=out, total=steps) as report:
        skipper = train_lora_drop(hf_model, anchor_every, rank, calibration=data, held_out=held_out,
                                  droppable=droppable, objective=objective, settings=settings, run_dir=run_dir,
                                  resume=resume, progress=report, seed=seed, name=model)
    skipper.provenance["data"] = read
    skipper.save(out)
    shutil.rmtree(run_dir, ignore_errors=True)
    console.print(f"{skipper.describe()} — trained on {read} in {time.perf_counter() - start:.1f} s")
    _training_lines(skipper.provenance["training"])
    console.print(f"wrote {out}")
