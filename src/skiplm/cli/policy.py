"""`skiplm policy`: calibrate an input-adaptive policy and save it."""

from __future__ import annotations

import time

import click
from .common import MODEL_ARGUMENT, _load, _model_options, _progress, cli, console



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
