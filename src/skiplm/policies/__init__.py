"""Input-adaptive policies: decide, per token, which sublayers run.

A static :class:`~skiplm.plan.SkipPlan` is the special case of a policy that never looks at the input. A *policy*
sees the residual stream as the forward pass goes (layer by layer, prefill or decode, token positions) and returns,
for each layer, a mask of the tokens whose MLP (and, for some policies, attention contribution) runs.

Policies here are *halting* policies: a token runs every layer until a per-token signal says it has settled, then
skips the skippable sublayers of the remaining layers (the first ``protect_first`` and the last ``protect_last``
layers, and the first ``warmup`` tokens, always run). Each registers itself in :data:`skiplm.registry.POLICIES`:

* ``ffn-skip`` (:mod:`.ffn_skip`, FFN-SkipLLM): the MLP has saturated. Attention always runs.
* ``lac`` (:mod:`.lac`, L2 Adaptive Computation): the residual's L2-norm change settled; separate thresholds for
  prefill and decode; ``parts`` says what a halted token skips (``lac-mlp``: only MLPs).

The package, in pipeline order: :mod:`.base` (what every policy shares, and the policy file format),
:mod:`.ffn_skip` and :mod:`.lac` (the signals), :mod:`.runtime` (the handle that executes decisions), :mod:`.maps`
(what a recorded run shows), :mod:`.calibrate` (thresholds from calibration text). Apply a policy with
:func:`skiplm.apply` (or :func:`apply_policy`); its handle counts what it skipped in ``handle.stats``.
"""

from ..registry import POLICIES
from ..report.plots.policies import plot_activation_maps  # kept here for callers of skiplm.policies
from ..skipper import load_skipper
from .base import (FORMAT_NAME, HaltingPolicy, apply_policy, is_policy, make_policy, policy_from_json, policy_spec,
                   register_policy)
from .calibrate import best_last_check, calibrate, measure_skip_ratio, skip_ratio_for_speedup
from .ffn_skip import FFNSkip
from .lac import LAC
from .maps import ActivationMap, activation_summary
from .runtime import PolicyHandle, PolicyStats

__all__ = ["FORMAT_NAME", "LAC", "POLICIES", "ActivationMap", "FFNSkip", "HaltingPolicy", "PolicyHandle", "PolicyStats",
           "activation_summary", "apply_policy", "best_last_check", "calibrate", "is_policy", "load_skipper",
           "make_policy", "measure_skip_ratio", "plot_activation_maps", "policy_from_json", "policy_spec",
           "register_policy", "skip_ratio_for_speedup"]
