"""Cheaper copies of a model's weights, for a speculative draft: the same model in a lower precision.

``draft_copy(model, "bfloat16")`` (or ``"float16"``, ``"float32"``) is a cast copy. ``draft_copy(model, "int8")`` is
weight-only int8: every ``nn.Linear`` (the output head too) keeps its weight as int8 with one scale per output row
(symmetric, scale = max |w| / 127) and computes in bfloat16; the rest of the model (embeddings, norms) is bfloat16.
On the 2-core Sapphire Rapids VM this was measured on, a batch-1 decode step of the default model takes ~0.7x the
fp32 step alone (~0.8x inside the speculative loop), and the copy agrees with the full model on ~96% of
teacher-forced GSM8K next tokens: a draft that is usually right, but not cheap enough there to pay by itself. The product
uses torch's int8-weight kernel (``aten._weight_int8pack_mm``) where the device has it, else dequantizes per call.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import ModelLoadError
from .models import resolve_dtype

DRAFT_PRECISIONS = ("float32", "bfloat16", "float16", "int8")


def precision_name(precision: str | torch.dtype) -> str:
    """The canonical name of a draft precision: ``"int8"``, or a floating dtype (a torch dtype or a name the model
    loader takes, short aliases included)."""
    if isinstance(precision, str) and precision.lower() == "int8":
        return "int8"
    try:
        name = str(resolve_dtype(precision)).removeprefix("torch.")
    except ModelLoadError:
        name = None
    if name not in DRAFT_PRECISIONS:
        raise ModelLoadError(f"unknown draft precision {precision!r}; use one of {', '.join(DRAFT_PRECISIONS)} "
                             "(int8: int8 weights, bfloat16 arithmetic).")
    return name


class Int8Linear(nn.Module):
    """``nn.Linear`` with an int8 weight [out, in] and one ``compute_dtype`` scale per output row."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16, use_kernel: bool | None = None):
        """``use_kernel``: whether torch's int8-weight kernel serves this device (None: find out)."""
        super().__init__()
        weight = linear.weight.detach().float()
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(compute_dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(compute_dtype))
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.use_kernel = _kernel_works(self.weight_int8.device, compute_dtype) if use_kernel is None else use_kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.scale.dtype).contiguous()
        if self.use_kernel:
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        else:
            out = nn.functional.linear(flat, self.weight_int8.to(flat.dtype) * self.scale[:, None])
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight, kernel={self.use_kernel}"


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


def draft_copy(model: nn.Module, precision: str | torch.dtype) -> nn.Module:
    """A copy of ``model`` in ``precision`` (see the module docstring), in eval mode; ``model`` is left as it is."""
    name = precision_name(precision)
    if name != "int8":
        return copy.deepcopy(model).to(getattr(torch, name)).eval()
    quantized = copy.deepcopy(model).to(torch.bfloat16).eval()
    use_kernel = _kernel_works(next(quantized.parameters()).device, torch.bfloat16)  # once, not per layer
    for parent in list(quantized.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, child_name, Int8Linear(child, use_kernel=use_kernel))
    return quantized
