"""Planners turn a model (and, for some, calibration data) into a SkipPlan. One module per method; each registers
itself in :data:`skiplm.registry.PLANNERS` with its spec (paper, what it needs, whether one run serves many targets,
its options), and its presets (``similarity-attention``, ...) beside it. Importing this package registers them all."""

from __future__ import annotations

import functools
from collections.abc import Callable

from ..errors import PlanError
from ..registry import PLANNERS
from .common import Calibration, load_calibration
from .uniform import plan_uniform
from .block_influence import plan_block_influence
from .angular import plan_angular
from .similarity import plan_similarity
from .greedy_loss import plan_greedy_loss
from .search import plan_search


def get_planner(method: str) -> Callable:
    """The planner function registered as ``method``; a preset's, with its fixed options applied."""
    if method not in PLANNERS:
        raise PlanError(f"unknown planner {method!r}; available: {', '.join(PLANNERS.names())}.")
    spec = PLANNERS.get(method)
    return functools.partial(spec.target, **spec.defaults) if spec.defaults else spec.target


__all__ = ["Calibration", "PLANNERS", "get_planner", "load_calibration", "plan_angular", "plan_block_influence",
           "plan_greedy_loss", "plan_search", "plan_similarity", "plan_uniform"]
