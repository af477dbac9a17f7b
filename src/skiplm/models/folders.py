"""What a local model folder (or GGUF file) must hold, checked before any weights load: a readable config of a family
skiplm supports, weights that are present and not truncated, a tokenizer. Each problem is a
:class:`~skiplm.errors.ModelLoadError` naming the path and what is wrong with it, instead of whatever transformers or
safetensors would raise minutes later (``SafetensorError: incomplete metadata``, a tokenizer ``ValueError``, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelLoadError, UnsupportedModelError
from .adapters import supported_model_types

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH = "pytorch_model.bin"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH, PYTORCH_INDEX)
# Files a Hugging Face tokenizer is loaded from (one of them is enough).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tokenizer.tiktoken")
GGUF_MAGIC = b"GGUF"

SAVE_HINT = "save a model with model.save_pretrained(folder) and tokenizer.save_pretrained(folder)"


def check_folder(folder: str | Path, *, hint: str = "") -> dict:
    """Refuse a folder that cannot be a loadable model; returns its parsed ``config.json``. ``hint`` is added to each
    message (e.g. how to rebuild a cached copy)."""
    folder = Path(folder)
    config = read_config(folder, hint=hint)
    check_family(folder, config)
    check_weights(folder, hint=hint)
    check_tokenizer_files(folder, hint=hint)
    return config


def read_config(folder: Path, *, hint: str = "") -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder} is a folder but has no config.json: it is not a Hugging Face model folder"
                             f" ({SAVE_HINT}).{hint}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON ({exc}): the model folder is damaged; re-download or "
                             f"re-save it.{hint}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(config).__name__}, not a model config (an object).{hint}")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise ModelLoadError(f"{path} has no \"model_type\": it is not a transformers model config, so the model's "
                             f"family is unknown.{hint}")
    return config


def check_family(folder: Path, config: dict) -> None:
    """Refuse a family transformers does not know, or one skiplm has no adapter for, before any weights load."""
    from transformers import CONFIG_MAPPING, __version__

    model_type = config["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise ModelLoadError(
            f"{folder}: its config.json names model type {model_type!r}, which this transformers ({__version__}) does "
            f"not know: the checkpoint is damaged or needs a newer transformers. skiplm supports "
            f"{', '.join(supported_model_types())}.")
    text_config = config.get("text_config")
    types = {model_type} | ({text_config.get("model_type")} if isinstance(text_config, dict) else set())
    if not types & set(supported_model_types()):
        raise UnsupportedModelError(
            f"{folder} holds a {model_type!r} model, a family skiplm has no adapter for. Supported: "
            f"{', '.join(supported_model_types())}. For another decoder-only family, load it with transformers and "
            "describe it with skiplm.set_adapter(model, skiplm.Adapter(...)) (see skiplm/models/adapters.py).")


def check_weights(folder: Path, *, hint: str = "") -> None:
    """Refuse a folder without weights, with missing shards, or with a truncated / corrupt safetensors file (only the
    headers are read)."""
    present = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        others = sorted(p.name for p in folder.glob("*.safetensors")) + sorted(p.name for p in folder.glob("*.gguf"))
        found = f" (it has {', '.join(others[:3])}, which transformers does not load from a folder)" if others else ""
        raise ModelLoadError(
            f"{folder} has a config.json but no weights: none of {', '.join(WEIGHT_FILES)}{found}. Download the whole "
            f"model, or {SAVE_HINT}.{hint}")
    name = present[0]
    if name in (SAFETENSORS_INDEX, PYTORCH_INDEX):
        shards = _shards(folder / name, hint)
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            raise ModelLoadError(f"{folder}: {name} lists {len(shards)} weight shard(s) but {len(missing)} are missing "
                                 f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): the download is "
                                 f"incomplete.{hint}")
        files = [folder / shard for shard in shards if shard.endswith(".safetensors")]
    else:
        files = [folder / name] if name == SAFETENSORS else []
    for path in files:
        check_safetensors(path, hint=hint)


def _shards(index: Path, hint: str) -> list[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"{index} is not a weight index (a JSON object with a \"weight_map\"): {exc!r}; "
                             f"re-download it.{hint}") from None
    if not shards or not all(isinstance(s, str) for s in shards):
        raise ModelLoadError(f"{index} lists no weight shards; re-download it.{hint}")
    return shards


def check_safetensors(path: Path, *, hint: str = "") -> None:
    """Refuse a safetensors file whose header is unreadable or whose tensors run past its end (a truncated copy)."""
    from safetensors import SafetensorError, safe_open

    size = path.stat().st_size
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as exc:
        state = "is empty" if size == 0 else f"is truncated or corrupt ({size:,} bytes; safetensors says: {exc})"
        raise ModelLoadError(f"the weights file {path} {state}: re-download or re-save the model.{hint}") from None


def check_tokenizer_files(folder: Path, *, hint: str = "") -> None:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): skiplm needs the tokenizer saved "
            f"beside the weights; add it with tokenizer.save_pretrained(folder).{hint}")


def check_gguf(path: Path) -> None:
    """Refuse a ``.gguf`` path that is missing, empty, or not a GGUF file, before the (slow) conversion starts."""
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist.")
    with path.open("rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        what = ("is empty" if not magic
                else f"does not start with the GGUF magic bytes {GGUF_MAGIC!r} (it starts {magic!r})")
        raise ModelLoadError(f"{path} is not a GGUF file: it {what}. Pass a .gguf model file, or a Hugging Face "
                             "model folder.")


__all__ = ["check_folder", "check_gguf", "check_safetensors", "check_tokenizer_files", "check_weights",
           "read_config"]
