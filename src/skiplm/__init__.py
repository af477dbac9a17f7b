"""skiplm: skip layers of Hugging Face decoder-only LLMs, and measure honestly what each skip costs."""

from ._version import __version__  # noqa: E402,F401

from .models.adapters import Adapter, get_adapter, set_adapter, supported_model_types  # noqa: E402
from .measure.costs import CostModel  # noqa: E402
from .errors import (  # noqa: E402
    DataError,
    ModelLoadError,
    PlanError,
    PlanMismatchError,
    SkipLMError,
    UnsupportedArchitectureError,
)
from .models.loading import DEFAULT_MODEL, load_model  # noqa: E402
from .plan import SkipPlan, SkipSet, model_identity  # noqa: E402
from .export.pruned import export_pruned  # noqa: E402
from .planners import PLANNERS, get_planner, load_calibration, plan_uniform  # noqa: E402
from .runtime import SkipHandle  # noqa: E402
from .skipper import Skipper, apply, load_skipper  # noqa: E402
from . import speculative  # noqa: E402  (skiplm.speculative.generate: self-speculative decoding)

__all__ = [
    "Adapter", "CostModel", "PLANNERS", "export_pruned", "load_calibration", "DEFAULT_MODEL", "DataError", "ModelLoadError", "PlanError", "PlanMismatchError",
    "SkipHandle", "SkipLMError", "Skipper", "load_skipper", "SkipPlan", "SkipSet", "UnsupportedArchitectureError", "apply", "get_adapter",
    "get_planner", "load_model", "model_identity", "plan_uniform", "set_adapter", "supported_model_types",
]
