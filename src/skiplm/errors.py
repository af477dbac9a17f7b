"""Errors skiplm raises for bad input. Each message says what went wrong and what to do about it."""


class SkipLMError(ValueError):
    """Base class of every error skiplm raises on purpose."""


class PlanError(SkipLMError):
    """A skip plan is malformed, inconsistent, or skips too much."""


class PlanMismatchError(PlanError):
    """A skip plan was made for a different model than the one it is applied to."""


class UnsupportedArchitectureError(SkipLMError):
    """The model's family has no adapter."""


class ModelLoadError(SkipLMError):
    """A model could not be loaded from the given spec."""


class DataError(SkipLMError):
    """Evaluation data or a prompt is missing or empty."""


class SweepError(SkipLMError):
    """A sweep's settings are invalid, or its output folder holds results it cannot resume with them."""


class ReportError(SkipLMError):
    """A result file given to `skiplm report` is missing, unreadable or of an unknown kind."""


class DeviceError(SkipLMError):
    """A device this torch cannot use (not built in, not present, or not a device skiplm runs on)."""


class UnsupportedModelError(ModelLoadError, UnsupportedArchitectureError):
    """A model to load is of a family skiplm has no adapter for (refused before its weights load)."""
