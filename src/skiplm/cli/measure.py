"""`skiplm eval`, `bench`, `agree` and `lm-eval`: quality and speed against the full model."""

from __future__ import annotations

from pathlib import Path

import click

from .common import (HEALS_OPTION, MODEL_ARGUMENT, _check_stride, _command_line, _load, _load_skippers, _model_options,
                     _print_table, _reporting, cli, console)
from .options import NON_NEGATIVE, POSITIVE, IntList, Output
from .sweep import _check_sweep_options, _sweep, _sweep_options


@cli.command("eval")
@MODEL_ARGUMENT
@click.option("--plan", "--policy", "plan_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="plan file (skiplm plan) or policy file (skiplm policy); repeat for several; the full model is "
                   "always evaluated too")
@HEALS_OPTION
@click.option("--corpus", "corpora", multiple=True, default=("gsm8k",), show_default=True,
              help="gsm8k, pydoc, or a text file (repeatable)")
@click.option("--tokens", type=POSITIVE, default=16384, show_default=True, help="tokens scored per corpus")
@click.option("--context", type=click.IntRange(min=2), default=1024, show_default=True, help="window length")
@click.option("--stride", type=POSITIVE, default=512, show_default=True, help="window advance (less than --context)")
@click.option("--out", "-o", type=Output("folder"), default="results/eval", show_default=True, help="output folder")
@click.option("--force", is_flag=True, help="apply plans even if made for other weights")
@_model_options
def eval_command(model, plan_paths, heal_dirs, corpora, tokens, context, stride, out, force, dtype, device):
    """Perplexity of the full model and of each plan (and heal folder), side by side."""
    from ..measure.workflows import evaluate_and_report

    _check_stride(stride, context)
    hf_model, tokenizer = _load(model, dtype, device)
    plans = {"full": None} | _load_skippers(plan_paths, heal_dirs, hf_model, force)
    with _reporting() as progress:
        result = evaluate_and_report(hf_model, tokenizer, plans, corpora, tokens, context, stride, Path(out), model,
                                     device, command=_command_line(), progress=progress, check_model=False)  # (checked above)
    _print_quality(result)


# -- bench --sweep: the scoreboard -----------------------------------------------------------------------------------


@cli.command()
@MODEL_ARGUMENT
@click.option("--plan", "--policy", "plan_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="plan file (repeat for several); the full model is always measured too")
@HEALS_OPTION
@click.option("--batch-sizes", type=IntList(1), default="1,8", show_default=True,
              help="comma-separated batch sizes, each at least 1")
@click.option("--prompt-tokens", type=POSITIVE, default=256, show_default=True, help="prefill length")
@click.option("--decode-prompt-tokens", type=POSITIVE, default=64, show_default=True,
              help="prompt length before decoding")
@click.option("--decode-prompts", type=click.Choice(["corpus", "gsm8k-chat"]), default="corpus", show_default=True,
              help="decode prompts: chunks of GSM8K text, or the last --decode-prompt-tokens tokens of GSM8K "
                   "questions in the chat template (the model answers, as in use; input-adaptive policies decide on it)")
@click.option("--new-tokens", type=POSITIVE, default=64, show_default=True, help="decode steps")
@click.option("--repeats", type=POSITIVE, default=5, show_default=True, help="timed rounds")
@click.option("--warmup", type=NON_NEGATIVE, default=1, show_default=True, help="untimed rounds first")
@click.option("--compare-pruned/--no-compare-pruned", default=True, show_default=True,
              help="also time a copy with the plan's blocks physically deleted")
@click.option("--out", "-o", type=Output("folder"), default="results/bench", show_default=True,
              help="output folder  [--sweep: results/sweep]")
@click.option("--force", is_flag=True, help="apply plans even if made for other weights")
@_sweep_options
@_model_options
@click.pass_context
def bench(ctx, model, plan_paths, heal_dirs, batch_sizes, prompt_tokens, decode_prompt_tokens, decode_prompts, new_tokens, repeats,
          warmup, compare_pruned, out, force, dtype, device, sweep, **sweep_options):
    """Prefill latency and decode tokens/s of the full model and each plan (and heal folder), interleaved, in one run.

    With --sweep: the scoreboard. Every method of --methods at every target of --targets is planned and measured
    against the full model — perplexity, generation agreement, prefill and decode speed — in one resumable run; each
    --heal folder adds its healed plan as one more point.
    """
    from ..measure.speed import BenchSettings
    from ..measure.workflows import bench_and_report

    _check_sweep_options(ctx, sweep)
    if sweep:
        return _sweep(ctx, model, heal_dirs, batch_sizes, prompt_tokens, decode_prompt_tokens, new_tokens, repeats,
                      warmup, out, dtype, device, **sweep_options)
    settings = BenchSettings(batch_sizes, prompt_tokens, decode_prompt_tokens, new_tokens, repeats, warmup,
                             decode_prompts)
    hf_model, tokenizer = _load(model, dtype, device)
    plans = _load_skippers(plan_paths, heal_dirs, hf_model, force)
    with _reporting() as progress:
        result = bench_and_report(hf_model, tokenizer, plans, settings, compare_pruned, Path(out), model, device,
                                  command=_command_line(), progress=progress, check_model=False)  # (checked above)
    _print_speed(result)


@cli.command()
@MODEL_ARGUMENT
@click.option("--plan", "--policy", "plan_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="plan file (repeat for several); the full model always generates the reference")
@HEALS_OPTION
@click.option("--prompts", default="gsm8k", show_default=True,
              help="gsm8k (the shipped test questions), or a file: one prompt per line, or JSON Lines with a "
                   "\"prompt\" field (and optionally an \"answer\")")
@click.option("--limit", type=click.IntRange(min=1), default=32, show_default=True, help="use the first N prompts")
@click.option("--new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="greedy tokens per prompt (fewer if the model emits EOS)")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--chat/--raw", default=True, show_default=True, help="wrap each prompt in the model's chat template")
@click.option("--out", "-o", type=Output("folder"), default="results/agree", show_default=True, help="output folder")
@click.option("--force", is_flag=True, help="apply plans even if made for other weights")
@_model_options
def agree(model, plan_paths, heal_dirs, prompts, limit, new_tokens, batch_size, chat, out, force, dtype, device):
    """Greedy generation agreement of each plan (and heal folder) with the full model (and GSM8K answer accuracy)."""
    from ..measure.agreement import FULL
    from ..measure.workflows import agree_and_report
    from ..models.data import corpus_label, load_prompts
    from ..report.files import agreement_rows

    prompt_list = load_prompts(prompts, limit)  # bad prompts fail before the model loads
    hf_model, tokenizer = _load(model, dtype, device)
    plans = _load_skippers(plan_paths, heal_dirs, hf_model, force, reserved=())
    if FULL in plans:
        raise click.BadParameter(f"a plan file may not be named {FULL}.json: that name is the full model's.",
                                 param_hint="--plan")
    with _reporting() as progress:
        result, paths = agree_and_report(hf_model, tokenizer, prompt_list, plans, new_tokens=new_tokens,
                                         batch_size=batch_size, chat=chat, source=corpus_label(prompts), out=Path(out),
                                         model_name=model, device=device, command=_command_line(), progress=progress)
    _print_table(*agreement_rows(result), title=f"agreement with the full model's greedy output ({len(prompt_list)} "
                                                f"prompts, <= {new_tokens} tokens)")
    if not plans:
        console.print("no --plan given: only the full model was run.")
    console.print(f"wrote {paths['json']}, {paths['markdown']}")


@cli.command("lm-eval", add_help_option=False,
             context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lm_eval_command(args):
    """lm-evaluation-harness's command line, with the `skiplm` model type registered; ARGS go to it unchanged.

    e.g. skiplm lm-eval --model skiplm --model_args pretrained=smollm2-135m,plan=plan.json --tasks arc_easy

    A heal folder (skiplm heal) in place of the plan: --model_args pretrained=smollm2-135m,heal=DIR (and merge=true to
    bake it into the weights for good: faster for LoRA-healed models).

    skiplm's offline tasks (skiplm_gsm8k, skiplm_gpqa_diamond; tag skiplm_offline) are found by themselves; --limit N
    scores the first N examples of each. `skiplm lm-eval --print-include-path` prints their folder, for the plain
    harness: lm_eval --include_path "$(skiplm lm-eval --print-include-path)" --tasks skiplm_gsm8k ...
    """
    from ..integrations.tasks import print_include_path

    if print_include_path(args):  # (quick: before the harness is imported)
        return
    try:
        from ..integrations.lm_eval import main as lm_eval_main
    except ImportError as exc:
        raise click.ClickException(str(exc)) from None
    lm_eval_main(list(args))


# -- what eval, bench and demo print ------------------------------------------------------------------------------


def _print_quality(result):
    from ..report.files import perplexity_rows

    settings = result["settings"]
    _print_table(*perplexity_rows(result, ratios=True),
                 title=f"perplexity ({settings['tokens']} tokens, context {settings['context']})")


def _print_speed(result):
    from ..report.files import settings_line, speed_rows

    _print_table(*speed_rows(result["speed"], result["settings"]), left_columns=2,
                 title="speed (medians; speedup = full time / config time)", caption=settings_line(result["settings"]))
