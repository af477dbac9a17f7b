"""Input-adaptive policies: decide per token which sublayers run (FFN-SkipLLM, L2 Adaptive Computation)."""

from .core import (FORMAT_NAME, LAC, POLICIES, ActivationMap, FFNSkip, HaltingPolicy, PolicyHandle, PolicyStats,
                   activation_summary, apply_policy, best_last_check, calibrate, is_policy, make_policy,
                   measure_skip_ratio, plot_activation_maps, policy_from_json, skip_ratio_for_speedup)
from ..skipper import load_skipper

__all__ = ["FORMAT_NAME", "LAC", "POLICIES", "ActivationMap", "FFNSkip", "HaltingPolicy", "PolicyHandle", "PolicyStats",
           "activation_summary", "apply_policy", "best_last_check", "calibrate", "is_policy", "load_skipper",
           "make_policy", "measure_skip_ratio", "plot_activation_maps", "policy_from_json", "skip_ratio_for_speedup"]
