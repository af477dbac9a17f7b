"""`skiplm plan`: make a static skip plan and save it. Methods, their options and their calibration sizes come from
the planner registry (:data:`skiplm.registry.PLANNERS`): a newly registered planner is a ``--method`` here, its
options settable with ``--option key=value``."""

from __future__ import annotations

import time

import click

from ..errors import PlanError
from ..registry import PLANNERS
from .common import MODEL_ARGUMENT, _load, _model_options, _progress, cli, console
from .options import POSITIVE, Output


def _method_help() -> str:
    plain = [spec.name for spec in PLANNERS if not spec.data_driven]
    return (f"planning method: {', '.join(PLANNERS.names())} (all but {', '.join(plain)} are fitted on calibration "
            "text)")


def _calibration_default(index: int) -> str:
    """The default calibration size (0: sequences, 1: tokens each) as the registry says: the usual one, and the
    planners that differ."""
    sizes = {spec.name: spec.calibration[index] for spec in PLANNERS if spec.calibration and not spec.defaults}
    usual = max(set(sizes.values()), key=list(sizes.values()).count)
    others = ", ".join(f"{name} {size}" for name, size in sizes.items() if size != usual)
    return f"[default: per method; {usual}{', ' + others if others else ''}]"


@cli.command()
@MODEL_ARGUMENT
@click.option("--method", default="uniform", show_default=True, help=_method_help())
@click.option("--speedup", type=float, help="target ideal speedup, e.g. 1.25")
@click.option("--skip", type=int, help="number of units to skip: blocks, or sublayers for --unit attention/mlp/joint")
@click.option("--unit", help="similarity: attention, mlp, block or joint (attention and MLP ranked together)  "
                             "[default: block]")
@click.option("--latency-ms", type=click.FloatRange(min=0, min_open=True),
              help="search: target decode step time on this device (ms)")
@click.option("--max-kl", type=click.FloatRange(min=0),
              help="search: quality budget, the largest mean KL to the full model allowed")
@click.option("--iterative", is_flag=True, help="similarity: re-score the remaining units after each drop")
@click.option("--option", "extra_options", multiple=True, metavar="KEY=VALUE",
              help="any option of the method, e.g. --option candidates=16 (repeatable)")
@click.option("--corpus", help="calibration text of data-driven methods: gsm8k, pydoc, self (text the model generates itself, cached), or a text file  [default: gsm8k]")
@click.option("--sequences", type=POSITIVE, help=f"calibration sequences  {_calibration_default(0)}")
@click.option("--length", type=POSITIVE, help=f"tokens per calibration sequence  {_calibration_default(1)}")
@click.option("--prefill", type=click.Choice(["same", "full"]), default="same", show_default=True,
              help="prefill skips the same layers, or runs at full depth")
@click.option("--out", "-o", type=Output("file"), required=True, help="plan file to write (JSON)")
@_model_options
def plan(model, method, speedup, skip, latency_ms, max_kl, unit, iterative, extra_options, corpus, sequences, length,
         prefill, out, dtype, device):
    """Make a skip plan for MODEL and save it."""
    from ..measure.costs import CostModel
    from ..planners import get_planner, load_calibration
    from ..planners.common import DEFAULT_CORPUS, Target

    planner = get_planner(method)  # a preset's fixed options applied
    spec = PLANNERS.get(method)
    accepted = {option.name for option in spec.options}
    flags = {"unit": unit, "iterative": iterative or None, "latency_ms": latency_ms, "max_kl": max_kl}
    for option, value in flags.items():
        if value is not None and option not in accepted:
            raise PlanError(f"--{option.replace('_', '-')} does not apply to the {method!r} method.")
    kwargs = {**{option: value for option, value in flags.items() if value is not None},
              **spec.parse_options(extra_options)}
    if "latency_ms" not in kwargs and "max_kl" not in kwargs:
        Target.of(speedup, skip)  # a bad target fails before the model loads
    if not spec.data_driven and (corpus, sequences, length) != (None, None, None):
        raise PlanError(f"the {method!r} method uses no calibration text: drop --corpus / --sequences / --length.")
    hf_model, tokenizer = _load(model, dtype, device)
    if spec.data_driven:
        corpus = DEFAULT_CORPUS if corpus is None else corpus
        sequences = spec.calibration[0] if sequences is None else sequences
        length = spec.calibration[1] if length is None else length
        kwargs["calibration"] = load_calibration(tokenizer, corpus, sequences, length, model=hf_model)
    start = time.perf_counter()
    if spec.data_driven:  # data-driven planners report progress(done, total)
        with _progress() as progress:
            kwargs["progress"] = _PlanningProgress(progress, method)
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


class _PlanningProgress:
    """A planner's ``progress(done, total)`` on a bar. A planner whose phases have no known length (``search``: the
    latency model, the full model's reference, the search path, the refinement) names each with ``phase(name)``, so
    the line says what runs instead of a bare ``0/?``."""

    def __init__(self, progress, method: str):
        self.progress, self.method = progress, method
        self.task = progress.add_task(f"planning ({method})", total=None)

    def __call__(self, done: int, total: int | None) -> None:
        self.progress.update(self.task, completed=done, total=total)

    def phase(self, name: str) -> None:
        description = f"planning ({self.method}): {name}"
        if not console.is_terminal:  # no live display (e.g. output to a file): a line per phase
            console.print(description)
        self.progress.update(self.task, description=description)
