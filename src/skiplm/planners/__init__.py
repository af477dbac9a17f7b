"""Planners turn a model (and, for some, calibration data) into a SkipPlan. One module per method, registered by name."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import PlanError
from .angular import plan_angular
from .block_influence import plan_block_influence
from .common import Calibration, load_calibration
from .greedy_loss import plan_greedy_loss
from .search import plan_search
from .similarity import plan_similarity
from .uniform import plan_uniform

# Data-driven planners take ``calibration=`` (token-id batches; see load_calibration) and carry
# ``calibration_defaults`` = (sequences, length), the size the CLI builds when not told otherwise.
PLANNERS: dict[str, Callable] = {
    "uniform": plan_uniform,
    "block-influence": plan_block_influence,
    "angular": plan_angular,
    "similarity": plan_similarity,
    "greedy-loss": plan_greedy_loss,
    "search": plan_search,
}


def get_planner(method: str) -> Callable:
    try:
        return PLANNERS[method]
    except KeyError:
        raise PlanError(f"unknown planning method {method!r}; available: {', '.join(PLANNERS)}.") from None
