"""`skiplm bench-speculative` and `skiplm draft-search`: self-speculative decoding measured; `skiplm draft-cache`: the
drafts' weights kept on disk."""

from __future__ import annotations

import contextlib
import os

import click

from ..measure.rows import plan_names
from ..speculative.decoder import DEFAULT_MAX_DRAFT
from .options import IntList, Output
from .common import MODEL_ARGUMENT, _command_line, _load, _load_plan, _model_options, cli, console

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
@click.option("--out", "-o", type=Output("folder"), default="results/speculative", show_default=True)
@NO_DRAFT_CACHE
@_model_options
def bench_speculative(model, plan_paths, dtypes, adapt, lookup, prompt_sets, limit, batch_sizes, new_tokens, max_draft,
                      repeats, force, out, no_draft_cache, dtype, device):
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
    plans = {name: _load_plan(path, hf_model, force) for name, path in plan_names(plan_paths).items()}
    drafts = bench_drafts(plans, dtypes, adapt=adapt, lookup=lookup)
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
@click.option("--new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(min=1),
              help="timing rounds per candidate (median); more rounds tell closer candidates apart, and take longer")
@click.option("--max-draft", default=DEFAULT_MAX_DRAFT, show_default=True, type=click.IntRange(min=1))
@click.option("--out", "-o", type=Output("file"), required=True, help="draft plan file to write (JSON)")
@NO_DRAFT_CACHE
@_model_options
def draft_search(model, max_blocks, precisions, prompt_source, alternatives, limit, new_tokens, repeats, max_draft, out,
                 no_draft_cache, dtype, device):
    """Choose a self-speculative draft for MODEL by measurement: each candidate (a skip set and a precision) drafts
    whole generations on calibration prompts at batch 1, timed against plain greedy decoding; the fastest is saved
    as a draft plan (its precision included) for `generate --speculative --plan` and `bench-speculative
    --draft-plan`."""
    from ..speculative.search import run_draft_search, searchable_precisions

    asked = [p.strip() for p in precisions.split(",") if p.strip()]
    if not asked:
        raise click.UsageError("--precisions needs at least one precision, e.g. float32,int8.")
    hf_model, tokenizer = _load(model, dtype, device)
    usable, reasons = searchable_precisions(asked, next(hf_model.parameters()).device)
    for precision, reason in reasons.items():
        console.print(f"[yellow]not searching {precision} drafts: {reason}[/yellow]")
    if not usable:
        raise click.UsageError("none of --precisions can draft on this device; try --precisions int8.")
    with console.status("searching") as status, _draft_cache_off(no_draft_cache):
        search = run_draft_search(hf_model, tokenizer, precisions=usable, max_blocks=max_blocks, prompts=prompt_source,
                                  alternatives=alternatives, limit=limit, new_tokens=new_tokens, repeats=repeats,
                                  max_draft=max_draft, name=model, progress=status.update)
    search.save(out, command=_command_line())
    found = search.found
    for name, speedup in found["speedups"].items():
        console.print(f"{name}: {speedup:.3f}x, {found['acceptance'][name]:.0%} of drafts accepted")
    verdict = ("beats plain decoding" if found["pays"] else
               "does not beat plain decoding here: speculation with it will mostly fall back to plain steps")
    console.print(f"best draft {search.best.name} ({search.plan.describe()}) {verdict}; search took "
                  f"{search.seconds:.1f} s")
    console.print(f"wrote {out}")


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
        what = (f"{(key.get('model') or {}).get('name')}: {key.get('precision')} draft, {key.get('engine')} engine, "
                f"torch {key.get('torch')}, made {manifest.get('created')}" if manifest else "unreadable manifest")
        click.echo(f"{entry['folder'].name}\t{entry['bytes'] / 2**20:.1f} MiB\t{what}")
    total = sum(entry["bytes"] for entry in entries)
    count = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
    console.print(f"{count}, {total / 2**20:.1f} MiB in {cache.root}; `skiplm draft-cache --clear` deletes them")
