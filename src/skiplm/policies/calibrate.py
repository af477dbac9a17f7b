"""Calibration: the threshold at which a policy skips a wanted share of token-MLPs on calibration text (bisection),
the ``last_check`` horizon where later halts stop paying for their checks, and the share of MLPs a target decode
speedup needs by a measured latency model. Any registered policy calibrates: the bisection reads its
``threshold_range`` and ``more_skips_with_larger``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import PlanError
from ..models.adapters import count_layers
from .base import HaltingPolicy, apply_policy, make_policy, policy_spec


@torch.no_grad()
def measure_skip_ratio(model: nn.Module, policy: HaltingPolicy, batches: Sequence[torch.Tensor]) -> float:
    """Share of token-MLPs ``policy`` skips on ``batches`` (teacher-forced forwards without a cache, i.e. prefill)."""
    with apply_policy(model, policy, check_model=False) as handle:
        for batch in batches:
            model(input_ids=batch.to(next(model.parameters()).device), use_cache=False)
    return handle.stats.mlp_skip_ratio("prefill") or 0.0


def max_skip_ratio(num_layers: int, protect_first: int, protect_last: int) -> float:
    return (num_layers - protect_first - protect_last) / num_layers


# One per-layer check (the signal, a cosine or norms) against one MLP sublayer, at batch-1 decode on the 2-core CPU
# of FACTS.md: ~45 us between the model's large matrix products (its caches are cold) against ~0.8 ms.
CHECK_COST_IN_MLPS = 0.05


def calibrate(model: nn.Module, method: str, batches: Sequence[torch.Tensor], ratio: float, *, steps: int = 14,
              prefill: str = "same", last_check: int | str | None = "auto", check_cost: float = CHECK_COST_IN_MLPS,
              progress: Callable[[int, int], None] | None = None, **settings: Any) -> HaltingPolicy:
    """A ``method`` policy (any registered name, presets included) whose threshold skips ``ratio`` of all token-MLPs
    on the calibration batches (bisection on the threshold within the policy's ``threshold_range``; the ratio is
    monotone in it). ``prefill``: "same" or "full" (prefill runs every layer). ``settings``: the policy's own.

    ``last_check``: the last layer whose signal may halt a token (None: every layer that can). "auto" picks it from
    the calibration text: the horizon that maximises the MLPs saved minus the cost of the checks, each check costing
    ``check_cost`` MLPs (a token that never halts pays a check at every observed layer, and halts late in the stack
    save little), then calibrates the threshold again with it.
    """
    num_layers = count_layers(model)
    probe = make_policy(method, num_layers, 0.0, **settings)
    ceiling = max_skip_ratio(num_layers, probe.protect_first, probe.protect_last)
    if not 0 < ratio < ceiling:
        raise PlanError(
            f"{method}: a skip ratio of {ratio:g} is out of reach: with protect_first={probe.protect_first} and "
            f"protect_last={probe.protect_last}, at most {ceiling:.2f} of the MLPs of a {num_layers}-layer model can be "
            "skipped. Ask for less, or protect fewer layers."
        )
    if prefill not in ("same", "full"):
        raise PlanError(f"prefill must be 'same' or 'full', got {prefill!r}.")
    auto = last_check == "auto"
    if isinstance(last_check, str) and not auto:
        raise PlanError(f"last_check must be a layer index, None or 'auto', got {last_check!r}.")
    total = 2 * steps if auto else steps
    report = (lambda done: progress(done, total)) if progress else (lambda done: None)
    settings = {**settings, "last_check": None if auto else last_check}
    threshold, measured = _bisect(model, num_layers, method, batches, ratio, steps, settings, report)
    if auto:
        chosen = best_last_check(model, make_policy(method, num_layers, threshold, **settings), batches, check_cost)
        if chosen != probe.last_check:  # the probe has the default: every layer that can decide
            settings["last_check"] = chosen
            threshold, measured = _bisect(model, num_layers, method, batches, ratio, steps, settings,
                                          lambda done: report(steps + done))
        report(total)
    policy = make_policy(method, num_layers, threshold, prefill_threshold="same" if prefill == "same" else None,
                         **settings)
    tokens = sum(int(b.numel()) for b in batches)
    policy.provenance = {"method": policy.method, "target_skip_ratio": ratio, "calibrated_skip_ratio": measured,
                         "calibration_tokens": tokens}
    if auto:
        policy.provenance.update(last_check="auto", check_cost_in_mlps=check_cost)
    return policy.for_model(model)


def _bisect(model, num_layers, method, batches, ratio, steps, settings, report) -> tuple[float, float]:
    """(threshold, measured ratio) of the bisection step closest to ``ratio``."""
    policy_class = policy_spec(method).target
    low, high = policy_class.threshold_range
    more_with_larger = policy_class.more_skips_with_larger
    best: tuple[float, float] | None = None
    for step in range(steps):
        middle = (low + high) / 2
        measured = measure_skip_ratio(model, make_policy(method, num_layers, middle, **settings), batches)
        if best is None or abs(measured - ratio) < abs(best[1] - ratio):
            best = (middle, measured)
        if (measured < ratio) == more_with_larger:
            low = middle
        else:
            high = middle
        report(step + 1)
    return best


@torch.no_grad()
def best_last_check(model: nn.Module, policy: HaltingPolicy, batches: Sequence[torch.Tensor],
                    check_cost: float = CHECK_COST_IN_MLPS) -> int:
    """The ``last_check`` that maximises, over the calibration tokens, MLPs saved minus ``check_cost`` x checks,
    from where ``policy`` (checking every layer it can) halts each token. A token that halts at layer k was checked
    at the observed layers before k and saves the MLPs from k on; with a horizon before k-1 it would not halt, and
    would be checked at every observed layer up to the horizon."""
    with apply_policy(model, policy, check_model=False, record=True) as handle:
        for batch in batches:
            model(batch)
    halts = torch.cat([_first_skipped_layer(m.grid("mlp", policy.num_layers)) for m in handle.maps])
    first, stop = policy.observed.start, policy.skippable.stop
    halted = halts < policy.num_layers
    best: tuple[float, int] | None = None
    for horizon in range(policy.protect_first - 1, stop - 1):
        kept = halted & (halts - 1 <= horizon)
        saved = float((stop - halts[kept]).sum())
        checks = float((halts[kept] - first).sum()) + float((~kept).sum()) * (horizon - first + 1)
        net = saved - check_cost * checks
        if best is None or net > best[0]:
            best = (net, horizon)
    return best[1]


def _first_skipped_layer(grid: torch.Tensor) -> torch.Tensor:
    """Per token of a [layers, batch, tokens] run grid: the first layer whose MLP it skipped (layers if none)."""
    skipped = (~grid).flatten(1)
    return torch.where(skipped.any(0), skipped.int().argmax(0), grid.shape[0])


def skip_ratio_for_speedup(latency, num_layers: int, speedup: float) -> float:
    """The share of token-MLPs to skip for a decode ``speedup`` by a measured :class:`~skiplm.measure.latency.LatencyModel`
    (each skipped MLP saves ``latency.mlp_s``)."""
    if not speedup > 1:
        raise PlanError(f"target speedup must be greater than 1, got {speedup}.")
    if latency.mlp_s <= 0:
        raise PlanError("the latency model measured no saving from skipping MLPs on this device.")
    return (1 - 1 / speedup) * latency.full_s / (num_layers * latency.mlp_s)
