"""Adapters: how each model family exposes its decoder layers, attention and MLP — described as data.

An adapter names attribute paths; nothing here copies or subclasses a modeling file. The runtime uses these names to
find the modules whose ``forward`` it swaps while a plan is applied, so state-dict keys, hooks, ``device_map``
placement and ``generate()`` are untouched.

A family skiplm does not know is described once per model object (no global registry is mutated)::

    skiplm.set_adapter(model, skiplm.Adapter(
        model_types=("my_family",),
        layers="model.layers",          # the nn.ModuleList of decoder layers, from the *ForCausalLM object
        attention="self_attn",          # child of a decoder layer
        mlp="mlp",                      # child of a decoder layer
        attention_norms=("input_layernorm",),        # norms that only feed / wrap the attention branch
        mlp_norms=("post_attention_layernorm",),     # norms that only feed / wrap the MLP branch
        final_norm="model.norm",        # the norm before the LM head (only the logit lens needs it)
    ))

The norms listed must touch only their own residual branch (``h = h + post(branch(pre(h)))``); the runtime turns
them into identities when that branch is skipped, so a skipped branch costs one residual add of zeros.
"""

from __future__ import annotations

import dataclasses
from torch import nn

from ..errors import UnsupportedArchitectureError

PARTS = ("attention", "mlp")  # the two branches of a decoder layer


@dataclasses.dataclass(frozen=True)
class Adapter:
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    attention: str = "self_attn"
    mlp: str = "mlp"
    attention_norms: tuple[str, ...] = ("input_layernorm",)
    mlp_norms: tuple[str, ...] = ("post_attention_layernorm",)
    # Number of values the attention module returns as a tuple (output first). transformers 5.x: (output, weights).
    attention_outputs: int = 2
    # The child whose input is the residual stream entering the MLP branch (i.e. after the attention branch's add).
    mlp_input: str = "post_attention_layernorm"
    # The norm between the last decoder layer and the LM head, from the *ForCausalLM object (used by the logit lens).
    final_norm: str = "model.norm"

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return _get_path(model, self.layers)

    def branch_modules(self, layer: nn.Module, part: str) -> tuple[nn.Module, list[nn.Module]]:
        """The core module of a residual branch ("attention" or "mlp") and the norms that belong to it only."""
        core_name, norm_names = (self.attention, self.attention_norms) if part == "attention" else (self.mlp, self.mlp_norms)
        return _get_path(layer, core_name), [_get_path(layer, name) for name in norm_names]


_LLAMA_LIKE = dict(attention_norms=("input_layernorm",), mlp_norms=("post_attention_layernorm",))

BUILTIN_ADAPTERS: tuple[Adapter, ...] = (
    # Llama also covers SmolLM / SmolLM2 (model_type "llama"); Gemma (1) and SmolLM 3 have Llama's two pre-norms.
    Adapter(model_types=("llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "gemma", "smollm3"), **_LLAMA_LIKE),
    # Gemma 2/3 wrap each branch in a pre- and a post-norm ("sandwich" norms).
    Adapter(
        model_types=("gemma2", "gemma3_text"),
        attention_norms=("input_layernorm", "post_attention_layernorm"),
        mlp_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"),
        mlp_input="pre_feedforward_layernorm",
    ),
    # OLMo 2 normalises each branch's output instead of its input.
    Adapter(
        model_types=("olmo2",),
        attention_norms=("post_attention_layernorm",),
        mlp_norms=("post_feedforward_layernorm",),
        mlp_input="mlp",
    ),
)


_ADAPTER_ATTRIBUTE = "_skiplm_adapter"


def supported_model_types() -> list[str]:
    return sorted(t for adapter in BUILTIN_ADAPTERS for t in adapter.model_types)


def set_adapter(model: nn.Module, adapter: Adapter) -> None:
    """Use ``adapter`` for this model object (for a family skiplm does not know, or to override a built-in one)."""
    _check_matches(model, adapter)
    setattr(model, _ADAPTER_ATTRIBUTE, adapter)


def get_adapter(model: nn.Module) -> Adapter:
    adapter = getattr(model, _ADAPTER_ATTRIBUTE, None)
    if adapter is not None:
        return adapter
    model_type = model_type_of(model)
    adapter = next((a for a in BUILTIN_ADAPTERS if model_type in a.model_types), None)
    if adapter is None:
        raise UnsupportedArchitectureError(
            f"skiplm has no adapter for model type {model_type!r}. Supported: {', '.join(supported_model_types())}. "
            "If this family is a decoder whose layers have attention and MLP children on residual branches, describe it: "
            "skiplm.set_adapter(model, skiplm.Adapter(model_types=(...), layers=..., attention=..., mlp=..., "
            "attention_norms=..., mlp_norms=...)) — see the docstring of skiplm/adapters.py."
        )
    _check_matches(model, adapter)
    return adapter


def _check_matches(model: nn.Module, adapter: Adapter) -> None:
    try:
        for layer in adapter.decoder_layers(model):
            adapter.branch_modules(layer, "attention")
            adapter.branch_modules(layer, "mlp")
            _get_path(layer, adapter.mlp_input)
    except (AttributeError, IndexError, TypeError) as exc:
        raise UnsupportedArchitectureError(
            f"The adapter for {model_type_of(model)!r} does not match this model's modules ({exc}). The modeling code "
            "may have changed; describe the model with skiplm.set_adapter(model, skiplm.Adapter(...))."
        ) from None


def model_type_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedArchitectureError("skiplm works on Hugging Face models: this object has no `.config`.")
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return getattr(text_config, "model_type", None) or getattr(config, "model_type", "unknown")


def _get_path(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def count_layers(model: nn.Module) -> int:
    return len(get_adapter(model).decoder_layers(model))
