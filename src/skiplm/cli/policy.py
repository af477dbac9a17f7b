"""`skiplm policy`: calibrate an input-adaptive policy and save it.

The methods are the registered policies (:data:`skiplm.registry.POLICIES`); a method's own options come from its
spec: ``--option key=value`` for any of them, and the flags ``--window`` (ffn-skip) and ``--parts`` (lac) for the
built-in ones.
"""

from __future__ import annotations

import time

import click

from ..errors import PlanError
from ..registry import POLICIES, Registry, Spec
from .common import MODEL_ARGUMENT, _load, _model_options, _progress, cli, console
from .options import Output


class RegistryChoice(click.Choice):
    """A choice among a registry's names, read when a value is checked or help is shown: the command line imports
    no method to start, and an entry registered later is a choice too."""

    def __init__(self, registry: Registry):
        self.registry = registry
        super().__init__((), case_sensitive=True)

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self.registry.names())

    @choices.setter
    def choices(self, value) -> None:  # click.Choice.__init__ sets it; the registry is the source
        pass


@cli.command("policy")
@MODEL_ARGUMENT
@click.option("--method", required=True, type=RegistryChoice(POLICIES),
              help="a registered policy: ffn-skip (FFN-SkipLLM: MLP saturation), lac (L2 Adaptive Computation: "
                   "residual norm change), lac-mlp (lac, halted tokens skipping only their MLPs)")
@click.option("--skip-ratio", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True),
              help="target share of all token-MLPs skipped on the calibration text (0 < r < 1)")
@click.option("--speedup", type=click.FloatRange(min=1, min_open=True),
              help="target decode speedup at batch 1; the skip ratio comes from a latency model measured now")
@click.option("--parts", type=click.Choice(["layer", "mlp"]),
              help="lac: what a halted token skips (layer: attention contribution and MLP)  [default: layer]")
@click.option("--window", type=click.IntRange(min=1),
              help="ffn-skip: consecutive saturated layers before a token halts  [default: 2]")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="an option of the chosen policy (repeatable), e.g. --option window=3")
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
@click.option("--corpus", default="gsm8k", show_default=True,
              help="calibration text: gsm8k, pydoc, self (text the model generates itself, cached), or a text file")
@click.option("--sequences", type=click.IntRange(min=1), help="calibration sequences  [default: per policy; 4]")
@click.option("--length", type=click.IntRange(min=2), help="tokens per sequence  [default: per policy; 256]")
@click.option("--out", "-o", type=Output("file"), required=True, help="policy file to write (JSON)")
@_model_options
def policy_command(model, method, skip_ratio, speedup, parts, window, options, protect_first, protect_last, warmup,
                   prefill, last_check, corpus, sequences, length, out, dtype, device):
    """Calibrate an input-adaptive skipping policy for MODEL and save it.

    The threshold is set so that the policy skips --skip-ratio of all token-MLPs on the calibration text (or the
    ratio a measured latency model says reaches --speedup). Use the file with `generate --policy`, `eval --policy`,
    `bench --policy`, `agree --policy`.
    """
    from ..measure.latency import LatencyModel
    from ..planners import load_calibration
    from ..policies import calibrate, policy_spec, skip_ratio_for_speedup

    if (skip_ratio is None) == (speedup is None):
        raise PlanError("give exactly one of --skip-ratio (e.g. 0.25) or --speedup (e.g. 1.2).")
    named = {"auto": "auto", "all": None}
    if last_check not in named and not last_check.isdigit():
        raise PlanError(f"--last-check must be a layer index, 'all' or 'auto', got {last_check!r}.")
    last_check = named[last_check] if last_check in named else int(last_check)
    spec = policy_spec(method)
    settings = {"protect_first": protect_first, "protect_last": protect_last, "warmup": warmup,
                **_method_options(spec, {"window": window, "parts": parts}, options)}
    default_sequences, default_length = spec.calibration or (4, 256)
    sequences, length = sequences or default_sequences, length or default_length
    hf_model, tokenizer = _load(model, dtype, device)
    calibration = load_calibration(tokenizer, corpus, sequences, length, model=hf_model)
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


def _method_options(spec: Spec, flags: dict, pairs: tuple[str, ...]) -> dict:
    """The chosen policy's own settings: the flags given (``--window``, ``--parts``), then ``--option key=value``
    (unset ones keep the policy's defaults). A flag for an option the policy does not have is an error."""
    names = {option.name for option in spec.options}
    values = {}
    for name, value in flags.items():
        if value is None:
            continue
        if name not in names:
            fixed = f" ({spec.name} fixes {name}={spec.defaults[name]!r})" if name in spec.defaults else ""
            raise PlanError(f"--{name} is not an option of the {spec.name!r} policy{fixed}; its options: "
                            f"{', '.join(sorted(names)) or 'none'}.")
        values[name] = value
    return {**values, **spec.parse_options(pairs)}
