"""`skiplm plan` and `skiplm policy`: make a static plan or an input-adaptive policy and save it."""

from __future__ import annotations

import time

import click
from .common import MODEL_ARGUMENT, _load, _model_options, _progress, cli, console



@cli.command()
@MODEL_ARGUMENT
@click.option("--method", default="uniform", show_default=True,
              help="planning method: uniform, block-influence, angular, similarity, greedy-loss")
@click.option("--speedup", type=float, help="target ideal speedup, e.g. 1.25")
@click.option("--skip", type=int, help="number of units to skip: blocks, or sublayers for --unit attention/mlp/joint")
@click.option("--unit", help="similarity: attention, mlp, block or joint (attention and MLP ranked together)  "
                             "[default: block]")
@click.option("--latency-ms", type=float, help="search: target decode step time on this device (ms)")
@click.option("--max-kl", type=float, help="search: quality budget, the largest mean KL to the full model allowed")
@click.option("--iterative", is_flag=True, help="similarity: re-score the remaining units after each drop")
@click.option("--corpus", help="calibration text of data-driven methods: gsm8k, pydoc, or a text file  [default: gsm8k]")
@click.option("--sequences", type=int, help="calibration sequences  [default: per method; 8, greedy-loss 4]")
@click.option("--length", type=int, help="tokens per calibration sequence  [default: per method; 256, greedy-loss 128]")
@click.option("--prefill", type=click.Choice(["same", "full"]), default="same", show_default=True,
              help="prefill skips the same layers, or runs at full depth")
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True, help="plan file to write (JSON)")
@_model_options
def plan(model, method, speedup, skip, latency_ms, max_kl, unit, iterative, corpus, sequences, length, prefill, out,
         dtype, device):
    """Make a skip plan for MODEL and save it."""
    import inspect

    from ..measure.costs import CostModel
    from ..errors import PlanError
    from ..planners import get_planner, load_calibration
    from ..planners.common import DEFAULT_CORPUS, Target

    planner = get_planner(method)
    accepted = inspect.signature(planner).parameters
    if latency_ms is None and max_kl is None:
        Target.of(speedup, skip)  # a bad target fails before the model loads
    options = {"unit": unit, "iterative": iterative or None, "latency_ms": latency_ms, "max_kl": max_kl}
    for option, value in options.items():
        if value is not None and option not in accepted:
            raise PlanError(f"--{option.replace('_', '-')} does not apply to the {method!r} method.")
    kwargs = {option: value for option, value in options.items() if value is not None}
    defaults = getattr(planner, "calibration_defaults", None)
    if defaults is None and (corpus, sequences, length) != (None, None, None):
        raise PlanError(f"the {method!r} method uses no calibration text: drop --corpus / --sequences / --length.")
    hf_model, tokenizer = _load(model, dtype, device)
    if defaults is not None:
        corpus = DEFAULT_CORPUS if corpus is None else corpus
        sequences = defaults[0] if sequences is None else sequences
        length = defaults[1] if length is None else length
        kwargs["calibration"] = load_calibration(tokenizer, corpus, sequences, length)
    start = time.perf_counter()
    if defaults is not None and "progress" in accepted:  # @calibrated planners report progress(done, total)
        with _progress() as progress:
            task = progress.add_task(f"planning ({method})", total=None)
            kwargs["progress"] = lambda done, total: progress.update(task, completed=done, total=total)
            skip_plan = planner(hf_model, speedup=speedup, skip=skip, prefill=prefill, name=model, **kwargs)
    else:
        skip_plan = planner(hf_model, speedup=speedup, skip=skip, prefill=prefill, name=model, **kwargs)
    elapsed = time.perf_counter() - start
    skip_plan.save(out)
    ideal = CostModel.from_parameter_counts(hf_model).ideal_speedup(skip_plan.decode)
    calibration = kwargs.get("calibration")
    data = f" on {sequences} x {length} tokens of {calibration.source}" if calibration is not None else ""
    console.print(f"{skip_plan.describe()} — ideal decode speedup {ideal:.3f}x ({method}{data}, {elapsed:.1f} s)")
    console.print(f"wrote {out}")


@cli.command("policy")
@MODEL_ARGUMENT
@click.option("--method", required=True, type=click.Choice(["ffn-skip", "lac"]),
              help="ffn-skip (FFN-SkipLLM: MLP saturation) or lac (L2 Adaptive Computation: residual norm change)")
@click.option("--skip-ratio", type=float, help="target share of all token-MLPs skipped on the calibration text")
@click.option("--speedup", type=float,
              help="target decode speedup at batch 1; the skip ratio comes from a latency model measured now")
@click.option("--parts", type=click.Choice(["layer", "mlp"]), default="layer", show_default=True,
              help="lac: what a halted token skips (layer: attention contribution and MLP)")
@click.option("--window", type=click.IntRange(min=1), default=2, show_default=True,
              help="ffn-skip: consecutive saturated layers before a token halts")
@click.option("--protect-first", type=click.IntRange(min=1),
              help="first layers that always run  [default: layers / 8, rounded up]")
@click.option("--protect-last", type=click.IntRange(min=0),
              help="last layers that always run  [default: layers / 16, rounded up]")
@click.option("--warmup", type=click.IntRange(min=0), default=4, show_default=True,
              help="the first N positions of a sequence always run every layer")
@click.option("--prefill", type=click.Choice(["same", "full"]), default="same", show_default=True,
              help="prefill uses the same threshold, or runs every layer")
@click.option("--last-check", default="auto", show_default=True,
              help="last layer whose signal may halt a token: a layer index, 'all' (every layer that can), or 'auto' "
                   "(the horizon where later halts stop paying for the checks on the calibration text)")
@click.option("--corpus", default="gsm8k", show_default=True, help="calibration text: gsm8k, pydoc, or a text file")
@click.option("--sequences", default=4, show_default=True, type=click.IntRange(min=1), help="calibration sequences")
@click.option("--length", default=256, show_default=True, type=click.IntRange(min=2), help="tokens per sequence")
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True, help="policy file to write (JSON)")
@_model_options
def policy_command(model, method, skip_ratio, speedup, parts, window, protect_first, protect_last, warmup, prefill,
                   last_check, corpus, sequences, length, out, dtype, device):
    """Calibrate an input-adaptive skipping policy for MODEL and save it.

    The threshold is set so that the policy skips --skip-ratio of all token-MLPs on the calibration text (or the
    ratio a measured latency model says reaches --speedup). Use the file with `generate --policy`, `eval --policy`,
    `bench --policy`, `agree --policy`.
    """
    from ..errors import PlanError
    from ..measure.latency import LatencyModel
    from ..planners import load_calibration
    from ..policies.core import calibrate, skip_ratio_for_speedup

    if (skip_ratio is None) == (speedup is None):
        raise PlanError("give exactly one of --skip-ratio (e.g. 0.25) or --speedup (e.g. 1.2).")
    named = {"auto": "auto", "all": None}
    if last_check not in named and not last_check.isdigit():
        raise PlanError(f"--last-check must be a layer index, 'all' or 'auto', got {last_check!r}.")
    last_check = named[last_check] if last_check in named else int(last_check)
    settings = {"protect_first": protect_first, "protect_last": protect_last, "warmup": warmup}
    settings.update({"window": window} if method == "ffn-skip" else {"parts": parts})
    hf_model, tokenizer = _load(model, dtype, device)
    calibration = load_calibration(tokenizer, corpus, sequences, length)
    start = time.perf_counter()
    latency = None
    if speedup is not None:
        with console.status("measuring the latency of the MLP sublayers on this device"):
            latency = LatencyModel.measure(hf_model)
        skip_ratio = skip_ratio_for_speedup(latency, latency.num_layers, speedup)
    with _progress() as progress:
        task = progress.add_task(f"calibrating {method}", total=None)
        policy = calibrate(hf_model, method, calibration, skip_ratio, prefill=prefill, last_check=last_check,
                           progress=lambda done, total: progress.update(task, completed=done, total=total), **settings)
    policy.provenance.update({"corpus": calibration.source, "sequences": sequences, "length": length,
                              "model_name": model, "seconds": time.perf_counter() - start})
    if latency is not None:
        policy.provenance.update({"target_speedup": speedup, "latency": latency.to_json()})
    policy.save(out)
    console.print(f"{policy.describe()} ({time.perf_counter() - start:.1f} s)")
    console.print(f"wrote {out}")
