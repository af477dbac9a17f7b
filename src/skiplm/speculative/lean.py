"""A lean forward pass for speculative drafts of Llama-style decoders (and Gemma, Phi-3, OLMo 2, Granite): fewer,
fused operations per layer.

Why. On a CPU a decode step of a small model is dominated by fixed costs, not by the weights: on the default model
(SmolLM2-135M, 30 layers, 2 cores) the matrix products of an fp32 step take ~23 of its ~40 ms, and those of an int8
copy ~14 of ~31 ms; the rest — ~17 ms — is the modeling code's ~60 small operations per layer (norms computed in
float32, rotary embeddings, the cache's concatenations, mask building) and their Python. A draft through the
model's own modules keeps all of it, so even a 4x cheaper weight format only makes a ~0.8x draft step.

What. :class:`LeanDraft` runs the same computation with the same weights (cast or quantized for the draft,
:func:`skiplm.speculative.quantize.draft_linear`), fused: one product for the query, key and value projections, one for the
gate and up projections, each RMS norm's weight folded into the product after it (the norm itself is two small
operations), one rotation for queries and keys (values ride along unrotated), the residual stream kept as one row
per token so products are called on it directly, and a preallocated KV cache written in place, keys and values in
one buffer. The loop over the layers is compiled with TorchScript (:class:`_Stack`; the same operations, eager where
compiling fails): what remained between the products was mostly Python. Measured (default model, batch 1, alone): the
int8 step ~24 ms -> ~20 ms from the folding and direct calls -> ~18 ms compiled; int8-dynamic ~18.5 -> ~13 ms
compiled. It is only ever a *draft*: the full model, through its own modules, verifies every token, so a difference
between this forward and the modeling code can cost acceptance, never correctness. The tests still hold it to the
modeling code: in float32 it gives the same logits as the model under the same plan.

Which models. Decoders whose layers are ``h + post(attention(pre(h)))`` then ``h + post(mlp(pre(h)))`` — attention
with query, key, value and output projections and rotary embeddings from the backbone's ``rotary_emb``, a gated MLP,
RMS norms — described per family as data in :data:`LEAN_FAMILIES` (:class:`LeanFamily`, the one place the engine
keeps per-family knowledge): ``llama`` (SmolLM), ``mistral``, ``qwen2`` (projection biases), ``qwen3`` (query / key
norms per head), ``gemma`` (norms scaling by ``1 + weight``, tanh-GELU MLP; its embedding module scales the
embeddings), ``gemma2`` (also a norm after each branch, soft-capped attention scores and logits, sliding-window
layers), ``gemma3_text`` (query / key norms, local and global layers rotated with different bases), ``phi3`` (fused
``qkv_proj`` / ``gate_up_proj``), ``smollm3`` (layers without rotary embeddings), ``olmo2`` (norms after each branch only, query / key norms over the whole
projection) and ``granite`` (embedding, residual and logit multipliers, folded into the products where they can be).
Sliding windows are honoured. In float32 each gives its modeling code's logits (tests/speculative: one seeded tiny
model per family). :func:`lean_draft_unsupported` says why a model is not one of them (:data:`LEAN_UNFIT` names the
families looked at and left out, with their reason; rotary over part of each head is refused too); the speculative
decoder then drafts through the model's own modules. :func:`plain_logits` says where the logits are the head's output
as it is (not soft-capped or scaled), which is where the verifier may use a packed copy of the head.

Reduced vocabulary. With ``vocab=`` (token ids, :mod:`skiplm.speculative.vocab`) the head is those rows only and the
other tokens get ``-inf`` logits: the draft proposes only those tokens (sampling: its distribution is zero
elsewhere), and the full model still verifies every one.

Setup. Making the engine was, on the default model in int8-dynamic (1 thread, a busy 2-core machine: indicative),
~1.2 s to quantize the weights, ~0.8 s to pack them for fbgemm (its packing reads each row's scale one by one), ~0.4 s
to compile the loop and ~0.4 s of TorchScript's first calls. :class:`LeanDraft` takes its weights from a
:class:`~skiplm.speculative.quantize.DraftWeights` (``weights=``: stored tensors from the draft cache,
:mod:`skiplm.speculative.cache`, skip the quantizing) and records what each part cost in :attr:`LeanDraft.setup`;
compiling parses each class's methods once, not once per layer (~0.15 s); the loop runs without TorchScript's graph
optimizations, which made no step faster here and cost the first calls' profiling; :meth:`LeanDraft.warm_up` pays
what is left of the first calls (~0.05 s) in the setup. Packing cannot be stored: fbgemm's packed weight is opaque
and torch re-packs it when loading one. TorchScript shares what it compiled between engines of the same structure in
a process; :meth:`LeanDraft.shared` gives another draft over the same weights and compiled loop with a plan of its
own, at no cost.

In the speculative loop. :class:`LeanEngineDraft` is the ``lean`` draft kind (:data:`skiplm.registry.DRAFTS`): the
:class:`~skiplm.speculative.drafts.ModelDraft` whose forward is :class:`LeanDraft`, and which, before drafting, takes
the keys and values of the committed tokens it has not seen from the full model's cache (:meth:`LeanDraft.adopt`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
import warnings
from typing import Any

import torch
from torch import nn

from ..errors import DataError
from ..models.adapters import _get_path, get_adapter, model_type_of
from ..plan import SkipPlan
from ..registry import DRAFTS
from ..runtime import decoder_stack
from .controllers import AdaptiveDraftLength
from .drafts import ModelDraft
from .quantize import DraftWeights, compute_dtype, precision_name
from .state import Committed

@dataclasses.dataclass(frozen=True)
class LeanFamily:
    """What sets a family's decoder apart from Llama's, as data — the one place the lean engine keeps per-family
    knowledge (:data:`LEAN_FAMILIES`). Every family runs ``h = h + post(attention(pre(h)))``, ``h = h + post(mlp(pre(h)))``
    with RMS norms; the fields say which of those pieces it has and where its modeling code differs.

    ``norm_offset``: its RMS norms scale by ``offset + weight`` (Gemma: 1). ``pre_norms``: a norm before each branch
    (OLMo 2 has none). ``mlp_norm``: the norm before the MLP (Gemma 2 / 3: ``pre_feedforward_layernorm``).
    ``post_norms``: the norms of each branch's output, before the residual add (Gemma 2 / 3, OLMo 2). ``head_norms``:
    query / key RMS norms before the rotation, over each head (``"head"``: Qwen 3, Gemma 3) or over the whole
    projection (``"projection"``: OLMo 2). ``fused``: the attention's ``qkv_proj`` and the MLP's ``gate_up_proj``
    (gate first) are already fused (Phi-3). ``activation``: the config key naming the MLP's activation.
    ``config_window``: the config's ``sliding_window`` applies to every layer (Mistral, Phi-3; else each attention
    module names its own). ``rotary_by_layer_type``: the backbone's rotary embedding is called per layer type (Gemma
    3: local and global layers rotate with different bases). ``rotary_flag``: the attention module's attribute saying
    whether its layer rotates queries and keys at all (SmolLM 3's ``use_rope``: every 4th layer has no positional
    encoding). Config keys read as numbers: ``attention_softcap``
    (scores soft-capped, ``cap * tanh(s / cap)``: Gemma 2), ``final_softcap`` (logits likewise: Gemma 2),
    ``residual_multiplier`` (each branch's output scaled: Granite, folded into its last product),
    ``embedding_multiplier`` (the embeddings scaled: Granite), ``logits_divisor`` (logits divided: Granite, folded
    into the head). Gemma's embedding scaling is in its embedding module, which the engine calls."""

    model_types: tuple[str, ...]
    norm_offset: float = 0.0
    pre_norms: bool = True
    mlp_norm: str = "post_attention_layernorm"
    post_norms: tuple[str, str] | None = None
    head_norms: str | None = None
    fused: bool = False
    activation: str = "hidden_act"
    config_window: bool = False
    rotary_by_layer_type: bool = False
    rotary_flag: str | None = None
    attention_softcap: str | None = None
    final_softcap: str | None = None
    residual_multiplier: str | None = None
    embedding_multiplier: str | None = None
    logits_divisor: str | None = None

    def number(self, config, key: str | None, default: float) -> float:
        """The config's value for ``key`` (``default`` when there is no key, or it is unset)."""
        value = getattr(config, key, None) if key is not None else None
        return float(value) if value is not None else default


_GEMMA_SANDWICH = dict(norm_offset=1.0, activation="hidden_activation", mlp_norm="pre_feedforward_layernorm",
                       post_norms=("post_attention_layernorm", "post_feedforward_layernorm"))

LEAN_FAMILIES: tuple[LeanFamily, ...] = (
    LeanFamily(("llama", "qwen2")),  # (qwen2: projection biases, per-layer windows)
    LeanFamily(("mistral",), config_window=True),
    LeanFamily(("qwen3",), head_norms="head"),
    LeanFamily(("gemma",), norm_offset=1.0),
    LeanFamily(("gemma2",), attention_softcap="attn_logit_softcapping", final_softcap="final_logit_softcapping",
               **_GEMMA_SANDWICH),
    LeanFamily(("gemma3_text",), head_norms="head", rotary_by_layer_type=True,
               attention_softcap="attn_logit_softcapping", final_softcap="final_logit_softcapping", **_GEMMA_SANDWICH),
    LeanFamily(("phi3",), fused=True, config_window=True),
    LeanFamily(("olmo2",), pre_norms=False, head_norms="projection",
               post_norms=("post_attention_layernorm", "post_feedforward_layernorm")),
    LeanFamily(("smollm3",), rotary_flag="use_rope"),
    LeanFamily(("granite",), residual_multiplier="residual_multiplier", embedding_multiplier="embedding_multiplier",
               logits_divisor="logits_scaling"),
)
LEAN_MODEL_TYPES = tuple(t for family in LEAN_FAMILIES for t in family.model_types)

# families looked at and left out, and why (the lean engine keeps to the pieces above; they draft through their modules)
LEAN_UNFIT = {
    "stablelm": "LayerNorm with biases (not an RMS norm), rotary over part of each head and an optional parallel "
                "residual; skiplm has no adapter for it",
    "cohere": "attention and MLP in parallel from one LayerNorm, interleaved rotary pairs; skiplm has no adapter for it",
    "cohere2": "attention and MLP in parallel from one LayerNorm, interleaved rotary pairs; skiplm has no adapter for it",
    "gemma3n": "per-layer inputs, AltUp and Laurel blocks, activation sparsity; skiplm has no adapter for it",
    "phi": "a parallel attention / MLP block with LayerNorm and partial rotary; skiplm has no adapter for it",
    "gpt2": "LayerNorm, learned positions and a fused Conv1D attention; skiplm has no adapter for it",
}
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")  # what the engine's MLP computes (tanh-approximated or exact GELU)


def lean_family(model: nn.Module) -> LeanFamily | None:
    """The :class:`LeanFamily` entry of ``model``'s family (None: the lean engine does not know it)."""
    model_type = model_type_of(model)
    return next((family for family in LEAN_FAMILIES if model_type in family.model_types), None)


def plain_logits(model: nn.Module) -> bool:
    """Whether ``model``'s logits are its output head applied to the last hidden state, nothing after (no soft-capping,
    no scaling): where the verifier may run the backbone and then a packed copy of the head
    (:func:`~skiplm.speculative.quantize.packed_head`)."""
    family = lean_family(model)
    if family is None:
        return False
    config = model.config
    return (family.number(config, family.final_softcap, 0.0) == 0.0
            and family.number(config, family.logits_divisor, 1.0) == 1.0)


def lean_draft_unsupported(model: nn.Module) -> str | None:
    """Why :class:`LeanDraft` cannot draft for ``model`` (None: it can)."""
    model_type = model_type_of(model)
    family = lean_family(model)
    if family is None:
        known = ", ".join(LEAN_MODEL_TYPES)
        if model_type in LEAN_UNFIT:
            return f"model type {model_type!r}: {LEAN_UNFIT[model_type]} (the lean draft knows {known})"
        return f"model type {model_type!r} (the lean draft knows {known})"
    config = model.config
    activation = getattr(config, family.activation, None)
    if activation not in ACTIVATIONS:
        return f"{model_type} with activation {activation!r} (the lean draft computes {', '.join(ACTIVATIONS)})"
    rotary = getattr(decoder_stack(model), "rotary_emb", None)
    if rotary is None:
        return f"{model_type} without a rotary embedding module on the backbone"
    if float((getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)) != 1.0:
        return f"{model_type} with rotary embeddings over part of each head (partial_rotary_factor)"
    shapes = set()
    for layer in get_adapter(model).decoder_layers(model):
        attention, mlp = layer.self_attn, layer.mlp
        needed = (("qkv_proj", "o_proj") if family.fused else ("q_proj", "k_proj", "v_proj", "o_proj")) + ("scaling",)
        if not all(hasattr(attention, name) for name in needed):
            return f"{model_type} attention without {'/'.join(needed[:-1])} projections"
        shapes.add(_head_counts(attention, family, config))
        if len(shapes) > 1:
            return f"{model_type} layers with different numbers of attention heads"
        needed = ("gate_up_proj", "down_proj") if family.fused else ("gate_proj", "up_proj", "down_proj")
        if not all(isinstance(getattr(mlp, name, None), nn.Linear) for name in needed):
            return f"{model_type} MLP without {'/'.join(needed)} projections"
        norms = [layer.input_layernorm, getattr(layer, family.mlp_norm)] if family.pre_norms else []
        norms += [getattr(layer, name) for name in family.post_norms or ()]
        for norm in norms:
            if isinstance(norm, nn.LayerNorm) or _epsilon(norm) is None or getattr(norm, "bias", None) is not None:
                return f"{model_type} norm {type(norm).__name__} is not an RMS norm"
    return None


def _epsilon(norm: nn.Module) -> float | None:
    """An RMS norm's epsilon (``variance_epsilon`` in most families, ``eps`` in Gemma's)."""
    eps = getattr(norm, "variance_epsilon", None)
    eps = getattr(norm, "eps", None) if eps is None else eps
    return float(eps) if eps is not None else None


def _head_counts(attention: nn.Module, family: LeanFamily, config) -> tuple[int, int, int]:
    """(query heads, key / value heads, head dim) of one attention module."""
    head_dim = attention.head_dim if hasattr(attention, "head_dim") else config.head_dim
    if family.fused:
        return config.num_attention_heads, config.num_key_value_heads, head_dim
    return attention.q_proj.out_features // head_dim, attention.k_proj.out_features // head_dim, head_dim


class LeanCache:
    """The draft's KV cache: per attention layer, one buffer [B, 2 * kv_heads, capacity, head_dim] holding keys (the
    first kv_heads) and values (the rest), written in place; ``length`` tokens are valid. Cropping moves ``length``
    back."""

    def __init__(self):
        self.buffers: dict[int, torch.Tensor] = {}
        self.length = 0

    def reserve(self, layer: int, batch: int, width: int, end: int, head_dim: int, like: torch.Tensor) -> torch.Tensor:
        """``layer``'s buffer [batch, width = 2 * kv_heads, capacity >= end, head_dim] (dtype and device of ``like``),
        grown (keeping the ``length`` tokens it holds) when it is too small."""
        stored = self.buffers.get(layer)
        if stored is None or stored.shape[2] < end or stored.shape[0] != batch:
            capacity = max(end, 2 * (stored.shape[2] if stored is not None else 0), 256)
            grown = like.new_empty(batch, width, capacity, head_dim)
            if stored is not None and self.length:
                grown[:, :, :self.length] = stored[:, :, :self.length]
            self.buffers[layer] = stored = grown
        return stored

    def append(self, layer: int, keys_values: torch.Tensor) -> None:
        """Store ``keys_values`` [B, 2 * kv_heads, n, head_dim] after the first ``length`` tokens."""
        batch, width, n, head_dim = keys_values.shape
        end = self.length + n
        self.reserve(layer, batch, width, end, head_dim, keys_values)[:, :, self.length:end] = keys_values

    def capacity(self, layer: int) -> int:
        """How many tokens ``layer``'s buffer holds before it grows."""
        return self.buffers[layer].shape[2]

    def crop(self, delta: int) -> None:
        """Drop the last ``-delta`` tokens (``delta <= 0``, as transformers' ``Cache.crop`` takes it)."""
        self.length = max(self.length + min(delta, 0), 0)

    def activate_past_recording(self) -> None:
        """Nothing to record: windows are applied by the mask, so cropping never loses a needed key."""

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers.values())


class _Norm:
    """An RMS norm whose weight is folded into the product that follows it: ``x / hypot(|x|, sqrt(d * eps))`` is
    ``x / sqrt(mean(x^2) + eps) / sqrt(d)``, so the product's input columns are scaled by ``sqrt(d) * (offset +
    weight)`` (:meth:`fold`; ``offset``: Gemma's norms scale by ``1 + weight``). Two small operations instead of the six
    of a weighted RMS norm in bfloat16."""

    def __init__(self, norm: nn.Module, dtype: torch.dtype, offset: float = 0.0):
        self.size = norm.weight.shape[-1]
        self.scale = (norm.weight.detach().float() + offset) * self.size ** 0.5
        self.floor = torch.tensor((self.size * _epsilon(norm)) ** 0.5, dtype=dtype)

    def fold(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` [out, d] with its input columns scaled for :meth:`__call__`'s output, in float32."""
        return weight.detach().float() * self.scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _normalized(x, self.floor)


def _normalized(x: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """``x`` over ``hypot(|x|, floor)`` along its last dimension: a :class:`_Norm` with its weight folded away (a
    free function, so that TorchScript compiles it inside :class:`_Layer`)."""
    return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), floor)


def _norm_weight(norm: nn.Module | None, offset: float, dtype: torch.dtype) -> torch.Tensor:
    """An RMS norm's effective weight (``offset + weight``) in ``dtype``, for one applied as it is; empty for none."""
    if norm is None:
        return torch.empty(0, dtype=dtype)
    return (norm.weight.detach().float() + offset).to(dtype)


class _Layer(nn.Module):
    """One decoder layer's weights in the draft's format (its pre-branch norms folded into the products after them),
    and its two branches as TorchScript-compatible methods (see :class:`_Stack`). What differs between families is
    read from their :class:`LeanFamily` entry into plain attributes, tested at run time."""

    def __init__(self, layer: nn.Module, name: str, weights: DraftWeights, dtype: torch.dtype, config,
                 family: LeanFamily):
        """``name``: the prefix of its products in ``weights`` (which makes them, or takes them stored)."""
        super().__init__()
        attention, mlp = layer.self_attn, layer.mlp
        offset = family.norm_offset
        attention_norm = _Norm(layer.input_layernorm, dtype, offset) if family.pre_norms else None
        mlp_norm = _Norm(getattr(layer, family.mlp_norm), dtype, offset) if family.pre_norms else None
        self.pre_norms = family.pre_norms
        no_floor = torch.zeros((), dtype=dtype)
        self.attention_floor = attention_norm.floor if attention_norm is not None else no_floor
        self.mlp_floor = mlp_norm.floor if mlp_norm is not None else no_floor
        # Granite scales each branch's output before the residual add: folded into the branch's last product
        multiplier = family.number(config, family.residual_multiplier, 1.0)
        if family.fused:  # Phi-3: q, k, v in one product already, and gate and up (gate first)
            qkv, gate_up = [attention.qkv_proj], [mlp.gate_up_proj]
        else:
            qkv, gate_up = [attention.q_proj, attention.k_proj, attention.v_proj], [mlp.gate_proj, mlp.up_proj]
        self.qkv = _fused(weights, f"{name}.qkv", qkv, attention_norm)
        self.o = _fused(weights, f"{name}.o", [attention.o_proj], None, multiplier)
        self.gate_up = _fused(weights, f"{name}.gate_up", gate_up, mlp_norm)
        self.down = _fused(weights, f"{name}.down", [mlp.down_proj], None, multiplier)
        self.intermediate = mlp.down_proj.in_features
        self.heads, self.kv_heads, self.head_dim = _head_counts(attention, family, config)
        self.scaling = float(attention.scaling)
        self.softcap = family.number(config, family.attention_softcap, 0.0)
        self.activation = str(getattr(config, family.activation))
        # the norms of each branch's output (Gemma 2 / 3, OLMo 2), applied as they are
        post = [getattr(layer, n) for n in family.post_norms] if family.post_norms else [None, None]
        self.post_norms = family.post_norms is not None
        self.attention_post, self.mlp_post = (_norm_weight(norm, offset, dtype) for norm in post)
        self.post_eps = _epsilon(post[0]) if post[0] is not None else 0.0
        # query / key norms, before the rotation: 1 over each head (qwen3, gemma3), 2 over the projection (olmo2)
        q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
        self.head_norms = {None: 0, "head": 1, "projection": 2}[family.head_norms if q_norm is not None else None]
        self.q_norm, self.k_norm = _norm_weight(q_norm, offset, dtype), _norm_weight(k_norm, offset, dtype)
        self.head_norm_eps = _epsilon(q_norm) if q_norm is not None else 0.0
        # a window per attention module (qwen2, qwen3, gemma2, gemma3), or the config's for every layer (mistral, phi3)
        config_window = getattr(config, "sliding_window", None) if family.config_window else None
        window = getattr(attention, "sliding_window", config_window)
        self.window = int(window) if window else None
        # the rotary embedding it takes: per layer type where the backbone has several (gemma3), else the one
        self.rotary_kind = getattr(attention, "layer_type", None) if family.rotary_by_layer_type else None
        # whether it rotates queries and keys at all (smollm3's layers without positional encoding do not)
        self.rotates = bool(getattr(attention, family.rotary_flag)) if family.rotary_flag else True

    @torch.jit.export
    def attention(self, hidden: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, buffer: torch.Tensor,
                  start: int, batch: int, n: int, mask: torch.Tensor | None) -> torch.Tensor:
        """The attention branch's output for ``hidden`` [B * n, hidden]; writes the ``n`` new keys and values into
        ``buffer`` [B, 2 * kv_heads, capacity, head_dim] after ``start`` cached tokens."""
        d, heads, kv_heads = self.head_dim, self.heads, self.kv_heads
        if self.pre_norms:
            hidden = _normalized(hidden, self.attention_floor)
        qkv = self.qkv.product(hidden).view(batch, n, heads + 2 * kv_heads, d)
        if self.head_norms == 1:
            qkv = torch.cat([nn.functional.rms_norm(qkv[:, :, :heads], [d], self.q_norm, self.head_norm_eps),
                             nn.functional.rms_norm(qkv[:, :, heads:heads + kv_heads], [d], self.k_norm,
                                                    self.head_norm_eps),
                             qkv[:, :, heads + kv_heads:]], dim=2)
        elif self.head_norms == 2:
            queries = qkv[:, :, :heads].reshape(batch, n, heads * d)
            keys = qkv[:, :, heads:heads + kv_heads].reshape(batch, n, kv_heads * d)
            qkv = torch.cat([nn.functional.rms_norm(queries, [heads * d], self.q_norm, self.head_norm_eps).view(
                                 batch, n, heads, d),
                             nn.functional.rms_norm(keys, [kv_heads * d], self.k_norm, self.head_norm_eps).view(
                                 batch, n, kv_heads, d),
                             qkv[:, :, heads + kv_heads:]], dim=2)
        if self.rotates:
            qkv = qkv * cos + qkv.roll(d // 2, dims=-1) * signed_sin  # queries and keys rotated, values kept
        end = start + n
        buffer[:, :, start:end] = qkv[:, :, heads:].transpose(1, 2)
        queries = qkv[:, :, :heads].transpose(1, 2)
        if self.softcap > 0.0:  # soft-capped scores (gemma2): computed here, scaled_dot_product_attention cannot
            groups = heads // kv_heads
            keys = buffer[:, :kv_heads, :end].repeat_interleave(groups, dim=1)
            values = buffer[:, kv_heads:, :end].repeat_interleave(groups, dim=1)
            scores = torch.matmul(queries, keys.transpose(2, 3)) * self.scaling
            scores = torch.tanh(scores / self.softcap) * self.softcap
            if mask is not None:
                scores = scores.masked_fill(mask.logical_not(), float("-inf"))
            out = torch.matmul(torch.softmax(scores, dim=-1), values)
        else:
            # grouped-query attention: each key / value head serves heads / kv_heads query heads
            out = nn.functional.scaled_dot_product_attention(queries, buffer[:, :kv_heads, :end],
                                                             buffer[:, kv_heads:, :end], attn_mask=mask,
                                                             scale=self.scaling, enable_gqa=kv_heads != heads)
        out = self.o.product(out.transpose(1, 2).reshape(batch * n, heads * d))
        if self.post_norms:
            out = nn.functional.rms_norm(out, [out.shape[-1]], self.attention_post, self.post_eps)
        return out

    @torch.jit.export
    def mlp(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.pre_norms:
            hidden = _normalized(hidden, self.mlp_floor)
        gate_up = self.gate_up.product(hidden)
        gate = gate_up[:, :self.intermediate]
        if self.activation == "silu":
            gate = nn.functional.silu(gate)
        elif self.activation == "gelu":
            gate = nn.functional.gelu(gate)
        else:
            gate = nn.functional.gelu(gate, approximate="tanh")
        out = self.down.product(gate * gate_up[:, self.intermediate:])
        if self.post_norms:
            out = nn.functional.rms_norm(out, [out.shape[-1]], self.mlp_post, self.post_eps)
        return out


class _Stack(nn.Module):
    """The decoder layers' loop, compiled with TorchScript: the same operations as in eager mode (tests: identical
    logits), without Python's cost per operation — measured on the default model, int8, batch 1: 21.0 -> 16.9 ms per
    step. ``cos`` / ``signed_sin``: per layer (the same tensors for layers of one rotary kind)."""

    def __init__(self, layers: list[_Layer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, hidden: torch.Tensor, cos: list[torch.Tensor], signed_sin: list[torch.Tensor],
                buffers: list[torch.Tensor], start: int, batch: int, n: int, masks: list[torch.Tensor | None],
                attention: list[bool], mlp: list[bool]) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            if attention[index]:
                hidden = hidden + layer.attention(hidden, cos[index], signed_sin[index], buffers[index], start, batch,
                                                  n, masks[index])
            if mlp[index]:
                hidden = hidden + layer.mlp(hidden)
        return hidden


def _fused(weights: DraftWeights, name: str, linears: list[nn.Linear], norm: _Norm | None,
           multiplier: float = 1.0, rows: torch.Tensor | None = None) -> nn.Module:
    """The product ``name`` of ``linears`` fused into one (their outputs one after another), with the ``norm`` before
    it folded into its input columns and its output scaled by ``multiplier`` (``rows``: only these output rows)."""

    def source() -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = torch.cat([linear.weight for linear in linears]) if len(linears) > 1 else linears[0].weight
        weight = norm.fold(weight) if norm is not None else weight
        bias = _cat_bias(*linears)
        if multiplier != 1.0:
            weight = weight.detach().float() * multiplier
            bias = bias.detach().float() * multiplier if bias is not None else None
        return weight, bias

    return weights.product(name, source, _fused_shape(linears), _cat_bias(*linears) is not None, rows=rows)


def _fused_shape(linears: list[nn.Linear]) -> tuple[int, int]:
    """The [out, in] shape of ``linears`` fused into one product (their outputs one after another)."""
    return sum(linear.out_features for linear in linears), linears[0].in_features


def _cat_bias(*linears: nn.Linear) -> torch.Tensor | None:
    """The biases of ``linears`` fused into one (zeros for those without), or None when none has one."""
    if all(linear.bias is None for linear in linears):
        return None
    return torch.cat([linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)
                      for linear in linears])


class LeanDraft:
    """A speculative draft of ``model`` (see the module docstring): its weights in ``precision``, its layers run as
    :attr:`plan` says. Call like the model, with a :class:`LeanCache`; it returns ``(logits [B, keep, V] float32,
    cache)``.

    ``weights``: where its products come from (:class:`~skiplm.speculative.quantize.DraftWeights`: computed from
    ``model``'s weights and recorded, by default, or stored tensors from the draft cache). ``vocab``: token ids (any
    order, kept sorted) the draft proposes from — a reduced-vocabulary head of those rows, the logits of the other
    tokens ``-inf`` (still [B, keep, V]); None or every id: the whole head. :attr:`setup` says what
    making it cost, in seconds: ``quantize`` (computing the weights; reading them when stored), ``pack`` (packing them
    for the kernels), ``compile`` (TorchScript) and, after :meth:`warm_up`, ``warmup``."""

    def __init__(self, model: nn.Module, precision: str | torch.dtype, plan: SkipPlan | None = None, *,
                 weights: DraftWeights | None = None, vocab: torch.Tensor | None = None):
        reason = lean_draft_unsupported(model)
        if reason is not None:
            raise ValueError(f"the lean draft does not support this model: {reason}.")
        family = lean_family(model)
        config = model.config
        self.precision = precision_name(precision)
        self.dtype = compute_dtype(self.precision)
        weights = weights if weights is not None else DraftWeights(self.precision)
        if weights.precision != self.precision:
            raise ValueError(f"weights in {weights.precision} for a {self.precision} draft.")
        head = model.get_output_embeddings()
        self.vocab_size = head.weight.shape[0]
        self.vocab = _checked_vocab(vocab, self.vocab_size, head.weight.device)
        with torch.no_grad():
            self.layers = [_Layer(layer, f"layers.{index}", weights, self.dtype, config, family)
                           for index, layer in enumerate(get_adapter(model).decoder_layers(model))]
            self.final_norm = _Norm(_get_path(model, get_adapter(model).final_norm), self.dtype, family.norm_offset)
            divisor = family.number(config, family.logits_divisor, 1.0)  # granite: folded into the head
            # the head's stored form is always the whole head (one cache entry serves every vocabulary); with a
            # reduced vocabulary only its rows are made into the product
            self.head = _fused(weights, "head", [head], self.final_norm, 1.0 / divisor, rows=self.vocab)
        weights.check_complete()
        self.final_softcap = family.number(config, family.final_softcap, 0.0)
        self.embedding_multiplier = family.number(config, family.embedding_multiplier, 1.0)
        self.embed = model.get_input_embeddings()  # shared with the model: a lookup reads one row per token
        self.rotary = decoder_stack(model).rotary_emb
        self._rotary_kinds = [layer.rotary_kind for layer in self.layers]
        start = time.perf_counter()
        self.stack = _scripted(_Stack(self.layers))
        self.setup = {"quantize": weights.quantize_seconds, "pack": weights.pack_seconds,
                      "compile": time.perf_counter() - start, "warmup": 0.0}
        self.plan = plan if plan is not None else SkipPlan.from_layers(len(self.layers))

    def warm_up(self) -> float:
        """Run a few tokens through the engine once (nothing is kept), so that what its first calls cost (TorchScript
        builds its execution plan, buffers are allocated: ~0.05 s on the default model) is paid in the setup, not in
        the first speculative round. Returns the seconds."""
        start = time.perf_counter()
        device = self.embed.weight.device
        ids = torch.zeros(1, 2, dtype=torch.long, device=device)
        mask = torch.ones(1, 5, dtype=torch.long, device=device)
        positions = torch.arange(5, device=device)[None]
        _, cache = self(ids, mask[:, :2], positions[:, :2], None)
        for end in (3, 4, 5):  # TorchScript optimizes after its first profiled runs
            _, cache = self(ids[:, :1], mask[:, :end], positions[:, end - 1:end], cache)
        self.setup["warmup"] += time.perf_counter() - start
        return time.perf_counter() - start

    def shared(self, plan: SkipPlan | None = None) -> LeanDraft:
        """Another draft over the same weights and compiled loop (nothing is copied or compiled), with its own plan —
        e.g. for a second decoder of the same model in this process. The weights are never changed, so sharing them
        is safe; the plan is the only state a draft changes."""
        other = copy.copy(self)
        other.setup = dict.fromkeys(self.setup, 0.0)
        other.plan = plan if plan is not None else SkipPlan.from_layers(len(self.layers))
        return other

    @property
    def plan(self) -> SkipPlan:
        return self._plan

    @plan.setter
    def plan(self, plan: SkipPlan) -> None:
        self._plan = plan
        # per phase, which layers run their attention and their MLP: looked up once, not per layer and step
        layers = range(len(self.layers))
        self._schedule = {phase: ([not plan.phase(phase).skips(index, "attention") for index in layers],
                                  [not plan.phase(phase).skips(index, "mlp") for index in layers])
                          for phase in ("prefill", "decode")}

    @property
    def weight_bytes(self) -> int:
        """Memory the draft's own weights take (the embedding table is the model's)."""
        products = [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [self.head]
        head_norms = [weight for layer in self.layers for weight in (layer.q_norm, layer.k_norm)]
        return sum(product.nbytes for product in products) + sum(_nbytes(weight) for weight in head_norms)

    @torch.inference_mode()
    def adopt(self, source, start: int, end: int, cache: LeanCache | None) -> LeanCache | None:
        """Take the keys and values of tokens ``start..end-1`` from the full model's cache ``source`` (a
        transformers ``Cache`` over the same sequence), cast to the draft's dtype, instead of computing them — the
        KV sharing of Draft & Verify: the draft's prefill, and its catching up after plain steps or a change of
        plan, cost a copy instead of forward passes (at batch 8 on the default model, the int8 draft's own prefill
        of 8 prompts took ~1-2 s). The full model's keys differ a little from the ones the draft would compute;
        that can only cost acceptance. Returns None, taking nothing, when ``source`` does not hold exactly
        ``end`` tokens for every layer whose attention the draft runs (e.g. sliding-window layers that kept only
        their window)."""
        cache = cache if cache is not None else LeanCache()
        layers = getattr(source, "layers", None)
        if cache.length != start or layers is None:
            return None
        taken = []
        for index, (layer, attention) in enumerate(zip(self.layers, self._schedule["decode"][0])):
            if not attention:
                continue
            keys, values = (getattr(layers[index], name, None) if index < len(layers) else None
                            for name in ("keys", "values"))
            expected = (layer.kv_heads, end, layer.head_dim)
            if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor) or \
                    tuple(keys.shape[1:]) != expected or tuple(values.shape[1:]) != expected:
                return None
            taken.append((index, keys[:, :, start:end], values[:, :, start:end]))
        for index, keys, values in taken:
            cache.append(index, torch.cat([keys, values], dim=1).to(self.dtype))
        cache.length = end
        return cache

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache: LeanCache | None, logits_to_keep: int = 1) -> tuple[torch.Tensor, LeanCache]:
        """``input_ids`` / ``position_ids`` [B, n] following the ``cache.length`` cached tokens; ``attention_mask``
        [B, cache.length + n] (0: padding)."""
        cache = cache if cache is not None else LeanCache()
        batch, n = input_ids.shape
        start, end = cache.length, cache.length + n
        hidden = self.embed(input_ids).to(self.dtype)  # [B, n, hidden]
        if self.embedding_multiplier != 1.0:
            hidden = hidden * self.embedding_multiplier
        first = self.layers[0]  # every layer has the same head counts (lean_draft_unsupported checks)
        rotations = {}
        for kind in dict.fromkeys(self._rotary_kinds):
            cos, sin = self.rotary(hidden, position_ids) if kind is None else self.rotary(hidden, position_ids, kind)
            # [B, n, heads + 2 kv, head_dim], in the draft's dtype (olmo2's rotary embedding gives float32)
            rotations[kind] = _rotations(cos.to(self.dtype), sin.to(self.dtype), first.heads, first.kv_heads)
        cos = [rotations[kind][0] for kind in self._rotary_kinds]
        signed_sin = [rotations[kind][1] for kind in self._rotary_kinds]
        schedule = self._schedule["prefill" if start == 0 else "decode"]
        window_masks = {window: _attention_mask(attention_mask[:, :end], start, n, window)
                        for window in {layer.window for layer in self.layers}}
        buffers = [cache.reserve(index, batch, 2 * layer.kv_heads, end, layer.head_dim, hidden) if runs
                   else hidden.new_empty(0) for index, (layer, runs) in enumerate(zip(self.layers, schedule[0]))]
        masks = [window_masks[layer.window] for layer in self.layers]
        # TorchScript's graph optimizations (thread-local switch) are skipped: on this CPU they gave no faster steps
        # (int8 / int8-dynamic, batch 1 and 4, measured interleaved), and the profiling runs they need cost ~0.4 s of
        # first calls in every process
        with torch.jit.optimized_execution(False):
            hidden = self.stack(hidden.reshape(batch * n, -1), cos, signed_sin, buffers, start, batch, n, masks,
                                *schedule)
        cache.length = end
        kept = hidden.view(batch, n, -1)[:, -logits_to_keep:].reshape(batch * min(logits_to_keep, n), -1)
        logits = self.head.product(self.final_norm(kept)).float()  # [rows, V] (or [rows, N]: a reduced vocabulary)
        if self.final_softcap > 0.0:  # gemma2
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        if self.vocab is not None:  # the other tokens cannot be drafted: probability 0
            logits = logits.new_full((logits.shape[0], self.vocab_size), float("-inf")).index_copy_(
                1, self.vocab, logits)
        return logits.view(batch, -1, self.vocab_size), cache


def _scripted(stack: _Stack) -> nn.Module:
    """``stack`` compiled with TorchScript (sharing its weights), or as it is where that fails: the same code runs
    eagerly, only slower. (torch marks ``torch.jit.script`` deprecated; ``torch.compile`` was measured slower here:
    graph breaks around the int8 kernel.)"""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return _script(stack)
    except Exception as error:  # noqa: BLE001 — any failure to compile leaves the eager module, which computes the same
        logging.getLogger(__name__).warning("the lean draft runs eagerly (slower): TorchScript failed: %s", error)
        return stack


def _script(module: nn.Module) -> nn.Module:
    """``torch.jit.script(module)``, with each submodule class's methods parsed once: torch parses the source of every
    submodule's methods again for each instance (then finds them compiled already for its type), which was ~55% of
    the ~0.35-0.45 s it took to compile the default model's 152 modules. The methods are the class's, so one parse
    serves every instance. Goes through torch's own recursive scripting (``torch.jit._recursive``) with its
    method-finding function memoized per class; plain ``torch.jit.script`` where those internals are not there."""
    recursive = getattr(torch.jit, "_recursive", None)
    create = getattr(recursive, "create_script_module", None)
    infer = getattr(recursive, "infer_methods_to_compile", None)
    if create is None or infer is None:
        return torch.jit.script(module)
    stubs: dict[type, Any] = {}

    def methods(submodule: nn.Module):
        kind = type(submodule)
        if kind not in stubs:
            stubs[kind] = infer(submodule)
        return stubs[kind]

    return create(module, methods)


def _rotations(cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary embedding of ``heads`` query, ``kv_heads`` key and (unrotated) ``kv_heads`` value heads as one
    ``x * cos + roll(x, d / 2) * signed_sin`` (the half-split convention) over [B, n, heads + 2 kv_heads, d]: cos
    and sin [B, n, d] repeated per rotated head, 1 and 0 for the value heads."""
    half = cos.shape[-1] // 2
    signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    rotated = heads + kv_heads
    cos = torch.cat([cos[:, :, None].expand(-1, -1, rotated, -1), torch.ones_like(cos)[:, :, None].expand(
        -1, -1, kv_heads, -1)], dim=2)
    signed_sin = torch.cat([signed_sin[:, :, None].expand(-1, -1, rotated, -1),
                            torch.zeros_like(signed_sin)[:, :, None].expand(-1, -1, kv_heads, -1)], dim=2)
    return cos, signed_sin


def _attention_mask(key_mask: torch.Tensor, start: int, n: int, window: int | None) -> torch.Tensor | None:
    """Boolean [B, 1, n, start + n] (True: attend) for ``n`` queries after ``start`` cached tokens; None when every
    key may be attended (one query, no padding, no window reached)."""
    total = start + n
    if n == 1 and bool(key_mask.all()) and (window is None or total <= window):
        return None
    query = torch.arange(start, total, device=key_mask.device)[:, None]
    key = torch.arange(total, device=key_mask.device)[None]
    allowed = key <= query
    if window is not None:
        allowed &= key > query - window
    # a padded query position attends to itself only (its output is never used), so no row is empty
    mask = (allowed[None] & key_mask.bool()[:, None]) | (key == query)[None]
    return mask[:, None]


def _checked_vocab(vocab, size: int, device: torch.device) -> torch.Tensor | None:
    """The draft's token ids as a sorted long tensor on ``device`` (None: the whole vocabulary of ``size``)."""
    if vocab is None:
        return None
    ids = torch.unique(torch.as_tensor(vocab, dtype=torch.long).flatten()).to(device)
    if ids.numel() == 0 or int(ids[0]) < 0 or int(ids[-1]) >= size:
        raise DataError(f"a draft vocabulary holds token ids in 0..{size - 1} (the model's vocabulary), at least one; "
                        f"got {ids.numel()} id(s)" + (f" from {int(ids[0])} to {int(ids[-1])}." if ids.numel() else "."))
    return None if ids.numel() == size else ids


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# -- the lean draft in the speculative loop --------------------------------------------------------------------------
def _lean_unsupported(model: nn.Module, precision: str | None) -> str | None:
    """Why the lean engine cannot draft for ``model`` in ``precision`` (completing "the lean draft engine ..."), or
    None."""
    if precision is None:
        return "drafts from a copy of the weights: give a draft precision (draft_dtype=, e.g. int8)"
    reason = lean_draft_unsupported(model)
    return None if reason is None else f"does not support this model ({reason}); use draft_engine='modules' (or 'auto')"


@DRAFTS.register("lean", paper="Zhang et al. 2023, Draft & Verify (the draft reuses the verifier's keys and values)",
                 summary="a low-precision copy run by a fused forward with an in-place cache (the families of LEAN_FAMILIES)",
                 needs={"precision"},
                 extra={"engine": True, "priority": 1, "families": LEAN_MODEL_TYPES, "unsupported": _lean_unsupported,
                        "cached": True, "vocab": True})
class LeanEngineDraft(ModelDraft):
    """:class:`LeanDraft` drafting in the speculative loop (the preferred engine where the model's family allows)."""

    engine = "lean"

    @classmethod
    def build(cls, model: nn.Module, precision: str, length: AdaptiveDraftLength, *, cache=None,
              setup=None, adapter=None, vocab: torch.Tensor | None = None) -> LeanEngineDraft:
        """The engine for ``model`` in ``precision``: from ``cache`` (a :class:`~skiplm.speculative.cache.DraftCache`:
        an engine this process built already, or weights stored on disk) where it has it, else built (and stored);
        warmed up. ``setup`` (a :class:`~skiplm.speculative.stats.SetupStats`) records what it cost. ``adapter``: a
        trained draft's :class:`~skiplm.speculative.trained.DraftAdapter`, merged into the engine's weights.
        ``vocab``: the token ids it drafts from (a reduced-vocabulary head, :mod:`skiplm.speculative.vocab`)."""
        options = {"vocab": vocab} if vocab is not None else {}
        if cache is not None:
            if adapter is not None:
                options["adapter"] = adapter
            lean = cache.lean(model, precision, setup, **options)
        else:
            lean = LeanDraft(adapter.merged(model) if adapter is not None else model, precision, **options)
            lean.warm_up()
            if setup is not None:
                setup.record_engine(lean.setup, source="built")
        return cls(lean, length, lean.weight_bytes)

    def forward(self, state: Committed, start: int, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        logits, self.cache = self.model(tokens, state.mask[:, :start + n], state.positions(start, n), self.cache, 1)
        return logits[:, -1]

    def catch_up(self, state: Committed) -> None:
        # the full model's cache holds every committed token but the last: take what the draft has not seen from it
        if self.seen < state.committed - 1:
            adopted = self.model.adopt(state.cache, self.seen, state.committed - 1, self.cache)
            if adopted is not None:
                self.cache, self.seen = adopted, state.committed - 1

    @property
    def plan(self) -> SkipPlan:
        return self.model.plan

    def set_plan(self, plan: SkipPlan) -> None:
        self.model.plan = plan
        self.reset()

    def cache_bytes(self) -> int:
        return self.cache.nbytes() if self.cache is not None else 0


__all__ = ["LEAN_FAMILIES", "LEAN_MODEL_TYPES", "LEAN_UNFIT", "LeanCache", "LeanDraft", "LeanEngineDraft", "LeanFamily",
           "lean_draft_unsupported", "lean_family", "plain_logits"]
