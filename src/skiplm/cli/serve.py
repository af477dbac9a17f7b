"""`skiplm serve`: an OpenAI-compatible HTTP server (:mod:`skiplm.serve`), the model and its draft kept warm."""

from __future__ import annotations

import copy
import time

import click

from . import run as _run
from .common import HEAL_OPTION, MODEL_ARGUMENT, _load, _load_plan, _model_options, _plan_source, cli, console
from .options import POSITIVE

DEFAULT_DRAFT_DTYPE = "int8"  # the draft when none is given: no search needed (README: 1.52x at batch 1 on CPU)
SERVE_EXTRA_HINT = "pip install 'skiplm[serve]'"


def _generate_option(name: str, help: str | None = None):
    """`skiplm generate`'s own option ``name``, reused as it is defined there (one definition for both commands);
    its help text without generate's "--speculative:" prefix (serving speculates unless --no-speculative), or
    ``help``."""
    options = [p for p in _run.generate.params if p.name == name]
    if not options:  # (a bug: caught by the tests of both commands)
        raise RuntimeError(f"`skiplm generate` has no option {name!r} for `skiplm serve` to share.")
    option = copy.copy(options[0])
    option.help = help if help is not None else (option.help or "").replace("--speculative: ", "").replace(
        "--speculative with", "with")

    def decorate(function):
        if not hasattr(function, "__click_params__"):
            function.__click_params__ = []
        function.__click_params__.append(option)  # (what click.option does)
        return function

    return decorate


@cli.command()
@MODEL_ARGUMENT
@_generate_option("plan_path", help="plan file: the draft's plan (the layers it skips; a `skiplm draft-search` plan "
                                    "also names its precision); with --no-speculative, the plan the served model "
                                    "runs under")
@HEAL_OPTION
@_generate_option("merge")
@click.option("--no-speculative", "plain", is_flag=True,
              help="plain decoding (the model under --plan / --heal if given) instead of lossless self-speculative "
                   "decoding")
@_generate_option("max_draft")
@_generate_option("adapt")
@_generate_option("draft_dtype", help="draft with a copy of the weights in this precision: bfloat16, float16, int8 "
                                      "(int8 weights, bfloat16 arithmetic) or int8-dynamic (int8 weights and "
                                      "activations); default: the one a draft plan from `skiplm draft-search` names, "
                                      f"else the model's own weights with --plan, else {DEFAULT_DRAFT_DTYPE}")
@_generate_option("prompt_lookup")
@_generate_option("draft_engine")
@_generate_option("draft_vocab")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on (0.0.0.0: every interface; the API has no authentication)")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="port to listen on")
@click.option("--max-batch", type=POSITIVE, default=8, show_default=True,
              help="most requests decoded together in one batch (requests that arrive while a batch runs wait for "
                   "the next)")
@click.option("--batch-wait", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="seconds a batch waits after its first request for others to join it")
@click.option("--max-tokens", type=POSITIVE, default=1024, show_default=True,
              help="most new tokens a request may ask for (and what a request that names none gets, cut to the "
                   "model's context)")
@click.option("--warmup/--no-warmup", default=True, show_default=True,
              help="one short generation before serving, so the first request does not pay for one-time work")
@click.option("--name", "served_name",
              help="the model name clients send (\"model\" in a request, GET /v1/models)  [default: MODEL]")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True, help="uvicorn's log level (info: one line per request)")
@_generate_option("force")
@_model_options
def serve(model, plan_path, heal_dir, merge, plain, max_draft, adapt, draft_dtype, prompt_lookup, draft_engine,
          draft_vocab, host, port, max_batch, batch_wait, max_tokens, warmup, served_name, log_level, force, dtype, device):
    """Serve MODEL over an OpenAI-compatible HTTP API (POST /v1/chat/completions and /v1/completions, streaming
    included; GET /v1/models, /health, /v1/skiplm/stats), decoding with lossless self-speculative decoding (greedy
    output is the full model's, token for token) and batching concurrent requests."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise click.ClickException(f"skiplm serve needs FastAPI and uvicorn ({exc}): {SERVE_EXTRA_HINT}") from None
    from ..errors import PlanError
    from ..serve import build
    from ..serve import app as serve_app
    from ..speculative import draft_alternatives, draft_precision

    source, heal = _plan_source(plan_path, heal_dir)
    if heal and not plain:
        raise click.UsageError("speculative serving does not take a heal folder as the draft yet: give the unhealed "
                               "plan with --plan (the full model verifies, so the output is the same), or serve the "
                               "healed model with --no-speculative.")
    if merge and not heal:
        raise click.UsageError("--merge bakes a heal folder into the weights: give --heal DIR.")
    if plain and (adapt or draft_dtype):
        raise click.UsageError("--adapt and --draft-dtype choose the speculative draft; they do not combine with "
                               "--no-speculative.")
    start = time.perf_counter()
    hf_model, tokenizer = _load(model, dtype, device)
    load_seconds = time.perf_counter() - start
    skip_plan = _load_plan(source, hf_model, force, heal=heal)
    alternatives, vocab = [], None
    if not plain:
        from ..speculative.vocab import resolve_draft_vocab

        vocab = resolve_draft_vocab(tokenizer, draft_vocab, skip_plan,
                                    vocab_size=hf_model.get_output_embeddings().weight.shape[0])
        if draft_dtype is None and skip_plan is None:
            draft_dtype = DEFAULT_DRAFT_DTYPE
            console.print(f"[dim]drafting with an {DEFAULT_DRAFT_DTYPE} copy of the weights (the default; --plan / "
                          "--draft-dtype choose the draft, --no-speculative decodes plainly)[/dim]")
        alternatives = draft_alternatives(skip_plan) if adapt else []
        if adapt and not alternatives:
            raise PlanError("--adapt needs a --plan made by `skiplm draft-search --alternatives N` (N >= 1); this plan "
                            "records no runner-up skip sets.")
    with console.status("getting ready to serve"):
        served = build(hf_model, tokenizer, name=served_name or model, speculative=not plain, plan=skip_plan,
                       draft_dtype=draft_dtype, alternatives=alternatives, draft_engine=draft_engine,
                       prompt_lookup=prompt_lookup or None, max_draft=max_draft, max_batch=max_batch,
                       batch_wait=batch_wait, max_tokens=max_tokens, warmup=warmup, check_model=False, merge=merge,
                       setup_seconds={"load": load_seconds}, draft_vocab=vocab)
    setup = ", ".join(f"{k} {v:.1f} s" for k, v in served.setup_seconds.items())
    if plain:
        what = "plain decoding" + (f" under {skip_plan.describe()}" if skip_plan is not None else "")
    else:
        precision = draft_dtype or draft_precision(skip_plan)
        what = "self-speculative decoding, draft: " + "; ".join(filter(None, [
            skip_plan.describe() if skip_plan is not None else "", f"{precision} copy" if precision else "",
            f"prompt lookup {prompt_lookup}" if prompt_lookup else "",
            f"proposing {vocab.describe()}" if vocab is not None else ""]))
    console.print(f"serving {served.name} ({what}; up to {max_batch} requests per batch, {max_tokens} new tokens per "
                  f"request) at http://{host}:{port}/v1  [dim](setup: {setup})[/dim]")
    serve_app.run_server(served, host, port, log_level=log_level)
