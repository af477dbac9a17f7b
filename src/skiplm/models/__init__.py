"""Models: loading (the shipped default, folders, GGUF, hub ids), families as data (adapters), shipped text."""

from .adapters import Adapter, count_layers, get_adapter, model_type_of, set_adapter, supported_model_types
from .loading import DEFAULT_MODEL, load_model

__all__ = ["Adapter", "DEFAULT_MODEL", "count_layers", "get_adapter", "load_model", "model_type_of", "set_adapter",
           "supported_model_types"]
