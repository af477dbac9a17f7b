"""Healing by training (:mod:`skiplm.train.distill`): the skipped model distilled toward the full one.

* ``lora`` — a LoRA adapter (peft) on the linear layers of the layers the plan still runs (Shortened LLaMA, arXiv
  2402.02834, heals depth-pruned models with LoRA; the loss here is KL to the full model on its own generations, as
  self-data distillation, arXiv 2410.09982, does). Unmerged it costs extra matrix multiplies per step;
  ``merge=True`` adds it into the weights, after which the healed model runs at the plan's speed.
* ``partial`` — whole kept layers trained: ``layers_per_cut`` layers after each span of skipped blocks (before it,
  for a span at the end), all their weights (LLM-Streamline, ICLR 2025, trains one replacement layer per cut).
  Costs nothing at run time.

Both train on token-id sequences (``calibration``: self-generated text by default in ``skiplm heal``), keep the last
``held_out`` sequences out of training for the evaluations and early stop, and build on an earlier heal (``base``:
``bridge`` then ``lora``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..plan import SkipPlan, provenance
from ..registry import HEALERS, Option
from .artifact import Healed, peft_quietly
from .spans import HealError, check_block_plan, checked_plan

LORA_PAPER = "Kim et al. 2024, Shortened LLaMA: Depth Pruning for LLMs (arXiv 2402.02834); self-data distillation: " \
             "Thangarasa et al. 2024 (arXiv 2410.09982)"
PARTIAL_PAPER = "Chen et al. 2025, Streamlining Redundant Layers to Compress LLMs (LLM-Streamline, ICLR 2025)"

MODULE_CHOICES = ("all", "attention", "mlp")


def _training_options(learning_rate: float, steps: int) -> tuple[Option, ...]:
    return (
        Option("steps", int, steps, "optimizer steps at most"),
        Option("minutes", float, 0.0, "wall-time bound on training in minutes (0: none)"),
        Option("batch_size", int, 4, "sequences per step"),
        Option("learning_rate", float, learning_rate, "peak learning rate (cosine schedule, short warm-up)"),
        Option("eval_every", int, 20, "steps between held-out evaluations and checkpoints"),
        Option("patience", int, 3, "evaluations without a better held-out KL before stopping early (0: never)"),
        Option("held_out", int, 8, "sequences of the data kept out of training for the evaluations"),
        Option("bf16", str, "auto", "bf16 autocast: auto (where the hardware has bf16 units), on, off",
               ("auto", "on", "off")),
        Option("seed", int, 0, "seed of the data order and the adapter's initialisation"),
    )


def check_training_options(method: str, options: dict[str, Any]) -> None:
    """Refuse bad training options of ``method`` before any model loads or data is generated (a HealError)."""
    from ..train.distill import TrainError

    spec = HEALERS.get(method)
    values = {**{o.name: o.default for o in spec.options}, **options}
    try:
        _settings(values)
    except TrainError as exc:
        raise HealError(str(exc)) from None
    if values["held_out"] < 1:
        raise HealError(f"held_out must be a whole number >= 1, got {values['held_out']!r}.")
    for name in ("rank", "layers_per_cut"):
        if name in values and values[name] < 1:
            raise HealError(f"{name} must be a whole number >= 1, got {values[name]!r}.")


def _settings(options: dict[str, Any]):
    from ..train.distill import TrainSettings

    return TrainSettings(steps=options["steps"], minutes=options["minutes"] or None,
                         batch_size=options["batch_size"], learning_rate=options["learning_rate"],
                         eval_every=options["eval_every"], patience=options["patience"],
                         bf16={"auto": None, "on": True, "off": False}[options["bf16"]], seed=options["seed"])


def _split(calibration: Any, held_out: int):
    from ..train.distill import Sequences, TrainError

    data = Sequences.of(calibration)
    if isinstance(held_out, bool) or not isinstance(held_out, int) or held_out < 1:
        raise HealError(f"held_out must be a whole number >= 1, got {held_out!r}.")
    if len(data) < held_out + 1:
        raise HealError(f"training needs more than held_out={held_out} sequences of data, got {len(data)}: generate "
                        "or pass more, or lower held_out.")
    try:
        train = Sequences(data.input_ids[:-held_out], data.loss_mask[:-held_out], data.attention_mask[:-held_out],
                          source=data.source)
        evaluation = Sequences(data.input_ids[-held_out:], data.loss_mask[-held_out:],
                               data.attention_mask[-held_out:], source=data.source + " (held out)")
    except TrainError as exc:
        raise HealError(str(exc)) from None
    return train, evaluation


def _base(model: nn.Module, plan: SkipPlan, base: Healed | None) -> tuple[SkipPlan, Any]:
    """The plan (checked against ``model``) and what the student starts from: the plan, or an earlier heal."""
    plan = checked_plan(model, plan, "healing trains")
    if plan.is_empty():
        raise HealError("the plan skips nothing: there is nothing to heal.")
    if base is not None and base.plan.to_json() != plan.to_json():
        raise HealError("the heal to build on was made for another plan.")
    return plan, (plan if base is None else base)


def _run(model, plan, base, calibration, progress, run_dir, resume, options, *, method, paper, adapter=None,
         layers=None, extra_record=None) -> Healed:
    from ..train.distill import TrainError, TrainingInterrupted, distill

    start = time.perf_counter()
    plan, start_from = _base(model, plan, base)
    train, evaluation = _split(calibration, options["held_out"])
    identity = {"method": method, "plan": plan.to_json(), "base": None if base is None else base.method,
                "options": {k: v for k, v in sorted(options.items()) if k != "minutes"}}
    try:
        result = distill(model, start_from, train, evaluation, adapter=adapter, layers=layers,
                         settings=_settings(options), run_dir=run_dir, resume=resume, progress=progress,
                         identity=identity)
    except TrainingInterrupted:
        raise  # the run folder holds its checkpoint: resume continues it
    except TrainError as exc:
        raise HealError(str(exc)) from None
    record = provenance(method, paper=paper, plan_method=plan.provenance.get("method"), options=options,
                        seconds=round(time.perf_counter() - start, 1))
    record = {**record, "training": {**result.record, **(extra_record or {})}}
    if base is None:
        return Healed(plan, [result.step], provenance={method: record})
    return base.then(result.step, provenance={method: record})


def kept_linears(model: nn.Module, plan: SkipPlan, modules: str) -> list[str]:
    """Full names of the nn.Linear modules in the branches the plan still runs (in some phase), of kind ``modules``."""
    from ..models.adapters import get_adapter

    if modules not in MODULE_CHOICES:
        raise HealError(f"modules must be one of {', '.join(MODULE_CHOICES)}, got {modules!r}.")
    adapter = get_adapter(model)
    names = []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        for part in ("attention", "mlp"):
            if modules not in ("all", part):
                continue
            if all(plan.phase(phase).skips(index, part) for phase in ("prefill", "decode")):
                continue
            core, _ = adapter.branch_modules(layer, part)
            prefix = f"{adapter.layers}.{index}.{adapter.attention if part == 'attention' else adapter.mlp}"
            names += [f"{prefix}.{name}" for name, module in core.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise HealError(f"the plan runs no {modules} linear layers to put an adapter on.")
    return names


def heal_lora(model: nn.Module, plan: SkipPlan, *, calibration: Any = None, progress: Callable | None = None,
              base: Healed | None = None, run_dir: str | Path | None = None, resume: bool = False,
              rank: int = 16, alpha: float = 0.0, modules: str = "all", **options: Any) -> Healed:
    """Heal ``plan`` with a LoRA adapter distilled toward the full model on ``calibration`` (token-id sequences).
    ``base``: a heal to build on (e.g. a bridge). Returns a :class:`Healed` with a ``lora`` step."""
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise HealError(f"rank must be a whole number >= 1, got {rank!r}.")
    targets = kept_linears(model, plan, modules)
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=targets, lora_dropout=0.0, bias="none")
    options = {**options, "rank": rank, "alpha": alpha or 2 * rank, "modules": modules}
    with peft_quietly():
        return _run(model, plan, base, calibration, progress, run_dir, resume, options, method="lora",
                    paper=LORA_PAPER, adapter=config, extra_record={"adapter_modules": len(targets)})


def cut_layers(plan: SkipPlan, layers_per_cut: int) -> list[int]:
    """The kept layers ``partial`` trains: ``layers_per_cut`` after each span of skipped blocks (before, at the end)."""
    kept = [i for i in range(plan.num_layers) if not plan.phase("decode").skips(i, "attention")
            or not plan.phase("decode").skips(i, "mlp")]
    chosen: list[int] = []
    for start, end in check_block_plan(plan):
        after = [i for i in kept if i > end][:layers_per_cut]
        before = [i for i in kept if i < start][-layers_per_cut:]
        chosen += after if len(after) == layers_per_cut or not before else before
    return sorted(set(chosen))


def heal_partial(model: nn.Module, plan: SkipPlan, *, calibration: Any = None, progress: Callable | None = None,
                 base: Healed | None = None, run_dir: str | Path | None = None, resume: bool = False,
                 layers_per_cut: int = 1, **options: Any) -> Healed:
    """Heal a block plan by training whole kept layers next to each cut toward the full model."""
    from ..models.adapters import get_adapter

    if isinstance(layers_per_cut, bool) or not isinstance(layers_per_cut, int) or layers_per_cut < 1:
        raise HealError(f"layers_per_cut must be a whole number >= 1, got {layers_per_cut!r}.")
    if not isinstance(plan, SkipPlan):
        raise HealError(f"healing trains a SkipPlan (skiplm plan), got {type(plan).__name__}.")
    layers = cut_layers(plan, layers_per_cut)
    prefix = get_adapter(model).layers
    names = [name for name, _ in model.named_parameters()
             if any(name.startswith(f"{prefix}.{i}.") for i in layers)]
    options = {**options, "layers_per_cut": layers_per_cut}
    return _run(model, plan, base, calibration, progress, run_dir, resume, options, method="partial",
                paper=PARTIAL_PAPER, layers=names,
                extra_record={"layers": layers, "parameters": sum(dict(model.named_parameters())[n].numel() for n in names)})


HEALERS.register(
    "lora",
    paper=LORA_PAPER,
    needs={"calibration"},
    calibration=(136, 256),
    summary="a LoRA adapter on the layers the plan runs, distilled toward the full model (KL, its own text)",
    options=(
        Option("rank", int, 16, "LoRA rank"),
        Option("alpha", float, 0.0, "LoRA alpha (0: twice the rank)"),
        Option("modules", str, "all", "which linear layers get an adapter", MODULE_CHOICES),
        *_training_options(2e-4, 200),
    ),
    extra={"trains": True},
)(heal_lora)

HEALERS.register(
    "partial",
    paper=PARTIAL_PAPER,
    needs={"calibration"},
    calibration=(136, 256),
    summary="whole kept layers next to each cut trained toward the full model (KL, its own text)",
    options=(
        Option("layers_per_cut", int, 1, "kept layers trained after each span of skipped blocks"),
        *_training_options(5e-5, 200),
    ),
    extra={"trains": True, "blocks_only": True},
)(heal_partial)

__all__ = ["check_training_options", "cut_layers", "heal_lora", "heal_partial", "kept_linears"]
