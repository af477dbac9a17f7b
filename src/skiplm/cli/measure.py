"""`skiplm eval`, `bench`, `agree` and `lm-eval`: quality and speed against the full model."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from .common import MODEL_ARGUMENT, _command_line, _load, _load_plan, _model_options, _progress, _set_threads, cli, console
from .sweep import _check_sweep_options, _sweep, _sweep_options



@cli.command("eval")
@MODEL_ARGUMENT
@click.option("--plan", "--policy", "plan_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="plan file (skiplm plan) or policy file (skiplm policy); repeat for several; the full model is "
                   "always evaluated too")
@click.option("--corpus", "corpora", multiple=True, default=("gsm8k",), show_default=True,
              help="gsm8k, pydoc, or a text file (repeatable)")
@click.option("--tokens", default=16384, show_default=True, help="tokens scored per corpus")
@click.option("--context", default=1024, show_default=True, help="window length")
@click.option("--stride", default=512, show_default=True, help="window advance")
@click.option("--out", "-o", type=click.Path(), default="results/eval", show_default=True, help="output folder")
@click.option("--force", is_flag=True, help="apply plans even if made for other weights")
@_model_options
def eval_command(model, plan_paths, corpora, tokens, context, stride, out, force, dtype, device):
    """Perplexity of the full model and of each plan, side by side."""
    hf_model, tokenizer = _load(model, dtype, device)
    plans = {"full": None} | {Path(p).stem: _load_plan(p, hf_model, force) for p in plan_paths}
    result = evaluate_and_report(hf_model, tokenizer, plans, corpora, tokens, context, stride, Path(out), model, device)
    _print_quality(result)


# -- bench --sweep: the scoreboard -----------------------------------------------------------------------------------


@cli.command()
@MODEL_ARGUMENT
@click.option("--plan", "--policy", "plan_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="plan file (repeat for several); the full model is always measured too")
@click.option("--batch-sizes", default="1,8", show_default=True)
@click.option("--prompt-tokens", default=256, show_default=True, help="prefill length")
@click.option("--decode-prompt-tokens", default=64, show_default=True, help="prompt length before decoding")
@click.option("--decode-prompts", type=click.Choice(["corpus", "gsm8k-chat"]), default="corpus", show_default=True,
              help="decode prompts: chunks of GSM8K text, or the last --decode-prompt-tokens tokens of GSM8K "
                   "questions in the chat template (the model answers, as in use; input-adaptive policies decide on it)")
@click.option("--new-tokens", default=64, show_default=True, help="decode steps")
@click.option("--repeats", default=5, show_default=True)
@click.option("--warmup", default=1, show_default=True)
@click.option("--compare-pruned/--no-compare-pruned", default=True, show_default=True,
              help="also time a copy with the plan's blocks physically deleted")
@click.option("--threads", type=int, help="torch CPU threads (default: torch's choice)")
@click.option("--out", "-o", type=click.Path(), default="results/bench", show_default=True, help="output folder")
@click.option("--force", is_flag=True, help="apply plans even if made for other weights")
@_sweep_options
@_model_options
@click.pass_context
def bench(ctx, model, plan_paths, batch_sizes, prompt_tokens, decode_prompt_tokens, decode_prompts, new_tokens, repeats,
          warmup, compare_pruned, threads, out, force, dtype, device, sweep, **sweep_options):
    """Prefill latency and decode tokens/s of the full model and each plan, interleaved, in one run.

    With --sweep: the scoreboard. Every method of --methods at every target of --targets is planned and measured
    against the full model — perplexity, generation agreement, prefill and decode speed — in one resumable run.
    """
    from ..measure.speed import BenchSettings

    _check_sweep_options(ctx, sweep)
    if sweep:
        return _sweep(ctx, model, batch_sizes, prompt_tokens, decode_prompt_tokens, new_tokens, repeats, warmup, threads,
                      out, dtype, device, **sweep_options)
    _set_threads(threads)
    hf_model, tokenizer = _load(model, dtype, device)
    plans = {Path(p).stem: _load_plan(p, hf_model, force) for p in plan_paths}
    settings = BenchSettings(tuple(int(b) for b in batch_sizes.split(",")), prompt_tokens, decode_prompt_tokens,
                             new_tokens, repeats, warmup, decode_prompts)
    result = bench_and_report(hf_model, tokenizer, plans, settings, compare_pruned, Path(out), model, device)
    _print_speed(result)


@cli.command()
@MODEL_ARGUMENT
@click.option("--plan", "--policy", "plan_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="plan file (repeat for several); the full model always generates the reference")
@click.option("--prompts", default="gsm8k", show_default=True,
              help="gsm8k (the shipped test questions), or a file: one prompt per line, or JSON Lines with a "
                   "\"prompt\" field (and optionally an \"answer\")")
@click.option("--limit", type=click.IntRange(min=1), default=32, show_default=True, help="use the first N prompts")
@click.option("--new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="greedy tokens per prompt (fewer if the model emits EOS)")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--chat/--raw", default=True, show_default=True, help="wrap each prompt in the model's chat template")
@click.option("--out", "-o", type=click.Path(file_okay=False), default="results/agree", show_default=True,
              help="output folder")
@click.option("--force", is_flag=True, help="apply plans even if made for other weights")
@_model_options
def agree(model, plan_paths, prompts, limit, new_tokens, batch_size, chat, out, force, dtype, device):
    """Greedy generation agreement of each plan with the full model (and GSM8K answer accuracy)."""
    from ..measure.agreement import FULL, load_prompts, measure_agreement, summary_rows, write_agreement
    from ..models.data import corpus_label
    from ..report.files import machine_info

    prompt_list = load_prompts(prompts, limit)  # bad prompts fail before the model loads
    hf_model, tokenizer = _load(model, dtype, device)
    plans = {Path(p).stem: _load_plan(p, hf_model, force) for p in plan_paths}
    if FULL in plans:
        raise click.BadParameter(f"a plan file may not be named {FULL}.json: that name is the full model's.",
                                 param_hint="--plan")
    with _progress() as progress:
        task = progress.add_task("generating", total=len(prompt_list) * (1 + len(plans)))
        result = measure_agreement(
            hf_model, tokenizer, prompt_list, plans, new_tokens=new_tokens, batch_size=batch_size, chat=chat,
            source=corpus_label(prompts), check_model=False,
            progress=lambda name, rows: progress.update(task, advance=rows, description=f"generating ({name})"))
    result = {"kind": result.pop("kind"), "command": _command_line(), "model": model, "machine": machine_info(device),
              **result}
    paths = write_agreement(result, Path(out), model)
    headers, rows = summary_rows(result)
    table = Table(title=f"agreement with the full model's greedy output ({len(prompt_list)} prompts, "
                        f"<= {new_tokens} tokens)")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    if not plans:
        console.print("no --plan given: only the full model was run.")
    console.print(f"wrote {paths['json']}, {paths['markdown']}")


@cli.command("lm-eval", add_help_option=False,
             context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lm_eval_command(args):
    """lm-evaluation-harness's command line, with the `skiplm` model type registered; ARGS go to it unchanged.

    e.g. skiplm lm-eval --model skiplm --model_args pretrained=smollm2-135m,plan=plan.json --tasks arc_easy
    """
    try:
        from ..integrations.lm_eval import main as lm_eval_main
    except ImportError as exc:
        raise click.ClickException(str(exc)) from None
    lm_eval_main(list(args))


# -- shared by the commands ------------------------------------------------------------------------------------------


def evaluate_and_report(model, tokenizer, plans, corpora, tokens, context, stride, out: Path, model_name, device):
    from ..models.data import corpus_label, load_corpus
    from ..measure.perplexity import compare_perplexity, tokenize_corpus
    from ..report.files import machine_info, markdown_table, write_json

    texts = {corpus_label(c): tokenize_corpus(tokenizer, load_corpus(c), tokens) for c in corpora}
    per_corpus = {}
    with _progress() as progress:
        task = progress.add_task("perplexity", total=sum((ids.numel() - 1) * len(plans) for ids in texts.values()))
        for label, ids in texts.items():
            progress.update(task, description=f"perplexity on {label}")
            per_corpus[label] = compare_perplexity(model, ids, plans, context=context, stride=stride,
                                                   progress=lambda n: progress.advance(task, n))
    result = {
        "kind": "perplexity",
        "command": _command_line(),
        "model": model_name,
        "machine": machine_info(device),
        "settings": {"tokens": tokens, "context": context, "stride": stride, "corpora": list(texts)},
        "plans": {name: (p.to_json() if p else None) for name, p in plans.items()},
        "perplexity": {c: {n: r.to_json() for n, r in rs.items()} for c, rs in per_corpus.items()},
    }
    write_json(out / "eval.json", result)
    headers = ["config"] + [f"ppl {c} ({tokens} tok)" for c in texts]
    rows = [[name] + [f"{per_corpus[c][name].perplexity:.3f}" for c in texts] for name in plans]
    (out / "eval.md").write_text(f"# Perplexity, {model_name}\n\ncontext {context}, stride {stride}; plans' decode skip "
                                 f"set applied to every token.\n\n" + markdown_table(headers, rows))
    return result


def bench_and_report(model, tokenizer, plans, settings, compare_pruned, out: Path, model_name, device):
    import dataclasses

    from ..measure.speed import make_configs, run_bench, total_work
    from ..models.data import load_corpus
    from ..measure.perplexity import tokenize_corpus
    from ..report.files import (machine_info, markdown_table, plot_speedups, policy_rows, settings_line, speed_rows,
                            write_json)

    corpus_ids = tokenize_corpus(tokenizer, load_corpus("gsm8k"), 8 * max(settings.prompt_tokens, settings.decode_prompt_tokens))
    configs = make_configs(model, plans, compare_pruned=compare_pruned)
    chat_prompts = None
    if settings.decode_prompts == "gsm8k-chat":
        from ..measure.agreement import encode_prompts, gsm8k_prompts

        chat_prompts = encode_prompts(tokenizer, gsm8k_prompts(200), chat=True)
    with _progress() as progress:
        task = progress.add_task("bench", total=total_work(configs, settings))
        speed = run_bench(configs, corpus_ids, settings,
                          progress=lambda what: progress.update(task, advance=1, description=f"bench {what}"),
                          chat_prompts=chat_prompts)
    result = {
        "kind": "speed",
        "command": _command_line(),
        "model": model_name,
        "machine": machine_info(device),
        "settings": dataclasses.asdict(settings),
        "plans": {name: p.to_json() for name, p in plans.items()},
        "speed": speed,
    }
    write_json(out / "bench.json", result)
    headers, rows = speed_rows(speed, result["settings"])
    policy_headers, policy_table = policy_rows(speed, result["settings"])
    policy_text = ""
    if policy_table:
        policy_text = ("\n## Input-adaptive policies\n\nMLP time: (full - static probe) / skippable layers, per token. "
                       "Saved: (full - policy) per token. Decision overhead: (decisions only - full) per token.\n\n"
                       + markdown_table(policy_headers, policy_table))
    (out / "bench.md").write_text(
        f"# Speed, {model_name}\n\n{result['machine']['cpu']}, {result['machine']['torch_threads']} threads, "
        f"torch {result['machine']['torch']}; medians of {settings.repeats} interleaved rounds after "
        f"{settings.warmup} warm-up. {settings_line(result['settings'])}.\n\n" + markdown_table(headers, rows)
        + policy_text + "\n![speedups](bench.png)\n")
    if len(configs) > 1:
        plot_speedups(speed, result["settings"], out / "bench.png", f"{model_name}: measured vs ideal speedup")
    return result


def _print_quality(result):
    table = Table(title=f"perplexity ({result['settings']['tokens']} tokens, context {result['settings']['context']})")
    table.add_column("config")
    corpora = list(result["perplexity"])
    for corpus in corpora:
        table.add_column(corpus, justify="right")
    for name in result["plans"]:
        full = [result["perplexity"][c]["full"]["perplexity"] for c in corpora] if "full" in result["plans"] else None
        cells = []
        for i, corpus in enumerate(corpora):
            value = result["perplexity"][corpus][name]["perplexity"]
            cells.append(f"{value:.2f}" + (f" ({value / full[i]:.2f}x)" if full and name != "full" else ""))
        table.add_row(name, *cells)
    Console().print(table)


def _print_speed(result):
    from ..report.files import settings_line, speed_rows

    headers, rows = speed_rows(result["speed"], result["settings"])
    table = Table(title="speed (medians; speedup = full time / config time)", caption=settings_line(result["settings"]))
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i < 2 else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
