"""Cheaper copies of a model's weights, for a speculative draft: the same model in a lower precision.

``draft_copy(model, "bfloat16")`` (or ``"float16"``, ``"float32"``) is a cast copy. ``draft_copy(model, "int8")`` is
weight-only int8: every ``nn.Linear`` (the output head too) keeps its weight as int8 with one scale per output row
(symmetric, scale = max |w| / 127) and computes in bfloat16; the rest of the model (embeddings, norms) is bfloat16.
``"int8-dynamic"`` also quantizes each product's input on the fly (torch's dynamically quantized int8 kernels) and keeps
the rest in float32. :func:`draft_linear` makes one such product from a weight; the lean draft engine
(:mod:`skiplm.speculative.lean`) builds its fused products with it.

A product is made in two steps: :func:`draft_tensors` computes its weights in the draft's format (the int8 values and
their scales, or the cast weight: the costly part, ~1 s for the default model's int8 copy) and :func:`draft_product`
makes the product from them (packing them for the device's kernels). :class:`DraftWeights` runs the two steps for a
whole draft and keeps the tensors of the first one by name — what the draft cache
(:mod:`skiplm.speculative.cache`) stores; given stored tensors, it skips the first step, so a draft from the cache goes
through the same second step with the same tensors as one built fresh, and is the same draft bit for bit.

Measured on the 2-core Sapphire Rapids VM, default model, batch 1: the layers' weights (106M) for one input row take
~20 ms in float32 (memory-bound), ~13 ms in oneDNN-packed bfloat16, ~14 ms with int8 weights
(``aten._weight_int8pack_mm``, compute-bound) and ~9 ms int8 x int8 (dynamic, fbgemm). A decode step through the lean
engine: int8 ~18 ms, int8-dynamic ~13 ms, against ~40 ms for the fp32 model through its modules (the VM's speed drifts
by ~20% over minutes; ratios measured in one run hold better). Teacher-forced top-1 agreement with the fp32
model, decoding one token at a time after the prompt (256 steps each on GSM8K chat prompts / pydoc text): int8 0.973 /
0.984, int8-dynamic 0.961 / 0.973. int8-dynamic quantizes each product's whole input with one scale: one token at a
time that is one scale per token, but a prefill of many tokens (or a batch of rows) shares it, and agreement falls
(0.69 measured over a 1,024-token prefill in one pass, before the lean engine folded the norms' weights into the
products).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..errors import ModelLoadError
from ..models.loading import resolve_dtype

DRAFT_PRECISIONS = ("float32", "bfloat16", "float16", "int8", "int8-dynamic")
INT8_PRECISIONS = ("int8", "int8-dynamic")


def precision_name(precision: str | torch.dtype) -> str:
    """The canonical name of a draft precision: ``"int8"``, ``"int8-dynamic"``, or a floating dtype (a torch dtype or a name the model
    loader takes, short aliases included)."""
    if isinstance(precision, str) and precision.lower() in INT8_PRECISIONS:
        return precision.lower()
    try:
        name = str(resolve_dtype(precision)).removeprefix("torch.")
    except ModelLoadError:
        name = None
    if name not in DRAFT_PRECISIONS:
        raise ModelLoadError(f"unknown draft precision {precision!r}; use one of {', '.join(DRAFT_PRECISIONS)} "
                             "(int8: int8 weights, bfloat16 arithmetic; int8-dynamic: int8 weights and "
                             "activations, float32 elsewhere).")
    return name


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype a draft in ``precision`` (a :func:`precision_name`) computes in: bfloat16 for int8 weights, float32
    around int8-dynamic products, else the precision itself."""
    return {"int8": torch.bfloat16, "int8-dynamic": torch.float32}.get(precision) or getattr(torch, precision)


def _row_scales(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 scales, one per output row of ``weight`` [out, in]: max |w| / 127."""
    return (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)


class Int8Linear(nn.Module):
    """``x @ weight.T + bias`` with an int8 weight [out, in] and one ``compute_dtype`` scale per output row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16, use_kernel: bool | None = None):
        """``use_kernel``: whether torch's int8-weight kernel serves this device (None: find out)."""
        super().__init__()
        self._take(self.quantize(weight, bias, compute_dtype), use_kernel)

    @staticmethod
    def quantize(weight: torch.Tensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        """The stored form: ``weight`` (int8 [out, in]), ``scale`` ([out], ``compute_dtype``) and ``bias`` if any."""
        weight = weight.detach().float()
        scale = _row_scales(weight)
        tensors = {"weight": torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8),
                   "scale": scale.to(compute_dtype)}
        if bias is not None:
            tensors["bias"] = bias.detach().to(compute_dtype)
        return tensors

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], use_kernel: bool | None = None) -> Int8Linear:
        """The product of a stored form (:meth:`quantize`)."""
        product = cls.__new__(cls)
        nn.Module.__init__(product)
        product._take(tensors, use_kernel)
        return product

    def _take(self, tensors: Mapping[str, torch.Tensor], use_kernel: bool | None) -> None:
        self.register_buffer("weight_int8", tensors["weight"])
        self.register_buffer("scale", tensors["scale"])
        self.register_buffer("bias", tensors.get("bias"))
        self.out_features, self.in_features = self.weight_int8.shape
        compute = self.scale.dtype
        self.use_kernel = _kernel_works(self.weight_int8.device, compute) if use_kernel is None else use_kernel
        self.nbytes = sum(t.numel() * t.element_size() for t in (self.weight_int8, self.scale, self.bias)
                          if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.scale.dtype).contiguous()
        return self.product(flat).reshape(list(x.shape[:-1]) + [self.out_features])

    def product(self, flat: torch.Tensor) -> torch.Tensor:
        """The product of a contiguous [rows, in] input in the compute dtype (the lean engine's path: no
        reshapes, no module call)."""
        if self.use_kernel:
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        else:
            out = nn.functional.linear(flat, self.weight_int8.to(flat.dtype) * self.scale[:, None])
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight, kernel={self.use_kernel}"


class DynamicInt8Linear(nn.Module):
    """``x @ weight.T + bias`` in int8 x int8 products: the weight quantized once per output row, each input row
    quantized on the fly (dynamic quantization, torch's ``quantized::linear_dynamic``: fbgemm / oneDNN kernels); float32
    in and out. On the 2-core VM, 106M weights from memory took 7.0 ms for one input row, against 9.8 ms for
    :class:`Int8Linear` and 20.5 ms in float32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self._take(self.quantize(weight, bias))

    @staticmethod
    def quantize(weight: torch.Tensor, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The stored form: ``weight`` (the int8 values [out, in] torch's per-row quantization gives), ``scale``
        ([out], float32) and ``bias`` (float32) if any."""
        weight = weight.detach().float()
        scale = _row_scales(weight)
        with warnings.catch_warnings():  # torch marks its quantized tensors deprecated; the kernels are what we use
            warnings.simplefilter("ignore")
            quantized = torch.quantize_per_channel(weight, scale.double(), torch.zeros_like(scale, dtype=torch.long),
                                                   0, torch.qint8)
        tensors = {"weight": quantized.int_repr(), "scale": scale}
        if bias is not None:
            tensors["bias"] = bias.detach().float()
        return tensors

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> DynamicInt8Linear:
        """The product of a stored form (:meth:`quantize`): packed for the kernels (the int8 values and scales are
        those the quantization gave, so the packed weight is the same)."""
        product = cls.__new__(cls)
        nn.Module.__init__(product)
        product._take(tensors)
        return product

    def _take(self, tensors: Mapping[str, torch.Tensor]) -> None:
        weight, scale, bias = tensors["weight"], tensors["scale"], tensors.get("bias")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantized = torch._make_per_channel_quantized_tensor(weight, scale.double(),
                                                                 torch.zeros_like(scale, dtype=torch.long), 0)
            # (fbgemm's packing reads each row's scale one by one: ~4 us a row, 0.8 s for the default model)
            self.packed = torch.ops.quantized.linear_prepack(quantized, bias)
        self.out_features, self.in_features = weight.shape
        self.nbytes = weight.numel() + 4 * self.out_features * (2 if bias is None else 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed)  # any leading dimensions

    def product(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(flat, self.packed)


class CastLinear(nn.Module):
    """``x @ weight.T + bias`` with the weight cast to ``dtype``, optionally pre-packed in oneDNN's blocked layout
    (``packed=True``, a CPU with oneDNN: :func:`draft_linear` packs bfloat16 where it runs). Measured here: a bf16 product of one or a few rows
    by a [3072, 576] weight takes 195 us packed against ~300 us plain; a float32 product of 7 rows by the default
    model's [49152, 576] output head 5.7 ms packed against 10.8 ms through ``F.linear``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, packed: bool = False):
        super().__init__()
        self._take(self.cast(weight, bias, dtype), packed)

    @staticmethod
    def cast(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The stored form: ``weight`` and ``bias`` (if any) in ``dtype``."""
        tensors = {"weight": weight.detach().to(dtype).contiguous()}
        if bias is not None:
            tensors["bias"] = bias.detach().to(dtype)
        return tensors

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], packed: bool = False) -> CastLinear:
        product = cls.__new__(cls)
        nn.Module.__init__(product)
        product._take(tensors, packed)
        return product

    def _take(self, tensors: Mapping[str, torch.Tensor], packed: bool) -> None:
        self.weight = tensors["weight"]
        self.bias = tensors.get("bias")
        self.out_features, self.in_features = self.weight.shape
        # the packed copy replaces the weight (it is all the product needs)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, None) if packed else None
        # memory the product holds (the packed layout holds as many values as the weight)
        self.nbytes = sum(t.numel() * t.element_size() for t in (self.weight, self.bias) if t is not None)
        if packed:
            self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return nn.functional.linear(x, self.weight, self.bias)
        return self.product(x.reshape(-1, self.in_features).contiguous()).reshape(list(x.shape[:-1]) + [self.out_features])

    def product(self, flat: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return nn.functional.linear(flat, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")


def packed_head(model: nn.Module) -> CastLinear | None:
    """The model's float32 output head pre-packed for oneDNN, for verification passes over several tokens (see
    :class:`CastLinear`), or None where that does not apply (logits that are not the head's output as it is — soft-capped,
    scaled, or a family the lean engine does not know: :func:`~skiplm.speculative.lean.plain_logits` —, not an
    ``nn.Linear``, not float32 on a CPU with oneDNN).
    The packed copy is extra memory: as much as the head's weight."""
    from .lean import plain_logits  # (lean builds on this module)

    head = model.get_output_embeddings()
    if not plain_logits(model) or not isinstance(head, nn.Linear) or head.weight.dtype != torch.float32 or \
            not _packed_works(head.weight.device, torch.float32):
        return None
    with torch.no_grad():
        return CastLinear(head.weight, head.bias, torch.float32, packed=True)


def draft_tensors(weight: torch.Tensor, bias: torch.Tensor | None, precision: str) -> dict[str, torch.Tensor]:
    """The weights of a product by ``weight`` [out, in] (and ``bias``) in a draft ``precision``, in their stored form:
    ``weight`` (int8 for the int8 precisions, else cast), ``scale`` (the int8 precisions: one per output row) and
    ``bias`` where there is one. :func:`draft_product` makes the product from them."""
    name = precision_name(precision)
    if name == "int8-dynamic":
        return DynamicInt8Linear.quantize(weight, bias)
    if name == "int8":
        return Int8Linear.quantize(weight, bias, compute_dtype(name))
    return CastLinear.cast(weight, bias, getattr(torch, name))


def stored_dtypes(precision: str) -> dict[str, torch.dtype]:
    """The dtype of each tensor of a product's stored form (:func:`draft_tensors`) in ``precision``."""
    name = precision_name(precision)
    if name == "int8-dynamic":
        return {"weight": torch.int8, "scale": torch.float32, "bias": torch.float32}
    if name == "int8":
        return {"weight": torch.int8, "scale": compute_dtype(name), "bias": compute_dtype(name)}
    dtype = getattr(torch, name)
    return {"weight": dtype, "bias": dtype}


def draft_product(tensors: Mapping[str, torch.Tensor], precision: str, probes: dict[str, bool] | None = None
                  ) -> nn.Module:
    """The product whose stored form (:func:`draft_tensors`) is ``tensors``: :class:`DynamicInt8Linear`,
    :class:`Int8Linear`, or a :class:`CastLinear` (bfloat16 packed for oneDNN where it runs). ``probes`` keeps what was
    found out about the device's kernels, so it is probed once per draft, not per weight."""
    probes = {} if probes is None else probes
    name = precision_name(precision)
    device = tensors["weight"].device
    if name == "int8-dynamic":
        _refuse_unavailable(name, device, probes)
        return DynamicInt8Linear.from_tensors(tensors)
    if name == "int8":
        if "int8" not in probes:
            probes["int8"] = _kernel_works(device, compute_dtype(name))
        return Int8Linear.from_tensors(tensors, use_kernel=probes["int8"])
    dtype = getattr(torch, name)
    if dtype == torch.bfloat16 and "bf16_packed" not in probes:
        probes["bf16_packed"] = _packed_works(device, torch.bfloat16)
    return CastLinear.from_tensors(tensors, packed=dtype == torch.bfloat16 and probes["bf16_packed"])


def draft_linear(weight: torch.Tensor, bias: torch.Tensor | None, precision: str,
                 probes: dict[str, bool] | None = None) -> nn.Module:
    """A product by ``weight`` [out, in] (and ``bias``) in a draft ``precision`` (:data:`DRAFT_PRECISIONS`): int8
    weights computing in bfloat16 (:class:`Int8Linear`), int8 x int8 (:class:`DynamicInt8Linear`), or a cast copy
    (:class:`CastLinear`): :func:`draft_product` of :func:`draft_tensors`."""
    name = precision_name(precision)
    probes = {} if probes is None else probes
    _refuse_unavailable(name, weight.device, probes)  # before the weights are quantized
    return draft_product(draft_tensors(weight, bias, name), name, probes)


def _refuse_unavailable(precision: str, device: torch.device, probes: dict[str, bool]) -> None:
    if precision == "int8-dynamic":
        if "int8-dynamic" not in probes:
            probes["int8-dynamic"] = _dynamic_int8_works(device)
        if not probes["int8-dynamic"]:
            raise ModelLoadError(f"int8-dynamic drafts need {_DYNAMIC_KERNELS}, which this device or build lacks; use "
                                 "--draft-dtype int8.")


class StoredDraftMismatch(ValueError):
    """Stored tensors that do not fit the draft being made (another model, another format): the cache rebuilds."""


class DraftWeights:
    """The products of one draft in ``precision``, by name, and their stored forms (:func:`draft_tensors`).

    Without ``stored``, each :meth:`product` computes its stored form from the model's weights and keeps it in
    :attr:`tensors` (what the draft cache saves). With ``stored`` (a cache entry's tensors, by name), each product is
    made from the stored form instead, after checking its tensors' names, shapes and dtypes
    (:class:`StoredDraftMismatch` otherwise) — the same tensors through the same :func:`draft_product`, so the draft is
    the one built fresh, bit for bit. Records the seconds spent computing (``quantize_seconds``) and packing
    (``pack_seconds``)."""

    def __init__(self, precision: str | torch.dtype, stored: Mapping[str, torch.Tensor] | None = None):
        self.precision = precision_name(precision)
        self.stored = stored
        self.tensors: dict[str, torch.Tensor] = {}
        self.probes: dict[str, bool] = {}
        self.quantize_seconds = 0.0
        self.pack_seconds = 0.0

    def product(self, name: str, source: Callable[[], tuple[torch.Tensor, torch.Tensor | None]],
                shape: tuple[int, int], bias: bool, rows: torch.Tensor | None = None) -> nn.Module:
        """The product ``name``, of out x in ``shape`` (with a bias or not), from ``source()`` — ``(weight, bias)``,
        only called when nothing is stored. ``rows`` (output row indices): the product over those rows only, e.g. a
        reduced-vocabulary head; the stored form recorded is still the whole weight's, and since every stored
        precision quantizes each output row on its own (one scale per row), the rows of the stored form are exactly
        the stored form of the rows."""
        start = time.perf_counter()
        if self.stored is None:
            weight, bias_tensor = source()
            _refuse_unavailable(self.precision, weight.device, self.probes)  # before any work
            tensors = draft_tensors(weight, bias_tensor, self.precision)
        else:
            tensors = self._stored(name, tuple(shape), bias)
        for key, tensor in tensors.items():
            self.tensors[f"{name}.{key}"] = tensor
        if rows is not None:
            tensors = {key: tensor.index_select(0, rows.to(tensor.device)) for key, tensor in tensors.items()}
        packing = time.perf_counter()
        self.quantize_seconds += packing - start
        product = draft_product(tensors, self.precision, self.probes)
        self.pack_seconds += time.perf_counter() - packing
        return product

    def _stored(self, name: str, shape: tuple[int, ...], bias: bool) -> dict[str, torch.Tensor]:
        dtypes = stored_dtypes(self.precision)
        wanted = {"weight": shape}
        if "scale" in dtypes:
            wanted["scale"] = shape[:1]
        if bias:
            wanted["bias"] = shape[:1]
        tensors = {}
        for key, expected in wanted.items():
            tensor = self.stored.get(f"{name}.{key}")
            if tensor is None:
                raise StoredDraftMismatch(f"it has no tensor {name}.{key}")
            if tuple(tensor.shape) != expected or tensor.dtype != dtypes[key]:
                raise StoredDraftMismatch(f"its tensor {name}.{key} is {tensor.dtype} {tuple(tensor.shape)}, this "
                                          f"draft needs {dtypes[key]} {expected}")
            tensors[key] = tensor
        return tensors

    def check_complete(self) -> None:
        """Refuse stored tensors no product took (they were made for another model)."""
        if self.stored is not None:
            extra = sorted(set(self.stored) - set(self.tensors))
            if extra:
                raise StoredDraftMismatch(f"it holds {len(extra)} tensor(s) this draft does not have ({extra[0]}, ...)")


_DYNAMIC_KERNELS = "torch's CPU quantized kernels (fbgemm / oneDNN)"


def precision_unavailable(precision: str, device: torch.device) -> str | None:
    """Why a draft in ``precision`` cannot run on ``device`` (None: it can)."""
    if precision_name(precision) == "int8-dynamic" and not _dynamic_int8_works(device):
        return f"it needs {_DYNAMIC_KERNELS}, which this device or build lacks"
    return None


def _dynamic_int8_works(device: torch.device) -> bool:
    """Whether torch's dynamically quantized int8 product runs here (and computes correctly)."""
    if device.type != "cpu":
        return False
    try:
        product = DynamicInt8Linear(torch.ones(16, 64))
        return bool(torch.allclose(product(torch.ones(2, 64)), torch.full((2, 16), 64.0), rtol=0.02))
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


def _packed_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN's pre-packed product runs here in ``dtype`` (and computes correctly)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = torch.ones(16, 64, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 64, dtype=dtype), packed, None, "none", [], "")
        return bool(torch.allclose(out.float(), torch.full((2, 16), 64.0)))
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


def _kernel_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch has the int8-weight kernel for ``device`` and ``dtype`` (and it computes correctly)."""
    kernel = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if kernel is None:
        return False
    try:
        x = torch.ones(1, 64, dtype=dtype, device=device)
        weight = torch.ones(16, 64, dtype=torch.int8, device=device)
        out = kernel(x, weight, torch.full((16,), 0.5, dtype=dtype, device=device))
        return bool(torch.allclose(out.float(), torch.full_like(out.float(), 32.0)))
    except (RuntimeError, NotImplementedError):
        return False


def draft_copy(model: nn.Module, precision: str | torch.dtype, weights: DraftWeights | None = None, *,
               adapter=None) -> nn.Module:
    """A copy of ``model`` in ``precision`` (see the module docstring), in eval mode; ``model`` is left as it is.
    ``weights``: where the int8 products come from (stored tensors from the draft cache) and are recorded (by module
    name); a fresh :class:`DraftWeights` by default. ``adapter``: a trained draft's
    :class:`~skiplm.speculative.trained.DraftAdapter`, merged into the copy's weights before they are cast or
    quantized."""
    name = precision_name(precision)
    source = adapter.merged(model) if adapter is not None else model  # (a view: deep-copied whole below)
    copied = copy.deepcopy(source).to(compute_dtype(name)).eval()
    if name not in INT8_PRECISIONS:
        return copied
    weights = weights if weights is not None else DraftWeights(name)
    for module_name, module in list(copied.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):  # quantized from the cast copy's weights
                path = f"{module_name}.{child_name}" if module_name else child_name
                setattr(module, child_name, weights.product(path, lambda child=child: (child.weight, child.bias),
                                                            (child.out_features, child.in_features),
                                                            child.bias is not None))
    weights.check_complete()
    return copied
