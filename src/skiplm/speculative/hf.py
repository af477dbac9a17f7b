"""Self-speculative decoding inside transformers' own ``generate()``: :func:`custom_generate`, the callable it takes
as ``custom_generate=``. transformers prepares the inputs and the generation config; this runs a
:class:`~skiplm.speculative.decoder.SpeculativeDecoder` instead of its decoding loop and returns what ``generate()``
returns."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import DataError
from ..plan import SkipPlan
from .decoder import SpeculativeDecoder
from .sampling import Sampling
from .state import eos_ids, pad_id

# the logits processors the speculative loop applies itself (as its sampling settings)
APPLIED_PROCESSORS = ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper")


def custom_generate(model: nn.Module, input_ids: torch.Tensor, logits_processor=None, stopping_criteria=None,
                    generation_config=None, synced_gpus: bool = False, streamer: Any = None, *,
                    draft_plan: SkipPlan | None = None, draft_dtype: torch.dtype | str | None = None,
                    prompt_lookup: int | None = None, speculative_decoder: SpeculativeDecoder | None = None,
                    **model_kwargs: Any) -> torch.Tensor:
    """Self-speculative decoding inside transformers' own ``generate()``, as its ``custom_generate`` callable::

        model.generate(**inputs, max_new_tokens=64, do_sample=False,
                       custom_generate=skiplm.speculative.custom_generate, draft_dtype="int8", prompt_lookup=3)

    transformers prepares the inputs and the generation config, then calls this instead of its decoding loop; the
    draft is given by ``draft_plan`` and / or ``draft_dtype`` (as for :class:`SpeculativeDecoder`), or by a
    ``speculative_decoder`` kept across calls (its copy, adaptive length and monitors carry over). Greedy decoding
    and sampling with temperature / top-k / top-p are supported; other logits processors (repetition penalty,
    minimum length, ...) and ``return_dict_in_generate`` are refused, since the speculative loop does not apply them.
    Returns the sequences, as ``generate()`` does: prompt, then new tokens, rows that ended early padded.
    """
    config = generation_config
    unsupported = [type(p).__name__ for p in (logits_processor or []) if type(p).__name__ not in APPLIED_PROCESSORS]
    if unsupported:
        raise DataError(f"speculative decoding applies temperature, top-k and top-p only; this generation config also "
                        f"asks for {', '.join(unsupported)}. Drop those options, or generate without custom_generate.")
    if config.return_dict_in_generate or config.num_beams > 1:
        raise DataError("speculative decoding returns sequences only, one beam: drop return_dict_in_generate / "
                        "num_beams.")
    if synced_gpus:
        raise DataError("speculative decoding does not run across synced GPUs (DeepSpeed ZeRO-3 / FSDP).")
    prompt_length = input_ids.shape[1]
    max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt_length
    sampling = (Sampling(True, config.temperature or 1.0, config.top_k or 0, config.top_p or 1.0) if config.do_sample
                else Sampling())
    decoder = speculative_decoder or SpeculativeDecoder(model, draft_plan, draft_dtype=draft_dtype,
                                                        prompt_lookup=prompt_lookup)
    try:
        output = decoder.generate(input_ids, model_kwargs.get("attention_mask"), max_new_tokens=max_new,
                                  sampling=sampling, streamer=streamer, pad_token_id=config.pad_token_id,
                                  eos_token_id=config.eos_token_id if config.eos_token_id is not None else [])
    finally:
        if speculative_decoder is None:
            decoder.close()
    pad = config.pad_token_id if config.pad_token_id is not None else pad_id(model, torch.as_tensor(
        eos_ids(model, config.eos_token_id), dtype=torch.long))
    width = max(len(tokens) for tokens in output.tokens)
    new = torch.full((input_ids.shape[0], width), pad, dtype=input_ids.dtype, device=input_ids.device)
    for row, tokens in enumerate(output.tokens):
        new[row, :len(tokens)] = torch.as_tensor(tokens, dtype=input_ids.dtype)
    return torch.cat([input_ids, new], dim=1)


__all__ = ["custom_generate"]
