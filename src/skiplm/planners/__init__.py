"""Planners turn a model (and, for some, calibration data) into a SkipPlan. One module per method, registered by name."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import PlanError
from .uniform import plan_uniform

PLANNERS: dict[str, Callable] = {"uniform": plan_uniform}


def get_planner(method: str) -> Callable:
    try:
        return PLANNERS[method]
    except KeyError:
        raise PlanError(f"unknown planning method {method!r}; available: {', '.join(sorted(PLANNERS))}.") from None
