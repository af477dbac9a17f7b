"""Export: deleting skipped blocks for good and saving a checkpoint vanilla transformers loads."""

from .pruned import PLAN_FILENAME, export_pruned

__all__ = ["PLAN_FILENAME", "export_pruned"]
