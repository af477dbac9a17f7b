"""Training FiRST routers (:mod:`.first`) toward the full model, and calibrating their threshold to a target speedup.

1. **Target.** A decode speedup ``s`` asks for ``k`` skipped blocks per sequence: ``k = (1 - 1/s) * full / block``,
   from a measured :class:`~skiplm.measure.latency.LatencyModel` (``full_s``, ``block_s``: what ``skiplm policy
   --speedup`` measures) or, without one, the parameter-count :class:`~skiplm.measure.costs.CostModel`. The skip
   ratio is ``k`` over the routed layers.
2. **Start.** Routers read nothing at first (zero weights); their biases start from the model's own block influence
   (ShortGPT's ``1 - cos(h_in, h_out)`` on the first calibration sequences): the ``k`` least influential routed
   layers start at gate 0.05, the others at 0.95 (so the mean gate starts near the target) — the static
   block-influence plan, which training then makes input-adaptive (a few hundred steps on a CPU cannot learn
   routing from scratch).
3. **Training** (:func:`skiplm.train.distill.distill`: the transformers ``Trainer``, a resumable run folder,
   held-out evaluations and early stop): soft gates (:class:`~.first.SoftGateHandle`: ``h + g (layer(h) - h)``,
   the router reading the first ``prompt_tokens`` tokens of each sequence), loss = KL(full || student) per token +
   ``cost_weight * (mean gate - (1 - skip ratio))^2``, and — as the paper does — a LoRA adapter (peft) on the linear
   layers of every layer, trained jointly (``rank=0``: routers only).
4. **Threshold.** Bisection on the threshold so that the hard decisions (with the adapter merged) skip ``k`` blocks
   per sequence on average over calibration prompts (the first ``prompt_tokens`` tokens of the training sequences).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..plan import provenance
from .first import PAPER, PROMPT_TOKENS, FiRST, RouterError, Routers, protected_layers

LOW_BIAS, HIGH_BIAS = -3.0, 3.0  # the starting gates (0.05, 0.95) of the least influential layers and the others


def blocks_for_speedup(model: nn.Module, speedup: float, latency=None) -> float:
    """Blocks to skip per sequence for a decode ``speedup``: from ``latency`` (a measured LatencyModel), else from the
    parameter-count cost model."""
    if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not speedup > 1:
        raise RouterError(f"target speedup must be a number greater than 1, got {speedup!r}.")
    saved = 1 - 1 / speedup
    if latency is not None:
        block_s = latency.block_s if latency.block_s is not None else latency.attention_s + latency.mlp_s
        if block_s <= 0:
            raise RouterError("the latency model measured no saving from skipping blocks on this device.")
        return saved * latency.full_s / block_s
    from ..measure.costs import CostModel

    costs = CostModel.from_parameter_counts(model)
    block = (sum(costs.attention) + sum(costs.mlp)) / len(costs.mlp)
    return saved * costs.total / block


@torch.no_grad()
def block_influence(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    """[layers] mean over tokens of ``1 - cos(h_in, h_out)`` of each decoder layer (the full model)."""
    totals = None
    count = 0
    device = next(model.parameters()).device
    for ids in batches:
        hidden = model(input_ids=ids.to(device), output_hidden_states=True, use_cache=False).hidden_states
        scores = torch.stack([1 - torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean()
                              for a, b in zip(hidden[:-1], hidden[1:])])
        totals = scores if totals is None else totals + scores
        count += 1
    return (totals / max(count, 1)).cpu()


def initial_bias(influence: torch.Tensor, routed: tuple[int, ...], blocks: float) -> torch.Tensor:
    """[routed] starting biases: the ``round(blocks)`` least influential routed layers low, the others high."""
    scores = influence[list(routed)]
    low = scores.argsort()[:max(0, min(len(routed), round(blocks)))]
    bias = torch.full((len(routed),), HIGH_BIAS)
    bias[low] = LOW_BIAS
    return bias


@torch.no_grad()
def skipped_per_sequence(model: nn.Module, first: FiRST, prompts: torch.Tensor, batch_size: int = 8) -> float:
    """Mean blocks ``first`` skips per sequence on ``prompts`` [N, L] (prefill forwards without a cache)."""
    device = next(model.parameters()).device
    with first.install(model, check_model=False, merge=False) as handle:
        for start in range(0, prompts.shape[0], batch_size):
            model(input_ids=prompts[start:start + batch_size].to(device), use_cache=False)
    return handle.stats.blocks_skipped_by_sequences / max(handle.stats.sequences, 1)


def calibrate_threshold(model: nn.Module, first: FiRST, prompts: torch.Tensor, blocks: float, *, steps: int = 16,
                        progress: Callable[[int, int], None] | None = None) -> tuple[float, float]:
    """(threshold, measured blocks per sequence): bisection on the threshold in [0, 1] for ``blocks`` skipped blocks
    per sequence on ``prompts`` (more skips with a larger threshold). The adapter, if any, must be on the model
    already (merged), as it is when the routers run."""
    low, high = 0.0, 1.0
    best: tuple[float, float] | None = None
    for step in range(steps):
        middle = (low + high) / 2
        adapterless = dataclasses.replace(first, threshold=middle, adapter=None, route_tokens=None)
        measured = skipped_per_sequence(model, adapterless, prompts)
        if best is None or abs(measured - blocks) < abs(best[1] - blocks):
            best = (middle, measured)
        if measured < blocks:
            low = middle
        else:
            high = middle
        if progress:
            progress(step + 1, steps)
    return best


def train_first(model: nn.Module, calibration: Any, *, speedup: float | None = None, blocks: float | None = None,
                latency=None, rank: int = 16, alpha: float = 0.0, modules: str = "all", cost_weight: float = 5.0,
                prompt_tokens: int = PROMPT_TOKENS, straight_through: bool = False,
                protect_first: int | None = None, protect_last: int | None = None, held_out: int = 8,
                calibration_prompts: int = 32, settings=None, run_dir: str | Path | None = None,
                resume: bool = False, progress: Callable[..., None] | None = None) -> FiRST:
    """Train FiRST routers (and a LoRA adapter of ``rank``; 0: none) on ``model`` toward the full model, for a
    target ``speedup`` (blocks per sequence from ``latency`` or the cost model) or ``blocks`` per sequence; returns
    the :class:`FiRST` with its calibrated threshold. ``calibration``: token-id sequences (the last ``held_out``
    kept for evaluations). ``settings``: :class:`skiplm.train.distill.TrainSettings`. ``run_dir`` / ``resume``:
    the training run folder and whether to continue the run there. ``progress(step, total, info)`` while training,
    ``progress(done, total)`` while calibrating. ``model`` is unchanged afterwards."""
    from ..heal.spans import HealError
    from ..heal.train import _split, kept_linears
    from ..plan import SkipPlan
    from ..train.distill import TrainError, TrainSettings, TrainingInterrupted, distill

    start = time.perf_counter()
    if (speedup is None) == (blocks is None):
        raise RouterError("give exactly one of speedup= (e.g. 1.2) or blocks= (blocks skipped per sequence).")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise RouterError(f"rank must be a whole number >= 0, got {rank!r}.")
    if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int) or prompt_tokens < 1:
        raise RouterError(f"prompt_tokens must be a whole number >= 1, got {prompt_tokens!r}.")
    if not (isinstance(cost_weight, (int, float)) and cost_weight >= 0):
        raise RouterError(f"cost_weight must be a number >= 0, got {cost_weight!r}.")
    settings = settings or TrainSettings()
    from ..models.adapters import count_layers

    num_layers = count_layers(model)
    routed = tuple(protected_layers(num_layers, protect_first, protect_last))
    target = blocks_for_speedup(model, speedup, latency) if blocks is None else float(blocks)
    if not 0 < target < len(routed):
        raise RouterError(f"{target:.2f} skipped blocks per sequence are out of reach with {len(routed)} routed layers "
                          f"(layers {routed[0]}-{routed[-1]}): ask for less, or protect fewer layers.")
    try:
        train, evaluation = _split(calibration, held_out)
    except HealError as exc:
        raise RouterError(str(exc)) from None
    if train.input_ids.shape[1] <= prompt_tokens:
        raise RouterError(f"training sequences of {train.input_ids.shape[1]} tokens leave nothing after the "
                          f"{prompt_tokens}-token prompt the routers read; use longer sequences or a smaller "
                          "prompt_tokens.")
    sample = [train.input_ids[i:i + 1] for i in range(min(4, len(train)))]
    bias = initial_bias(block_influence(model, sample), routed, target)
    first = FiRST.initial(model, protect_first=routed[0], protect_last=num_layers - 1 - routed[-1], bias=bias,
                          prompt_tokens=prompt_tokens)
    routers = Routers(first.weight, first.bias)
    target_keep = 1 - target / len(routed)
    base = first.soft(routers, target_keep=target_keep, cost_weight=float(cost_weight),
                      straight_through=bool(straight_through))
    adapter = None
    if rank:
        from peft import LoraConfig

        targets = kept_linears(model, SkipPlan.empty(num_layers), modules)
        adapter = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=targets, lora_dropout=0.0,
                             bias="none")
    options = {"rank": rank, "alpha": (alpha or 2 * rank) if rank else None, "modules": modules,
               "cost_weight": cost_weight, "prompt_tokens": prompt_tokens, "straight_through": straight_through,
               "routed": list(routed), "target_blocks": round(target, 4)}
    identity = {"method": "first", "options": options}
    from ..heal.artifact import peft_quietly

    try:
        with peft_quietly():
            result = distill(model, base, train, evaluation, adapter=adapter, layers=None if rank else [],
                             settings=settings, run_dir=run_dir, resume=resume, progress=progress,
                             identity=identity)
    except TrainingInterrupted:
        raise
    except TrainError as exc:
        raise RouterError(str(exc)) from None
    trained = dataclasses.replace(first, weight=routers.weight.detach().clone(), bias=routers.bias.detach().clone(),
                                  adapter=result.step if rank else None)
    # the threshold, with the adapter merged as at run time (restored after)
    prompts = train.input_ids[:calibration_prompts, :prompt_tokens]
    with _merged(model, trained):
        threshold, measured = calibrate_threshold(model, trained, prompts, target, progress=progress)
    record = provenance("first", paper=PAPER, target_speedup=speedup, target_blocks_per_sequence=target,
                        latency=latency.to_json() if latency is not None else None,
                        cost_source="latency model" if latency is not None else "parameter counts",
                        options=options, calibrated_blocks_per_sequence=measured,
                        calibration_prompts={"sequences": int(prompts.shape[0]), "tokens": prompt_tokens},
                        seconds=round(time.perf_counter() - start, 1), training=result.record)
    return dataclasses.replace(trained, threshold=threshold, provenance=record)


class _merged:
    """The FiRST adapter merged into the model's weights inside the block, the originals back after it."""

    def __init__(self, model: nn.Module, first: FiRST):
        self.model, self.first, self.originals = model, first, []

    def __enter__(self):
        if self.first.adapter is not None:
            self.originals = self.first.adapter.merge(self.model)
        return self.model

    def __exit__(self, *exc_info) -> None:
        from ..heal.artifact import _copy_back

        _copy_back(self.originals)


__all__ = ["block_influence", "blocks_for_speedup", "calibrate_threshold", "initial_bias", "skipped_per_sequence",
           "train_first"]
