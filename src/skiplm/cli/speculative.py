"""`skiplm bench-speculative` and `skiplm draft-search`: self-speculative decoding measured; `skiplm draft-train`: a
skip-set draft trained toward the full model (a LoRA adapter beside its draft plan); `skiplm draft-cache`: the drafts'
weights kept on disk."""

from __future__ import annotations

import contextlib
import os

import click

from ..measure.rows import plan_names
from ..speculative.decoder import DEFAULT_MAX_DRAFT
from .options import IntList, Output
from .common import (MODEL_ARGUMENT, _command_line, _load, _load_plan, _model_options, _progress, _training_progress,
                     cli, console)

NO_DRAFT_CACHE = click.option(
    "--no-draft-cache", "no_draft_cache", is_flag=True,
    help="make every draft's weights from the model now instead of reading them from the draft cache "
         "(<skiplm cache>/drafts; as SKIPLM_DRAFT_CACHE=0)")


@contextlib.contextmanager
def _draft_cache_off(no_draft_cache: bool):
    """--no-draft-cache: the default draft cache off for every decoder made inside (the environment put back after,
    for in-process callers)."""
    from ..speculative.cache import ENVIRONMENT

    before = os.environ.get(ENVIRONMENT)
    if no_draft_cache:
        os.environ[ENVIRONMENT] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENVIRONMENT, None)
        else:
            os.environ[ENVIRONMENT] = before


@cli.command("bench-speculative")
@MODEL_ARGUMENT
@click.option("--draft-plan", "plan_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="a draft: the model under this plan (repeat for several)")
@click.option("--draft-dtype", "dtypes", multiple=True,
              help="a draft: a copy of the weights in this precision, full depth: bfloat16, float16, int8, "
                   "int8-dynamic; PRECISION:modules drafts through the model's own modules instead of the lean "
                   "engine (repeat for several)")
@click.option("--adapt", is_flag=True,
              help="also run each --draft-plan that records runner-up skip sets (from draft-search) with the skip set "
                   "chosen on the fly among them (SWIFT-style), as a draft named NAME-adapt")
@click.option("--prompt-lookup", "lookup", type=click.IntRange(min=1),
              help="also run every draft combined with n-gram prompt lookup of this length, as NAME+lookup")
@click.option("--prompts", "prompt_sets", default="gsm8k,pydoc", show_default=True,
              help="prompt sets: gsm8k (questions in the chat template), pydoc (64-token text chunks to continue)")
@click.option("--limit", default=8, show_default=True, type=click.IntRange(min=1), help="prompts per set")
@click.option("--batch-sizes", default="1,4,8", show_default=True, type=IntList(1), help="comma-separated batch sizes")
@click.option("--new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--max-draft", default=DEFAULT_MAX_DRAFT, show_default=True, type=click.IntRange(min=1))
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(min=1), help="rounds over every batch")
@click.option("--force", is_flag=True, help="use draft plans made for other weights")
@click.option("--draft-vocab", "draft_vocabs", type=IntList(0),
              help="comma-separated draft vocabulary sizes: every draft with a precision runs once per size, as "
                   "NAME-vN, proposing only the N most frequent tokens (lean engine; counted on the second half of "
                   "gsm8k and pydoc, cached); 0: the whole vocabulary, as NAME. Default: each draft plan's own")
@click.option("--out", "-o", type=Output("folder"), default="results/speculative", show_default=True)
@NO_DRAFT_CACHE
@_model_options
def bench_speculative(model, plan_paths, dtypes, adapt, lookup, prompt_sets, limit, batch_sizes, new_tokens, max_draft,
                      repeats, force, draft_vocabs, out, no_draft_cache, dtype, device):
    """Self-speculative decoding against plain greedy decoding in the same run: tokens/s, speedup, acceptance,
    fallbacks and identical output, per prompt set, batch size and draft (JSON, markdown, plot in --out)."""
    from ..errors import PlanError
    from ..report.files import machine_info
    from ..speculative.bench import bench_drafts, prompt_set, run_speculative_bench, write_bench
    from ..speculative.cache import enabled_by_environment

    if not plan_paths and not dtypes:
        raise PlanError("give a draft: --draft-plan PLAN (the layers it skips) and/or --draft-dtype DTYPE.")
    batches = batch_sizes  # (IntList: a tuple of sizes, each at least 1)
    hf_model, tokenizer = _load(model, dtype, device)
    from ..speculative.trained import load_adapter_for

    paths = plan_names(plan_paths)
    plans = {name: _load_plan(path, hf_model, force) for name, path in paths.items()}
    # a trained draft plan (draft-train, draft-search --train) drafts with its adapter
    adapters = {name: adapter for name, path in paths.items() if (adapter := load_adapter_for(path, plans[name]))}
    from ..speculative.vocab import resolve_draft_vocab

    # reduced-vocabulary draft heads: the sizes asked for (each draft once per size), else what each plan records
    rows = hf_model.get_output_embeddings().weight.shape[0]
    vocabs = [resolve_draft_vocab(tokenizer, size, vocab_size=rows) for size in draft_vocabs or ()]
    plan_vocabs = {} if draft_vocabs else {name: vocab for name, plan in plans.items()
                                           if (vocab := resolve_draft_vocab(tokenizer, None, plan, vocab_size=rows))}
    drafts = bench_drafts(plans, dtypes, adapt=adapt, lookup=lookup, adapters=adapters, vocabs=vocabs,
                          plan_vocabs=plan_vocabs)
    prompts = {name: prompt_set(tokenizer, name, limit) for name in prompt_sets.split(",") if name.strip()}
    with console.status("decoding") as status, _draft_cache_off(no_draft_cache):
        result = run_speculative_bench(hf_model, prompts, drafts, batch_sizes=batches, new_tokens=new_tokens,
                                       repeats=repeats, max_draft=max_draft, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id or 0,
                                       progress=lambda text: status.update(f"decoding: {text}"))
    settings = {"model": model, "command": _command_line(), "machine": machine_info(device), "limit": limit,
                "new_tokens": new_tokens, "max_draft": max_draft, "repeats": repeats, "batch_sizes": list(batches),
                "draft_cache": not no_draft_cache and enabled_by_environment()}
    console.print(write_bench(out, result, settings, f"self-speculative decoding, {model}"))
    console.print(f"wrote {out}/speculative.json, speculative.md, speculative.png")


@cli.command("draft-search")
@MODEL_ARGUMENT
@click.option("--max-blocks", default=6, show_default=True, type=click.IntRange(min=1),
              help="candidates: skip the 1..N blocks of lowest Block Influence (ranked on gsm8k calibration text)")
@click.option("--precisions", default="int8,int8-dynamic", show_default=True,
              help="draft precisions to combine with each skip set: float32 (the model's own weights), bfloat16, "
                   "float16, int8 (int8 weights, bfloat16 arithmetic), int8-dynamic (int8 weights and activations, "
                   "CPU only: skipped elsewhere); a copy in another precision also drafts at full depth. On the "
                   "default model every float32 skip set (1-4 blocks) was slower than plain decoding (0.74-0.87x), "
                   "hence the int8 precisions by default")
@click.option("--prompts", "prompt_source", default="gsm8k", show_default=True, type=click.Choice(["gsm8k", "pydoc"]),
              help="calibration prompts the candidates are timed on")
@click.option("--alternatives", default=2, show_default=True, type=click.IntRange(min=0),
              help="runner-up skip sets (same precision) to record in the draft plan for on-the-fly selection")
@click.option("--limit", default=3, show_default=True, type=click.IntRange(min=1), help="calibration prompts")
@click.option("--batch-sizes", default="1", show_default=True, type=IntList(1),
              help="comma-separated batch sizes to time every candidate at (the winner: the highest geometric mean "
                   "of its speedups); --limit must be at least the largest")
@click.option("--new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(min=1),
              help="timing rounds per candidate (median); more rounds tell closer candidates apart, and take longer")
@click.option("--max-draft", default=DEFAULT_MAX_DRAFT, show_default=True, type=click.IntRange(min=1))
@click.option("--train", "train_blocks", type=IntList(1), default=None,
              help="also train a LoRA adapter toward the full model for the skip sets of these many blocks (e.g. "
                   "2,4; one adapter per skip set, timed at every precision as skip-K-blocks-PRECISION-lora); the "
                   "training counts in the search's time. Training settings: --train-steps, --train-minutes, "
                   "--train-sequences, --rank (the data: text the model writes itself, cached)")
@click.option("--trained-plan", "trained_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="a trained draft plan made earlier (`skiplm draft-train`) as a candidate, at every precision "
                   "(repeat for several)")
@click.option("--train-steps", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--train-minutes", default=4.0, show_default=True, type=click.FloatRange(min=0),
              help="wall-time bound per adapter (0: none)")
@click.option("--train-sequences", default=128, show_default=True, type=click.IntRange(min=2),
              help="self-generated sequences of 256 tokens to train on (the last 8 held out)")
@click.option("--rank", default=16, show_default=True, type=click.IntRange(min=1), help="LoRA rank of --train")
@click.option("--draft-vocab", "draft_vocab", type=click.IntRange(min=0), default=0, show_default=True,
              help="every candidate proposes only the N most frequent tokens (a reduced-vocabulary head; counted on "
                   "the second half of gsm8k and pydoc, cached), recorded in the draft plan; 0: the whole vocabulary")
@click.option("--out", "-o", type=Output("file"), required=True, help="draft plan file to write (JSON)")
@NO_DRAFT_CACHE
@_model_options
def draft_search(model, max_blocks, precisions, prompt_source, alternatives, limit, batch_sizes, new_tokens, repeats,
                 max_draft, train_blocks, trained_paths, train_steps, train_minutes, train_sequences, rank, draft_vocab,
                 out, no_draft_cache, dtype, device):
    """Choose a self-speculative draft for MODEL by measurement: each candidate (a skip set and a precision) drafts
    whole generations on calibration prompts (at batch 1, or --batch-sizes), timed against plain greedy decoding in
    the same run; the fastest is saved as a draft plan (its precision included) for `generate --speculative --plan`
    and `bench-speculative --draft-plan`."""
    from ..speculative.search import run_draft_search, searchable_precisions

    asked = [p.strip() for p in precisions.split(",") if p.strip()]
    if not asked:
        raise click.UsageError("--precisions needs at least one precision, e.g. float32,int8.")
    if limit < max(batch_sizes):
        raise click.UsageError(f"--batch-sizes {max(batch_sizes)} needs at least that many calibration prompts: give "
                               f"--limit {max(batch_sizes)} or more (now {limit}).")
    hf_model, tokenizer = _load(model, dtype, device)
    usable, reasons = searchable_precisions(asked, next(hf_model.parameters()).device)
    for precision, reason in reasons.items():
        console.print(f"[yellow]not searching {precision} drafts: {reason}[/yellow]")
    if not usable:
        raise click.UsageError("none of --precisions can draft on this device; try --precisions int8.")
    import dataclasses

    from ..speculative.bench import Draft
    from ..speculative.trained import load_adapter_for

    trained = []
    for name, path in plan_names(trained_paths).items():
        plan = _load_plan(path, hf_model, False)
        adapter = load_adapter_for(path, plan)
        if adapter is None:
            raise click.UsageError(f"--trained-plan {path} names no trained adapter: give a plan from "
                                   "`skiplm draft-train` (or use it as an untrained candidate elsewhere).")
        for precision in usable:
            draft = {**(plan.provenance.get("draft") or {}), "precision": precision}
            trained.append(Draft(f"{name}-{precision}", plan=dataclasses.replace(
                plan, provenance={**plan.provenance, "draft": draft}), adapter=adapter))
    from ..speculative.vocab import draft_vocabulary

    vocab = draft_vocabulary(tokenizer, draft_vocab, vocab_size=hf_model.get_output_embeddings().weight.shape[0])
    trainer = None
    if train_blocks:
        trainer = _trainer(tokenizer, train_steps, train_minutes, train_sequences, rank)
    with console.status("searching") as status, _draft_cache_off(no_draft_cache):
        search = run_draft_search(hf_model, tokenizer, precisions=usable, max_blocks=max_blocks, prompts=prompt_source,
                                  alternatives=alternatives, limit=limit, new_tokens=new_tokens, repeats=repeats,
                                  max_draft=max_draft, name=model, train=tuple(train_blocks or ()), trained=trained,
                                  trainer=trainer, progress=status.update, vocab=vocab, batch_sizes=batch_sizes)
    search.save(out, command=_command_line())
    found = search.found
    several = len(found["batch_sizes"]) > 1
    for name, speedup in found["speedups"].items():
        per = ", ".join(f"b{b} {x:.3f}x" for b, x in found["by_batch"][name].items())
        console.print(f"{name}: {speedup:.3f}x{' (geometric mean; ' + per + ')' if several else ''}, "
                      f"{found['acceptance'][name]:.0%} of drafts accepted")
    verdict = ("beats plain decoding" if found["pays"] else
               "does not beat plain decoding here: speculation with it will mostly fall back to plain steps")
    console.print(f"best draft {search.best.name} ({search.plan.describe()}) {verdict}; search took "
                  f"{search.seconds:.1f} s")
    console.print(f"wrote {out}")


def _settings(steps: int, minutes: float, batch_size: int = 4, learning_rate: float = 5e-4, eval_every: int = 20,
              patience: int = 3, bf16: str = "auto", seed: int = 0):
    from ..train.distill import TrainSettings

    return TrainSettings(steps=steps, minutes=minutes or None, batch_size=batch_size, learning_rate=learning_rate,
                         warmup_steps=min(10, steps // 10), eval_every=eval_every, patience=patience,
                         bf16={"auto": None, "on": True, "off": False}[bf16], seed=seed)


def _training_data(hf_model, tokenizer, sequences: int, length: int, seed: int, bar: bool = True):
    """The model's own text to train a draft on (cached), with a progress bar while it is generated (``bar``)."""
    from ..speculative.trained import draft_training_data

    with _progress() if bar else contextlib.nullcontext() as progress:
        task = progress.add_task("self-generated data", total=sequences) if bar else None
        data = draft_training_data(hf_model, tokenizer, sequences=sequences, length=length, seed=seed,
                                   progress=(lambda done, total: progress.update(task, completed=done, total=total))
                                   if bar else None)
    where = "from the cache" if not data.generated else f"generated in {data.seconds:.0f} s"
    console.print(f"training data: {len(data)} x {length} tokens the model wrote itself ({where})")
    return data


def _training_line(adapter) -> str:
    record = adapter.record["training"]
    first, best = record["evaluations"][0], record["held_out"]
    return (f"trained {record['steps']} steps ({record['tokens']:,} tokens, {record['seconds']:.0f} s, stopped: "
            f"{record['stopped']}); held out: KL {first['kl']:.4f} -> {best['kl']:.4f}, acceptance proxy "
            f"sum(min(p, q)) {first['acceptance']:.3f} -> {best['acceptance']:.3f}, top-1 agreement "
            f"{first['agreement']:.3f} -> {best['agreement']:.3f}")


def _trainer(tokenizer, steps: int, minutes: float, sequences: int, rank: int):
    """``draft-search --train``: a function training one adapter per skip set on the same (cached) data."""
    from ..speculative.trained import train_draft

    data = None

    def trainer(hf_model, plan):
        nonlocal data
        if data is None:
            data = _training_data(hf_model, tokenizer, sequences, 256, 0, bar=False)  # (inside the search's status)
        adapter = train_draft(hf_model, plan, data, rank=rank, settings=_settings(steps, minutes))
        console.print(f"{plan.describe()}: {_training_line(adapter)}")
        return adapter

    return trainer


@cli.command("draft-train")
@MODEL_ARGUMENT
@click.option("--plan", "--draft-plan", "plan_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="the draft plan whose skip set is trained (from `skiplm draft-search` or `skiplm plan`)")
@click.option("--precision", default=None,
              help="the draft precision it will draft in (recorded in the plan written): float32, bfloat16, int8, "
                   "int8-dynamic; default: the plan's own (training is the same: the adapter is merged before the "
                   "weights are cast or quantized)")
@click.option("--rank", default=16, show_default=True, type=click.IntRange(min=1), help="LoRA rank")
@click.option("--alpha", default=0.0, show_default=True, type=click.FloatRange(min=0), help="LoRA alpha (0: 2 x rank)")
@click.option("--modules", default="all", show_default=True, type=click.Choice(["all", "attention", "mlp"]),
              help="which linear layers of the kept layers get the adapter")
@click.option("--steps", default=200, show_default=True, type=click.IntRange(min=1), help="optimizer steps at most")
@click.option("--minutes", default=4.0, show_default=True, type=click.FloatRange(min=0),
              help="wall-time bound on training (0: none)")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--learning-rate", default=5e-4, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--eval-every", default=20, show_default=True, type=click.IntRange(min=1),
              help="steps between held-out evaluations (and checkpoints)")
@click.option("--patience", default=3, show_default=True, type=click.IntRange(min=0),
              help="evaluations without a better held-out KL before stopping early (0: never)")
@click.option("--sequences", default=128, show_default=True, type=click.IntRange(min=2),
              help="sequences of text the model writes itself (cached; GSM8K questions from the end of the set and "
                   "random-token seeds: never the prompts bench-speculative decodes)")
@click.option("--length", default=256, show_default=True, type=click.IntRange(min=8), help="tokens per sequence")
@click.option("--held-out", default=8, show_default=True, type=click.IntRange(min=1),
              help="sequences kept out of training for the evaluations")
@click.option("--bf16", default="auto", show_default=True, type=click.Choice(["auto", "on", "off"]),
              help="bf16 autocast for training (auto: where the hardware has bf16 units)")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="keep checkpoints here (Ctrl-C stops with one; --resume continues)")
@click.option("--resume", is_flag=True, help="continue the interrupted run in --run-dir")
@click.option("--force", is_flag=True, help="use a draft plan made for other weights")
@click.option("--out", "-o", type=Output("file"), required=True,
              help="the trained draft plan to write (JSON); its adapter goes beside it, in OUT-without-.json.adapter/")
@_model_options
def draft_train(model, plan_path, precision, rank, alpha, modules, steps, minutes, batch_size, learning_rate,
                eval_every, patience, sequences, length, held_out, bf16, seed, run_dir, resume, force, out, dtype,
                device):
    """Train a skip-set draft toward the full model: a LoRA adapter on the layers the draft plan still runs,
    distilled by KL to the full model on text it writes itself (LayerSkip / Kangaroo-style; the acceptance of a
    drafted token is sum(min(p, q)), which the held-out evaluations report). The full model verifies unchanged, so
    speculative output stays identical to plain decoding; `generate --speculative --plan OUT` and
    `bench-speculative --draft-plan OUT` draft with the adapter."""
    import dataclasses

    from ..errors import PlanError
    from ..plan import SkipPlan
    from ..speculative.quantize import precision_name
    from ..speculative.trained import adapter_folder, save_trained_draft, train_draft

    if resume and run_dir is None:
        raise click.UsageError("--resume continues the run in --run-dir: give it.")
    hf_model, tokenizer = _load(model, dtype, device)
    plan = _load_plan(plan_path, hf_model, force)
    if not isinstance(plan, SkipPlan):
        raise PlanError(f"{plan_path} is not a skip plan: a draft is a static skip plan (skiplm plan, draft-search).")
    if plan.model is None or force:
        plan = plan.for_model(hf_model, model)
    chosen = precision_name(precision) if precision else ((plan.provenance.get("draft") or {}).get("precision")
                                                          or "float32")
    data = _training_data(hf_model, tokenizer, sequences, length, seed)
    with _training_progress("training the draft", command="draft-train", out=out, total=steps,
                            held_out=("acceptance",)) as report:
        adapter = train_draft(hf_model, plan, data, held_out=held_out, rank=rank, alpha=alpha, modules=modules,
                              precision=chosen, run_dir=run_dir, resume=resume, progress=report,
                              settings=_settings(steps, minutes, batch_size, learning_rate, eval_every, patience,
                                                 bf16, seed))
    draft = {**(plan.provenance.get("draft") or {}), "precision": chosen}
    draft.pop("alternatives", None)  # runner-up skip sets: the adapter was trained for this skip set only
    trained = dataclasses.replace(plan, provenance={**plan.provenance, "draft": draft,
                                                    "draft_train": {"command": _command_line()}})
    save_trained_draft(trained, adapter, out)
    console.print(_training_line(adapter))
    console.print(f"wrote {out} and its adapter {adapter_folder(out)}/ ({adapter.describe()}); draft with "
                  f"`skiplm generate {model} --speculative --plan {out}`")


@cli.command("draft-cache")
@click.option("--clear", is_flag=True, help="delete every entry")
def draft_cache(clear):
    """The draft cache: speculative drafts' weights (quantized or cast) made once per model, engine and precision and
    read back by later runs, in <skiplm cache>/drafts (SKIPLM_CACHE_DIR moves it; SKIPLM_DRAFT_CACHE=0 or
    --no-draft-cache turns it off). Lists the entries; --clear deletes them."""
    from ..speculative.cache import DraftCache

    cache = DraftCache()
    if clear:
        freed = cache.clear()
        console.print(f"cleared the draft cache {cache.root} ({freed / 2**20:.1f} MiB freed)")
        return
    entries = cache.entries()
    if not entries:
        console.print(f"the draft cache {cache.root} is empty")
        return
    for entry in entries:
        manifest = entry["manifest"] or {}
        key = manifest.get("key") or {}
        trained = f" (trained: {key['adapter']['method']} {key['adapter']['digest'][:12]})" if key.get("adapter") else ""
        what = (f"{(key.get('model') or {}).get('name')}: {key.get('precision')} draft{trained}, {key.get('engine')} "
                f"engine, torch {key.get('torch')}, made {manifest.get('created')}" if manifest else "unreadable manifest")
        click.echo(f"{entry['folder'].name}\t{entry['bytes'] / 2**20:.1f} MiB\t{what}")
    total = sum(entry["bytes"] for entry in entries)
    count = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
    console.print(f"{count}, {total / 2**20:.1f} MiB in {cache.root}; `skiplm draft-cache --clear` deletes them")
