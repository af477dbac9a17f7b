"""Export a block plan (healed or not) as a GGUF file that llama.cpp runs.

The GGUF is built from the GGUF the model was loaded from (the shipped default model, or any ``.gguf`` file given to
:func:`skiplm.load_model`): its metadata (tokenizer, chat template, hyper-parameters) is copied, the planned blocks'
tensors are left out, the kept blocks are renumbered ``blk.0 .. blk.{n-1}``, ``{arch}.block_count`` and any
per-layer metadata array are cut to the kept blocks, and the plan is recorded under ``skiplm.plan``.

Tensor data, per tensor:

* **copied verbatim** (the source's quantized bytes) where the model's weight is still the one the source holds —
  every tensor of an unhealed plan under the default precision ``keep``;
* **quantized again** from the model's weight where it changed (a healed plan: LoRA merged, trained layers, a
  bridge folded in), to Q8_0 by default (healing's deltas are smaller than a 4-bit step and vanish in a 4-bit type);
* or, for the block matrices, to the type a :class:`Precision` asks for: one type for every block (``q8_0``), or
  **layer-wise** (``layerwise:5.0``): a target average of bits per weight over the kept blocks, the most important
  blocks (by an importance score per block, e.g. ZD or LIM) at the higher of two adjacent types of a ladder.

Weights go from transformers' layout to llama.cpp's with the inverse of what transformers' GGUF loader does (the
Llama family's q/k row permutation, Gemma's norm offset); every re-written tensor is checked by running the loader's
own transform on it and comparing with the model's weight, so a layout skiplm does not know is refused, never written
wrong. Quantization types are llama.cpp's; skiplm writes those gguf-py can quantize (F32, F16, BF16, Q8_0, Q5_1,
Q5_0, Q4_1, Q4_0). A plan that skips only attention or only the MLP of a block has no GGUF form (llama.cpp's graph
runs both halves of every block) and is refused. The file appears whole or not at all (written beside ``out``,
renamed when complete).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import PlanError, SkipLMError
from ..files import check_output
from ..plan import SkipPlan

# Bits per weight of the types skiplm writes (block size 32 for the quantized ones: scale [+ min] per block).
BITS_PER_WEIGHT = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q5_1": 6.0, "q5_0": 5.5, "q4_1": 5.0,
                   "q4_0": 4.5}
# Layer-wise precision's default ladder: adjacent steps of about one bit, then 8-bit.
DEFAULT_LADDER = ("q4_0", "q5_0", "q8_0")
_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)$")
# The block tensors a Precision applies to: the attention and MLP matrices (norms and biases stay as they are).
_MATRICES = ("attn_q.", "attn_k.", "attn_v.", "attn_output.", "attn_qkv.", "ffn_gate.", "ffn_up.", "ffn_down.")


class GGUFExportError(SkipLMError):
    """The model, plan or options cannot be written as a GGUF file; the message says why and what to do."""


def _qtype(name: str):
    import gguf

    try:
        return gguf.GGMLQuantizationType[name.upper()]
    except KeyError:
        raise GGUFExportError(f"unknown quantization type {name!r}; skiplm writes "
                              f"{', '.join(BITS_PER_WEIGHT)}.") from None


@dataclass(frozen=True)
class Precision:
    """How the kept blocks' matrices are stored: ``keep`` (the source's types), one type, or layer-wise.

    Text form (the CLI's ``--quantize``): ``keep``, a type (``q8_0``), or ``layerwise:BITS[:TYPE,TYPE,...]`` — a
    target average bits per weight and a ladder of types from low to high (default ``q4_0,q5_0,q8_0``).
    """

    kind: str = "keep"
    types: tuple[str, ...] = ()
    bits: float | None = None

    @classmethod
    def parse(cls, text: str | Precision) -> Precision:
        if isinstance(text, Precision):
            return text
        value = text.strip().lower()
        if value == "keep":
            return cls()
        if value in BITS_PER_WEIGHT:
            return cls("uniform", (value,))
        if value.startswith("layerwise:"):
            parts = value.split(":")
            try:
                bits = float(parts[1])
            except (IndexError, ValueError):
                bits = math.nan
            ladder = tuple(t.strip() for t in parts[2].split(",")) if len(parts) > 2 else DEFAULT_LADDER
            unknown = [t for t in ladder if t not in BITS_PER_WEIGHT]
            if math.isnan(bits) or len(parts) > 3 or unknown or len(ladder) < 2:
                raise GGUFExportError(
                    f"bad layer-wise precision {text!r}: write layerwise:BITS or layerwise:BITS:LOW,...,HIGH with "
                    f"at least two types of {', '.join(BITS_PER_WEIGHT)} (e.g. layerwise:5.0 or layerwise:5:q4_0,q5_1).")
            ladder = tuple(sorted(set(ladder), key=BITS_PER_WEIGHT.__getitem__))
            low, high = BITS_PER_WEIGHT[ladder[0]], BITS_PER_WEIGHT[ladder[-1]]
            if not low <= bits <= high:
                raise GGUFExportError(f"layer-wise target {bits:g} bits per weight is outside the ladder "
                                      f"{','.join(ladder)} ({low:g}-{high:g} bits).")
            return cls("layerwise", ladder, bits)
        raise GGUFExportError(f"unknown precision {text!r}: use keep, one of {', '.join(BITS_PER_WEIGHT)}, or "
                              "layerwise:BITS (e.g. layerwise:5.0).")

    @property
    def needs_importance(self) -> bool:
        return self.kind == "layerwise"

    def describe(self) -> str:
        if self.kind == "keep":
            return "source types kept"
        if self.kind == "uniform":
            return self.types[0].upper()
        return f"layer-wise {self.bits:g} bits/weight over {','.join(t.upper() for t in self.types)}"

    def block_types(self, blocks: Sequence[int], importance: Mapping[int, float] | None = None) -> dict[int, str | None]:
        """The type of each block's matrices (None: the source's own), for the kept ``blocks``."""
        if self.kind == "keep":
            return {block: None for block in blocks}
        if self.kind == "uniform":
            return {block: self.types[0] for block in blocks}
        if importance is None or any(block not in importance for block in blocks):
            raise GGUFExportError("layer-wise precision needs an importance score for every kept block.")
        return layerwise_types({block: importance[block] for block in blocks}, self.bits, self.types)


def layerwise_types(importance: Mapping[int, float], bits: float, ladder: Sequence[str]) -> dict[int, str]:
    """Two adjacent types of ``ladder`` around ``bits``: the most important blocks (highest score) get the higher
    one, as many as make the average (blocks weigh the same) the nearest to ``bits`` without exceeding it."""
    ladder = sorted(ladder, key=BITS_PER_WEIGHT.__getitem__)
    costs = [BITS_PER_WEIGHT[t] for t in ladder]
    upper = next((i for i, c in enumerate(costs) if c >= bits), len(costs) - 1)
    if costs[upper] == bits or upper == 0:
        return {block: ladder[upper] for block in importance}
    low, high = ladder[upper - 1], ladder[upper]
    share = (bits - costs[upper - 1]) / (costs[upper] - costs[upper - 1])
    count = math.floor(share * len(importance) + 1e-9)
    ranked = sorted(importance, key=lambda block: (-importance[block], block))
    chosen = set(ranked[:count])
    return {block: high if block in chosen else low for block in importance}


@dataclass
class GGUFExport:
    """What :func:`export_gguf` wrote: the file, its size, and per tensor whether it was copied or re-quantized."""

    path: Path
    bytes: int
    kept_blocks: list[int]
    block_types: dict[int, str]  # new block index -> its matrices' type (the most common when mixed)
    copied: int
    requantized: int
    record: dict[str, Any]

    @property
    def bits_per_weight(self) -> float:
        return self.record["block_bits_per_weight"]


def bits_per_weight(qtype) -> float:
    """Storage bits per weight of a llama.cpp type (block scales and minimums included)."""
    import gguf

    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return 8.0 * type_size / block_size


def source_gguf(model: nn.Module) -> Path:
    """The GGUF ``model`` was loaded from (via :func:`skiplm.load_model`), or a clear error."""
    from ..models.loading import DEFAULT_MODEL, default_gguf_path

    spec = str(getattr(model.config, "_name_or_path", "") or "")
    if spec == DEFAULT_MODEL:
        return default_gguf_path()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    raise GGUFExportError(
        f"GGUF export builds on the GGUF a model came from, and {spec or 'this model'!r} was not loaded from one. "
        "Load the model from a .gguf file (or the default model). For a Hugging Face folder, convert the full "
        "model once with llama.cpp's convert_hf_to_gguf.py (scripts/llama-cpp.sh fetches llama.cpp), then export "
        "from that file; or export a checkpoint instead (skiplm export without --format gguf).")


def check_block_plan(plan: SkipPlan) -> list[int]:
    """The blocks a GGUF of ``plan`` leaves out; a plan that no GGUF can express is refused, saying why."""
    if getattr(plan, "input_adaptive", False):
        raise PlanError("an input-adaptive policy cannot be exported: which layers run depends on each token.")
    if plan.prefill != plan.decode:
        raise PlanError("GGUF export needs a plan that skips the same blocks in prefill and decode: a GGUF holds one "
                        "set of layers.")
    skips = plan.decode
    blocks = set(skips.blocks)
    partial = skips.half_blocks()
    if any(partial.values()):
        raise PlanError(
            f"this plan skips single sublayers (attention {partial['attention']}, mlp {partial['mlp']}); a GGUF "
            "cannot leave out half a block (llama.cpp's graph runs attention and MLP of every block it holds). "
            "Export a block plan (skiplm plan --unit block), or run this one with skiplm.")
    if len(blocks) >= plan.num_layers:
        raise PlanError("cannot remove every block.")
    return sorted(blocks)


# -- transformers' layout <-> llama.cpp's ----------------------------------------------------------------------------

def _processor(model: nn.Module, arch: str):
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    config = model.config.get_text_config(decoder=True)
    heads = {"num_attention_heads": config.num_attention_heads,
             "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    return TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=heads)


def _to_gguf_layout(weights: np.ndarray, name: str, processor) -> np.ndarray:
    """The inverse of transformers' load-time transform of tensor ``name`` (checked by the caller)."""
    kind = type(processor).__name__
    if kind == "LlamaTensorProcessor" and (".attn_q." in name or ".attn_k." in name):
        heads = processor.config["num_attention_heads"]
        if ".attn_k." in name:
            heads = processor.config["num_key_value_heads"]
        dim = weights.shape[0] // heads // 2
        return weights.reshape(heads, 2, dim, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)
    if kind == "Gemma2TensorProcessor" and "norm.weight" in name:
        return weights + 1
    return weights


def hf_weights_by_gguf_name(model: nn.Module, arch: str) -> dict[str, str]:
    """GGUF tensor name -> the model's parameter name, by gguf-py's name table as transformers' GGUF loader uses it
    (one table for the whole model: transformers' own helper rebuilds it for every submodule, ~12 s here)."""
    import gguf

    arch_id = next((key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch), None)
    if arch_id is None:
        raise GGUFExportError(f"gguf-py has no tensor names for architecture {arch!r}.")
    processor = _processor(model, arch)
    table = gguf.get_tensor_name_map(arch_id, model.config.get_text_config(decoder=True).num_hidden_layers)
    names = {}
    for hf_name in model.state_dict():
        base, dot, suffix = processor.preprocess_name(hf_name).rpartition(".")
        if suffix not in ("weight", "bias"):
            base, dot, suffix = processor.preprocess_name(hf_name), "", ""
        gguf_name = table.get_name(base)
        if gguf_name is not None:
            names[f"{gguf_name}{dot}{suffix}"] = hf_name
    return names


def gguf_tensor(model: nn.Module, arch: str, gguf_name: str, hf_weight: torch.Tensor, qtype_name: str,
                processor=None) -> tuple[np.ndarray, Any]:
    """``hf_weight`` (tensor ``gguf_name`` of ``model``) in llama.cpp's layout, quantized to ``qtype_name``: the
    array to write and its type. Refused where transformers' loader would not read it back as ``hf_weight``."""
    import gguf

    processor = processor or _processor(model, arch)
    values = hf_weight.detach().to(torch.float32).cpu().numpy()
    laid_out = np.ascontiguousarray(_to_gguf_layout(values, gguf_name, processor))
    back = processor.process(laid_out, gguf_name).weights
    if back.shape != values.shape or not np.array_equal(back, values):
        raise GGUFExportError(f"cannot write {gguf_name} for architecture {arch!r}: skiplm does not know how "
                              "transformers lays out this tensor, and will not write it wrong.")
    qtype = _qtype(qtype_name)
    try:
        return gguf.quants.quantize(laid_out, qtype), qtype
    except (NotImplementedError, ValueError) as exc:
        raise GGUFExportError(f"cannot quantize {gguf_name} {tuple(values.shape)} to {qtype_name}: {exc}") from None


# -- the export -------------------------------------------------------------------------------------------------------

def export_gguf(
    model: nn.Module,
    plan: SkipPlan,
    out: str | Path,
    *,
    healed=None,
    precision: str | Precision = "keep",
    importance: Mapping[int, float] | Sequence[float] | None = None,
    source: str | Path | None = None,
    changed_type: str = "q8_0",
    check_model: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> GGUFExport:
    """Write ``model`` with ``plan``'s blocks deleted as the GGUF file ``out``.

    ``healed``: a :class:`skiplm.heal.Healed` for this plan — its weights are written (changed tensors quantized
    again). ``precision``: see :class:`Precision`; layer-wise needs ``importance``, one score per block of the full
    model (higher = more important; :func:`block_importance` computes one). ``source``: the GGUF the model came
    from (default: found from how it was loaded). ``changed_type``: the type of tensors whose weights changed (healed) where
    ``precision`` is ``keep`` — Q8_0 by default, because healing's deltas are smaller than a 4-bit step: quantized
    back to the default model's Q4_1 they all but vanish (measured: the healed 1.2x plan's logits came back within
    0.5 of the unhealed plan's, 9.4 from the healed model's; at Q8_0 within 1.0 of the healed model's, same top-1
    token everywhere). ``progress(done, total)`` is called per tensor written.
    """
    import gguf

    out = check_output(out, kind="file", what="GGUF file")
    if out.suffix != ".gguf":
        raise GGUFExportError(f"{out} does not end in .gguf; name the output file something.gguf.")
    precision = Precision.parse(precision)
    if changed_type not in BITS_PER_WEIGHT:
        raise GGUFExportError(f"unknown type {changed_type!r} for changed tensors; use one of {', '.join(BITS_PER_WEIGHT)}.")
    if healed is not None:
        plan = healed.plan
    if check_model:
        (healed or plan).check_model(model)
    deleted = check_block_plan(plan)
    source = Path(source) if source is not None else source_gguf(model)
    reader = gguf.GGUFReader(source)
    arch = _field(reader, "general.architecture")
    count_key = f"{arch}.block_count"
    num_blocks = int(_field(reader, count_key))
    if num_blocks != plan.num_layers:
        raise GGUFExportError(f"{source} has {num_blocks} blocks but the plan is for {plan.num_layers} layers: it is "
                              "not the GGUF this model was loaded from.")
    kept = sorted(set(range(num_blocks)) - set(deleted))
    new_index = {old: new for new, old in enumerate(kept)}
    if precision.needs_importance:
        if importance is None:
            raise GGUFExportError("layer-wise precision needs block importances (skiplm export --importance zd|lim).")
        importance = dict(enumerate(importance)) if not isinstance(importance, Mapping) else dict(importance)
    types = precision.block_types(kept, importance)

    hf_names = hf_weights_by_gguf_name(model, arch)
    processor = _processor(model, arch)
    tensors = [t for t in reader.tensors if _block_of(t.name)[0] in (None, *new_index)]
    copied = requantized = 0
    per_block: dict[int, dict[Any, int]] = {}  # new block -> its matrices' elements per type

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
    try:
        with healed.baked(model) if healed is not None else contextlib.nullcontext():
            state = model.state_dict()
            _copy_metadata(reader, writer, count_key, num_blocks, kept)
            writer.add_string("skiplm.plan", json.dumps(plan.to_json(), sort_keys=True))
            writer.add_array("skiplm.kept_blocks", kept)
            arrays = []
            for tensor in tensors:
                block, rest = _block_of(tensor.name)
                name = tensor.name if block is None else f"blk.{new_index[block]}.{rest}"
                matrix = rest is not None and rest.startswith(_MATRICES)
                wanted = types[block] if matrix else None
                weight = state.get(hf_names.get(tensor.name))
                source_type = tensor.tensor_type.name.lower()
                # Whether the model still holds the source's weight matters only where it could be copied.
                changed = (wanted in (None, source_type) and weight is not None
                           and not _same_as_source(tensor, weight, processor))
                if changed and wanted is None:
                    wanted = changed_type
                if wanted is None or (wanted == source_type and not changed):
                    data, qtype = tensor.data, tensor.tensor_type
                    copied += 1
                elif weight is None:
                    raise GGUFExportError(f"{tensor.name} has no counterpart among the model's weights, so it "
                                          f"cannot be written as {wanted}.")
                else:
                    data, qtype = gguf_tensor(model, arch, tensor.name, weight, wanted, processor)
                    requantized += 1
                if matrix:
                    kinds = per_block.setdefault(new_index[block], {})
                    kinds[qtype] = kinds.get(qtype, 0) + int(tensor.n_elements)
                writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, qtype)
                arrays.append(data)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for done, data in enumerate(arrays, 1):
                writer.write_tensor_data(data, tensor_endianess=reader.endianess)
                if progress is not None:
                    progress(done, len(arrays))
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    counts = [(qtype, n) for kinds in per_block.values() for qtype, n in kinds.items()]
    elements = sum(n for _, n in counts)
    bits = sum(n * bits_per_weight(qtype) for qtype, n in counts) / elements if elements else float("nan")
    block_types = {block: max(kinds, key=kinds.get).name.lower() for block, kinds in sorted(per_block.items())}
    record = {"source": str(source), "architecture": arch, "deleted_blocks": deleted, "kept_blocks": kept,
              "precision": precision.describe(), "block_types": {str(b): t for b, t in block_types.items()},
              "block_bits_per_weight": round(bits, 4), "copied_tensors": copied, "requantized_tensors": requantized,
              "bytes": out.stat().st_size, "healed": healed.method if healed is not None else None}
    return GGUFExport(out, out.stat().st_size, kept, block_types, copied, requantized, record)


def block_importance(model: nn.Module, metric: str = "zd", batches: list[torch.Tensor] | None = None) -> list[float]:
    """One importance score per block, higher = more important, for layer-wise precision.

    ``zd``: from the weights alone (the share of each block's weights with |z| > 1 is *low* for important blocks,
    so the score is its negative). ``lim``: layer input modification, 1 - cos(input, output) of each block on
    calibration ``batches`` (the block-influence metric)."""
    from ..analysis import metrics
    from ..analysis.activations import trace_residuals

    if metric == "zd":
        return [-float(v) for v in metrics.zd_score(model, "block")]
    if metric == "lim":
        if not batches:
            raise GGUFExportError("the lim importance needs calibration text (batches of token ids).")
        return [float(v) for v in metrics.block_influence(trace_residuals(model, batches))]
    raise GGUFExportError(f"unknown importance {metric!r}: use zd (weights only) or lim (needs calibration text).")


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        raise GGUFExportError(f"the GGUF has no {key!r} field; it is not a model file skiplm can export from.")
    return field.contents()


def _block_of(name: str) -> tuple[int | None, str | None]:
    """(block index, the rest of the name) of a ``blk.N.rest`` tensor; (None, None) for the others."""
    match = _BLOCK_TENSOR.match(name)
    return (int(match[1]), match[2]) if match else (None, None)


def _same_as_source(tensor, weight: torch.Tensor, processor) -> bool:
    """Whether ``weight`` is what transformers' loader makes of ``tensor`` (the model still holds the source's)."""
    import gguf

    values = processor.process(gguf.quants.dequantize(tensor.data, tensor.tensor_type), tensor.name).weights
    source = torch.from_numpy(np.array(values, dtype=np.float32)).to(weight.dtype)
    return source.shape == weight.shape and torch.equal(source, weight.detach().cpu())


def _copy_metadata(reader, writer, count_key: str, num_blocks: int, kept: list[int]) -> None:
    """Every key of the source but the writer's own; the block count and per-block arrays cut to the kept blocks."""
    import gguf

    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == count_key:
            value = len(kept)
        elif sub is not None and not field.name.startswith("tokenizer.") and len(value) == num_blocks:
            value = [value[block] for block in kept]
        writer.add_key_value(field.name, value, kind, sub_type=sub)


__all__ = ["BITS_PER_WEIGHT", "DEFAULT_LADDER", "GGUFExport", "GGUFExportError", "Precision", "block_importance",
           "check_block_plan", "export_gguf", "gguf_tensor", "hf_weights_by_gguf_name", "layerwise_types",
           "source_gguf"]
