"""Which devices this torch can run skiplm on, checked before a model loads, with what to do when one is missing."""

from __future__ import annotations

import torch

from ..errors import DeviceError

SUPPORTED = ("cpu", "cuda", "mps", "xpu")


def check_device(name: str | torch.device) -> torch.device:
    """``name`` as a torch device, or :class:`~skiplm.errors.DeviceError` saying why this torch cannot use it."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"{name!r} is not a device: use cpu, cuda (or cuda:N), mps or xpu.") from None
    if device.type not in SUPPORTED:
        raise DeviceError(f"skiplm does not run models on {device.type!r} devices: use cpu, cuda (or cuda:N), mps "
                          "or xpu.")
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise DeviceError(f"this torch ({torch.__version__}) was built without CUDA, so --device {name} cannot "
                              "work: pass --device cpu, or install a CUDA build of torch (scripts/setup.sh picks one "
                              "on a machine with an NVIDIA GPU; SKIPLM_TORCH=... overrides the requirement).")
        if not torch.cuda.is_available():
            raise DeviceError(f"no CUDA GPU is visible to this process (torch.cuda.is_available() is False), so "
                              f"--device {name} cannot work: pass --device cpu, or check the driver and "
                              "CUDA_VISIBLE_DEVICES.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"{name} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}.")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {name}: Apple's MPS backend is not available in this torch or on this machine; "
                          "pass --device cpu.")
    elif device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise DeviceError(f"--device {name}: no Intel XPU is available to this torch; pass --device cpu.")
    return device


__all__ = ["SUPPORTED", "check_device"]
