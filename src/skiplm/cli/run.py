"""`skiplm generate`, `export`, `info` and `demo`: run a plan or policy, save a pruned model, the main job."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..speculative.decoder import DEFAULT_MAX_DRAFT
from .common import (HEAL_OPTION, MODEL_ARGUMENT, _command_line, _load, _load_plan, _model_options, _plan_source,
                     _reporting, cli, console)
from .options import NON_NEGATIVE, POSITIVE, TEMPERATURE, TOP_K, TOP_P, Output


@cli.command()
@MODEL_ARGUMENT
@click.option("--plan", "--draft-plan", "plan_path", type=click.Path(exists=True, dir_okay=False),
              help="plan file (with --speculative: the draft's plan)")
@HEAL_OPTION
@click.option("--merge", is_flag=True,
              help="--heal: bake the heal into the weights for good before generating (faster for LoRA-healed "
                   "models, whose adapters otherwise run beside their layers; the full model's weights are then gone "
                   "for this process)")
@click.option("--prompt", "-p", required=True, help="the user message")
@click.option("--max-new-tokens", type=POSITIVE, default=128, show_default=True, help="tokens to generate at most")
@click.option("--chat/--raw", default=True, show_default=True, help="wrap the prompt in the model's chat template")
@click.option("--temperature", type=TEMPERATURE, default=0.0, show_default=True, help="0 = greedy")
@click.option("--top-p", type=TOP_P, default=1.0, show_default=True,
              help="sample from the most likely tokens whose probabilities add up to this (0 < p <= 1; 1: off)")
@click.option("--top-k", type=TOP_K, default=0, show_default=True,
              help="keep the k most likely tokens when sampling (0: off; without --speculative, 0 keeps the model's "
                   "generation config)")
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True)
@click.option("--speculative", is_flag=True,
              help="lossless self-speculative decoding: the model under --plan (and/or --draft-dtype) drafts, the full "
                   "model verifies; the output is the full model's")
@click.option("--max-draft", type=POSITIVE, default=DEFAULT_MAX_DRAFT, show_default=True,
              help="--speculative: most tokens drafted per round (fewer when the draft is unsure)")
@click.option("--adapt", is_flag=True,
              help="--speculative: choose the draft's skip set on the fly (SWIFT-style) among the draft plan and the "
                   "runner-ups `skiplm draft-search` recorded in it")
@click.option("--draft-dtype", help="--speculative: draft with a copy of the weights in this precision: bfloat16, "
                                    "float16, int8 (int8 weights, bfloat16 arithmetic) or int8-dynamic (int8 weights "
                                    "and activations); default: the one a draft plan from `skiplm draft-search` "
                                    "names, else the model's own weights")
@click.option("--prompt-lookup", type=NON_NEGATIVE, default=3, show_default=True,
              help="--speculative: when the last N tokens occurred earlier in the text, draft what followed them "
                   "(n-gram prompt lookup, no draft forward), kept only while it pays; 0: off")
@click.option("--draft-engine", type=click.Choice(["auto", "lean", "modules"]), default="auto", show_default=True,
              help="--speculative with a draft precision: run the copy through skiplm's lean forward (fused "
                   "products, in-place cache; Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, OLMo 2, Granite) or through "
                   "the model's own modules; auto: lean "
                   "where the family allows")
@click.option("--no-draft-cache", "no_draft_cache", is_flag=True,
              help="--speculative: make the draft's weights from the model now instead of reading them from the "
                   "draft cache (<skiplm cache>/drafts, filled by the first run; `skiplm draft-cache --clear` empties "
                   "it; SKIPLM_DRAFT_CACHE=0 turns it off for every command)")
@click.option("--draft-vocab", "draft_vocab", type=NON_NEGATIVE, default=None,
              help="--speculative: the draft proposes only the N most frequent tokens (counted on the second half of "
                   "the gsm8k and pydoc corpora, cached), so its output head is N rows instead of the whole "
                   "vocabulary (lean engine); lossless (the full model verifies); 0: the whole vocabulary; default: "
                   "what a draft plan from `skiplm draft-search --draft-vocab` records, else the whole vocabulary")
@click.option("--policy", "policy_path", help="input-adaptive policy file made by `skiplm policy` (ffn-skip, lac)")
@click.option("--activation-map", type=Output("file"),
              help="--policy: write which layers ran for which tokens to this PNG (and a JSON next to it)")
@click.option("--truncate-prompt", is_flag=True,
              help="keep only the prompt's last tokens that fit the model's context (else a longer prompt is refused)")
@click.option("--force", is_flag=True, help="apply the plan (or heal folder) even if made for other weights")
@_model_options
def generate(model, plan_path, heal_dir, merge, prompt, max_new_tokens, chat, temperature, top_p, top_k, seed,
             speculative, max_draft, adapt, draft_dtype, prompt_lookup, draft_engine, no_draft_cache, draft_vocab,
             policy_path, activation_map, truncate_prompt, force, dtype, device):
    """Generate text with MODEL (under a plan or a heal folder if given, or speculatively with --speculative),
    streaming to stdout."""
    import torch
    from transformers import TextStreamer

    from ..errors import DataError, PlanError
    from ..models.generation import fit_context
    from ..skipper import apply

    if not prompt.strip():
        raise DataError("the prompt is empty: pass some text with --prompt.")
    source, heal = _plan_source(plan_path, heal_dir)
    if heal and speculative:
        raise click.UsageError("--speculative does not take a heal folder as the draft yet: give the unhealed plan "
                               "with --plan (the full model verifies, so the output is the same).")
    if merge and not heal:
        raise click.UsageError("--merge bakes a heal folder into the weights: give --heal DIR.")
    policy = None
    if policy_path is not None:
        policy = _policy_file(policy_path, source, speculative)
    elif activation_map:
        raise PlanError("--activation-map records what a --policy decided; give a --policy.")
    hf_model, tokenizer = _load(model, dtype, device)
    skip_plan = _load_plan(source, hf_model, force, heal=heal)
    if policy is not None:
        if not force:
            policy.check_model(hf_model)
        skip_plan = policy
    if chat and tokenizer.chat_template:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    # a prompt beyond the context: refused, both lengths said (or cut to its last tokens that fit, when asked)
    inputs = fit_context(hf_model, inputs, max_new_tokens, truncate=truncate_prompt)
    torch.manual_seed(seed)
    if speculative:
        from ..speculative import draft_alternatives, draft_precision
        from ..speculative.decoder import generate as speculative_generate

        if draft_dtype is None and skip_plan is None:
            raise PlanError("--speculative needs a draft: a --plan (the layers the draft skips) and/or --draft-dtype.")
        from ..speculative.trained import load_adapter_for

        # a trained draft plan (skiplm draft-train / draft-search --train) drafts with the adapter saved beside it
        adapter = load_adapter_for(source, skip_plan) if source is not None and policy is None else None
        alternatives = draft_alternatives(skip_plan) if adapt else []
        if adapt and not alternatives:
            raise PlanError("--adapt needs a --plan made by `skiplm draft-search --alternatives N` (N >= 1); this plan "
                            "records no runner-up skip sets.")
        from ..speculative.vocab import resolve_draft_vocab

        # a reduced-vocabulary draft head: --draft-vocab N, else the one the draft plan records
        vocab = resolve_draft_vocab(tokenizer, draft_vocab, skip_plan,
                                    vocab_size=hf_model.get_output_embeddings().weight.shape[0])
        start = time.perf_counter()
        result = speculative_generate(
            hf_model, tokenizer, inputs["input_ids"], inputs.get("attention_mask"), plan=skip_plan,
            draft_dtype=draft_dtype, alternatives=alternatives, draft_engine=draft_engine,
            prompt_lookup=prompt_lookup or None, draft_cache=False if no_draft_cache else None,
            draft_adapter=adapter, draft_vocab=vocab, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0, top_k=top_k, top_p=top_p, max_draft=max_draft,
            seed=seed, streamer=TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True), check_model=False,
            background=True)  # a one-shot command: plain steps while the draft is built
        elapsed = time.perf_counter() - start
        new = len(result.tokens[0])
        precision = draft_dtype or draft_precision(skip_plan)
        draft = "; ".join(filter(None, [skip_plan.describe() if skip_plan else "",
                                        f"{precision} copy" if precision else "",
                                        f"proposing {vocab.describe()}" if vocab is not None else "",
                                        f"trained ({adapter.describe()})" if adapter is not None else ""]))
        # decoding (as the plain path times it) apart from the one-time setup (making or loading the draft)
        decoding, setup = result.stats.total_seconds, result.stats.setup
        if setup is not None and setup.background:  # built while the first plain steps decoded: not one after other
            timing = (f"the draft built meanwhile in {setup.seconds:.2f} s, during "
                      f"{result.stats.building_steps} plain steps")
        else:
            timing = f"after {result.stats.setup_seconds:.2f} s of setup"
        console.print(f"[dim]{new} tokens in {decoding:.2f} s ({new / max(decoding, 1e-9):.1f} tokens/s, including "
                      f"prefill), {timing} ({elapsed:.2f} s in all); draft: {draft}[/dim]")
        console.print(f"[dim]{result.stats.describe()}[/dim]")
        return
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    if temperature > 0 and top_k:
        sampling["top_k"] = top_k
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    options = {"record": True} if activation_map else {}  # (a policy's option: keep which layers ran for which tokens)
    if merge:
        options["merge"] = True  # (a heal folder's option: its weights baked in for good)
    handle = apply(hf_model, skip_plan, check_model=False, **options) if skip_plan is not None else None
    try:
        start = time.perf_counter()
        output = hf_model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                                   pad_token_id=tokenizer.pad_token_id, **sampling)
        elapsed = time.perf_counter() - start
    finally:
        if handle:
            handle.remove()
    new = output.shape[1] - inputs["input_ids"].shape[1]
    what = f"; {'policy' if policy else 'plan'}: {skip_plan.describe()}" if skip_plan else ""
    console.print(f"[dim]{new} tokens in {elapsed:.2f} s ({new / elapsed:.1f} tokens/s, including prefill){what}[/dim]")
    if policy is not None:
        stats = handle.stats.to_json()  # a policy's handle counts what it skipped
        console.print("[dim]" + "; ".join(f"{phase}: {s['mlp_skip_ratio']:.0%} of MLPs skipped"
                                          + (f", {s['attention_skip_ratio']:.0%} of attention contributions dropped"
                                             if policy.skips_attention else "")
                                          for phase, s in stats.items()) + "[/dim]")
        if activation_map:
            _write_activation_map(handle, activation_map, model)


def _policy_file(path: str, plan_path: str | None, speculative: bool):
    from ..errors import PlanError
    from ..registry import POLICIES
    from ..skipper import load_skipper

    if plan_path is not None or speculative:
        raise PlanError("--policy runs the model under an input-adaptive policy; it does not combine with --plan, "
                        "--heal or --speculative.")
    if not Path(path).is_file():
        hint = (f" `{path}` is a policy method: calibrate one for this model first, e.g. `skiplm policy --method "
                f"{path} --skip-ratio 0.25 -o {path}.json`." if path in POLICIES else "")
        raise PlanError(f"policy file {path} does not exist.{hint}")
    policy = load_skipper(path)
    if not getattr(policy, "input_adaptive", False):
        raise PlanError(f"{path} is a skip plan, not a policy: pass it with --plan.")
    return policy


def _write_activation_map(handle, path: str, model_name: str) -> None:
    from ..policies import activation_summary, plot_activation_maps
    from ..report.files import write_json

    png = plot_activation_maps(handle.maps, handle.policy.num_layers, path, f"{model_name}: {handle.policy.method}")
    summary = {"kind": "activation-map", "command": _command_line(), "model": model_name,
               "policy": handle.policy.to_json(), "stats": handle.stats.to_json(),
               "activations": activation_summary(handle.maps, handle.policy.num_layers)}
    write_json(png.with_suffix(".json"), summary)
    console.print(f"wrote {png} and {png.with_suffix('.json')}")


@cli.command()
@MODEL_ARGUMENT
@click.option("--plan", "plan_path", type=click.Path(exists=True, dir_okay=False), help="plan file")
@click.option("--heal", "heal_dir", type=click.Path(exists=True),
              help="heal folder made by `skiplm heal`, in place of --plan: its plan's blocks deleted and the healed "
                   "weights written")
@click.option("--out", "-o", required=True, type=click.Path(),
              help="folder to write the checkpoint to, or a .gguf file (--format gguf)")
@click.option("--format", "export_format", type=click.Choice(["checkpoint", "gguf"]), default=None,
              help="checkpoint: a transformers folder; gguf: a GGUF file llama.cpp runs, built from the GGUF the "
                   "model was loaded from  [default: gguf when --out ends in .gguf, else checkpoint]")
@click.option("--quantize", default="keep", show_default=True,
              help="gguf: the kept blocks' matrices — keep (the source's types, bytes copied), one type (q8_0, "
                   "q5_1, q5_0, q4_1, q4_0, f16, bf16, f32), or layerwise:BITS[:LOW,...,HIGH] (a target average "
                   "bits per weight; important blocks get the higher of two adjacent types)")
@click.option("--importance", type=click.Choice(["zd", "lim"]), default="zd", show_default=True,
              help="gguf layer-wise: block importance from the weights (zd) or from calibration text (lim: 1 - "
                   "cos(input, output) of each block on --corpus)")
@click.option("--corpus", default="gsm8k", show_default=True, help="gguf --importance lim: calibration text")
@click.option("--changed-type", default="q8_0", show_default=True,
              help="gguf with --quantize keep: the type of tensors whose weights changed (healed)")
@click.option("--zero-sublayers", is_flag=True,
              help="for attention-/MLP-only skips: zero that branch's weights (same outputs, no speedup)")
@click.option("--force", is_flag=True, help="export even if the plan (or heal folder) was made for other weights")
@_model_options
def export(model, plan_path, heal_dir, out, export_format, quantize, importance, corpus, changed_type, zero_sublayers,
           force, dtype, device):
    """Save MODEL with a plan baked in, as a checkpoint vanilla transformers loads (skipped blocks deleted); with
    --heal, the healed weights too (the checkpoint gives the healed model's logits). With --format gguf (or an
    --out ending in .gguf), a GGUF file for llama.cpp instead."""
    from ..export.pruned import export_pruned
    from ..files import check_output
    from ..heal import export_healed

    source, heal = _plan_source(plan_path, heal_dir, required=True)
    export_format = export_format or ("gguf" if str(out).endswith(".gguf") else "checkpoint")
    check_output(out, kind="file" if export_format == "gguf" else "folder", what="--out")  # before the model loads
    if heal and zero_sublayers:
        raise click.UsageError("--zero-sublayers does not apply with --heal: a heal folder's plan skips whole blocks.")
    if export_format == "gguf":
        from ..export.gguf import BITS_PER_WEIGHT, Precision

        if changed_type not in BITS_PER_WEIGHT:
            raise click.BadParameter(f"use one of {', '.join(BITS_PER_WEIGHT)}.", param_hint="--changed-type")
        if zero_sublayers:
            raise click.UsageError("--zero-sublayers does not apply to --format gguf: a GGUF holds whole blocks.")
        precision = Precision.parse(quantize)  # a bad value is refused before the model loads
    elif quantize != "keep":
        raise click.UsageError("--quantize applies to --format gguf only.")
    hf_model, tokenizer = _load(model, dtype, device)
    skip_plan = _load_plan(source, hf_model, force, heal=heal)
    if export_format == "gguf":
        _export_gguf(hf_model, tokenizer, skip_plan, heal, out, precision, importance, corpus, changed_type)
        return
    if heal:
        folder = export_healed(hf_model, skip_plan, out, tokenizer=tokenizer, check_model=False)
    else:
        folder = export_pruned(hf_model, skip_plan, out, tokenizer=tokenizer, zero_sublayers=zero_sublayers,
                               check_model=False)
    console.print(f"wrote {folder}: {skip_plan.describe()}; load it with "
                  f"AutoModelForCausalLM.from_pretrained({str(folder)!r})")


def _export_gguf(hf_model, tokenizer, skip_plan, heal, out, precision, importance, corpus, changed_type):
    from ..export.gguf import block_importance, export_gguf

    scores = None
    if precision.needs_importance:
        batches = None
        if importance == "lim":
            from ..planners.common import load_calibration

            batches = load_calibration(tokenizer, corpus, model=hf_model)
        with console.status(f"block importance ({importance})"):
            scores = block_importance(hf_model, importance, batches)
    with console.status(f"writing {out}"):
        result = export_gguf(hf_model, skip_plan.plan if heal else skip_plan, out, healed=skip_plan if heal else None,
                             precision=precision, importance=scores, changed_type=changed_type, check_model=False)
    types = ", ".join(f"{kind.upper()} x{list(result.block_types.values()).count(kind)}"
                      for kind in sorted(set(result.block_types.values())))
    console.print(f"wrote {result.path} ({result.bytes / 2**20:.1f} MiB): {skip_plan.describe()}; "
                  f"{len(result.kept_blocks)} blocks ({types}; {result.bits_per_weight:.2f} bits/weight), "
                  f"{result.copied} tensors copied from {result.record['source']}, {result.requantized} quantized "
                  f"anew. Run it with llama.cpp, e.g. llama-cli -m {result.path}")


@cli.command()
@MODEL_ARGUMENT
@_model_options
def info(model, dtype, device):
    """Show how skiplm sees MODEL: family, layers, and what each sublayer costs."""
    from ..measure.costs import CostModel
    from ..models.adapters import get_adapter, model_type_of

    hf_model, _ = _load(model, dtype, device)
    adapter = get_adapter(hf_model)
    costs = CostModel.from_parameter_counts(hf_model)
    # the result on stdout (loading status on stderr): `skiplm info > model.txt` keeps it
    click.echo(f"model type {model_type_of(hf_model)}, {len(costs.attention)} decoder layers "
               f"(at `{adapter.layers}`), {sum(p.numel() for p in hf_model.parameters()) / 1e6:.1f}M parameters")
    click.echo(f"per layer: attention {costs.attention[0] / 1e6:.2f}M, MLP {costs.mlp[0] / 1e6:.2f}M parameters; "
               f"output head {costs.fixed / 1e6:.2f}M ({costs.fixed / costs.total:.0%} of a decode step by the cost "
               "model)")


# (the defaults are DemoSettings', written out so --help imports no torch; tests/cli/test_demo.py checks them)
@cli.command()
@click.option("--model", "model_name", default=None,
              help="the model  [default: the shipped smollm2-135m]; another model needs --plan (the shipped plans are "
                   "for the default model's weights)")
@click.option("--plan", "plan_path", type=click.Path(exists=True, dir_okay=False),
              help="the static plan to measure and heal  [default: the shipped `search` plan for --target]")
@click.option("--target", type=click.Choice(["1.1", "1.2", "1.3"]), default="1.2", show_default=True,
              help="which shipped `search` plan (its target speedup, measured on a 2-core CPU)")
@click.option("--speedup", type=click.FloatRange(min=1.0, min_open=True), default=1.25, show_default=True,
              help="target ideal speedup of the uniform plan, the comparison row (greater than 1)")
@click.option("--tokens", type=POSITIVE, default=1536, show_default=True, help="held-out tokens scored per corpus")
@click.option("--repeats", type=POSITIVE, default=3, show_default=True, help="timed rounds of the speed measure")
@click.option("--prompts", type=POSITIVE, default=4, show_default=True,
              help="GSM8K prompts decoded plainly and speculatively")
@click.option("--new-tokens", type=POSITIVE, default=128, show_default=True, help="tokens generated per prompt at most")
@click.option("--heal-steps", type=POSITIVE, default=14, show_default=True,
              help="LoRA training steps (4 x 256 tokens each)")
@click.option("--heal-minutes", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="bound on the training's wall time")
@click.option("--out", "-o", type=Output("folder"), default="results/demo", show_default=True, help="output folder")
@_model_options
def demo(model_name, plan_path, target, speedup, tokens, repeats, prompts, new_tokens, heal_steps, heal_minutes, out,
         dtype, device):
    """The main job: skiplm at its best on the default model, measured in one run (~5 minutes on 2 CPU cores):
    lossless speculative decoding against plain greedy (identical text, measured speedup), the best static plan
    and its LoRA-healed version against the full model (held-out perplexity, measured speed), a uniform plan for
    comparison, one HTML report and what to try next."""
    from ..demo import DemoSettings, run_demo, shipped_plan_path
    from ..models.loading import DEFAULT_MODEL
    from ..plan import SkipPlan

    start = time.perf_counter()
    model_name = model_name or DEFAULT_MODEL
    source = Path(plan_path) if plan_path else shipped_plan_path(float(target))
    plan = SkipPlan.load(source)  # (checked against the model's weights once it is loaded)
    settings = DemoSettings(prompts=prompts, new_tokens=new_tokens, uniform_speedup=speedup, heal_steps=heal_steps,
                            heal_minutes=heal_minutes, tokens=tokens, repeats=repeats)
    out = Path(out)
    hf_model, tokenizer = _load(model_name, dtype, device)
    loaded = time.perf_counter() - start
    console.print(f"[bold]skiplm demo[/bold] on {model_name}: loaded in {loaded:.0f} s; static "
                  f"plan {source.stem}: {plan.describe()}")
    with _reporting() as progress:
        result = run_demo(hf_model, tokenizer, out, plan, plan_name=source.stem, settings=settings,
                          model_name=model_name, device=device, command=_command_line(), progress=progress,
                          say=console.print)
    from ..report.files import demo_rows
    from .common import _print_table

    _print_table(*demo_rows(result, describe=False), title=f"skiplm demo, {model_name}: held-out perplexity (x full) "
                                                           "and speed, measured in this run")
    for row in result["rows"]:
        console.print(f"  [bold]{row['name']}[/bold]: {row['what']}", highlight=False)
    spec = result["speculative"]
    console.print(f"speculative output identical to plain greedy in {spec['identical_rows']}/{spec['rows']} "
                  "generations, token for token")
    for line in result["notes"]:
        console.print(f"[dim]- {line}[/dim]")
    console.print(f"results in {out}/: report.html (one page), summary.md, demo.json; speculative.*, eval.*, bench.*, "
                  "plans/, healed/")
    console.print("[bold]what to try next[/bold]")
    for command, why in result["next"]:
        console.print(f"  {command}\n      [dim]{why}[/dim]", highlight=False)
    total = time.perf_counter() - start
    stages = ", ".join(f"{name.replace('_', ' ')} {value:.0f} s" for name, value in result["seconds"].items()
                       if name != "total")
    console.print(f"[bold]wall time {int(total // 60)}m{total % 60:02.0f}s[/bold] (loading {loaded:.0f} s, {stages})")
