"""Plain greedy generation of left-padded batches: argmax of the logits and nothing else (no sampling, penalties or
other logits processing a checkpoint's generation_config might ask for), with the KV cache.

The model runs as it is: apply a plan or policy around these calls to generate under it. Generation agreement
(:mod:`skiplm.measure.agreement`) compares such continuations; the speculative decoder's verification reuses
:func:`greedy_decode` and :func:`left_pad`. A row's continuation ends at its first end-of-sequence token, which is kept.

Context. :func:`check_context` is the one rule every generation path applies before it runs: the prompt plus the new
tokens asked for must fit the model's context (:func:`context_length`), else a :class:`~skiplm.errors.DataError`
saying both lengths, or, only when asked (``truncate=True``, the CLI's ``--truncate-prompt``), the prompt's last tokens
that fit. :func:`fit_context` applies it to a batch of tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ..errors import DataError

log = logging.getLogger(__name__)

# Config attributes that hold the most positions a model was built for, in the order they are looked for.
CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
TRUNCATE_FLAG = "--truncate-prompt"


def context_length(model: nn.Module) -> int | None:
    """The most positions ``model`` was built for: its (text) config's ``max_position_embeddings`` (or ``n_positions``,
    ...); None when its config names none (then nothing is checked)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    configs = [config.get_text_config(decoder=True)] if hasattr(config, "get_text_config") else []
    for candidate in [*configs, config]:
        for attribute in CONTEXT_ATTRIBUTES:
            value = getattr(candidate, attribute, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def check_context(model: nn.Module, prompt_tokens: int, max_new_tokens: int, *, truncate: bool = False,
                  what: str = "the prompt") -> int:
    """How many prompt tokens to run: ``prompt_tokens`` (the longest row's) when they and ``max_new_tokens`` fit the
    model's context; with ``truncate``, the number of last prompt tokens that do (the caller keeps ``ids[..., -n:]``);
    otherwise a :class:`~skiplm.errors.DataError` that says both lengths. A model without a known context is not
    checked. ``what`` names the prompt in the message (e.g. "the longest prompt")."""
    context = context_length(model)
    if context is None or prompt_tokens + max_new_tokens <= context:
        return prompt_tokens
    room = context - max_new_tokens
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or "the model"
    if room < 1:
        raise DataError(f"{max_new_tokens:,} new tokens are asked for, but {name}'s context is {context:,} tokens "
                        f"(config.max_position_embeddings), which must also hold the prompt: ask for at most "
                        f"{context - 1:,} new tokens (--max-new-tokens).")
    if not truncate:
        raise DataError(
            f"{what} is {prompt_tokens:,} tokens and {max_new_tokens:,} new tokens are asked for "
            f"({prompt_tokens + max_new_tokens:,} in all), but {name}'s context is {context:,} tokens "
            f"(config.max_position_embeddings): shorten {what} to at most {room:,} tokens, ask for fewer new "
            f"tokens (--max-new-tokens), or keep only the last {room:,} tokens of each prompt ({TRUNCATE_FLAG}; "
            "truncate=True in Python).")
    log.warning("%s (%d tokens) and %d new tokens do not fit %s's context of %d tokens: keeping only the last %d "
                "tokens of each prompt.", what[:1].upper() + what[1:], prompt_tokens, max_new_tokens, name, context,
                room)
    return room


def fit_context(model: nn.Module, inputs: Mapping[str, torch.Tensor], max_new_tokens: int, *,
                truncate: bool = False) -> dict[str, torch.Tensor]:
    """``inputs`` (``input_ids`` [batch, tokens], left padded, and tensors of the same width such as its
    ``attention_mask``) checked by :func:`check_context`; with ``truncate``, cut to their last columns that fit."""
    ids = inputs["input_ids"]
    width = ids.shape[-1]
    keep = check_context(model, width, max_new_tokens, truncate=truncate)
    if keep == width:
        return dict(inputs)
    return {key: value[..., -keep:] if torch.is_tensor(value) and value.dim() == ids.dim() and value.shape[-1] == width
            else value for key, value in inputs.items()}


def eos_token_ids(model: nn.Module, tokenizer=None) -> list[int]:
    """The ids that end a generation: the model's generation config's, else the tokenizer's end-of-sequence token."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None and tokenizer is not None:
        configured = tokenizer.eos_token_id
    if configured is None:
        raise DataError("the model has no end-of-sequence token id (generation_config.eos_token_id); set one.")
    return [int(i) for i in (configured if isinstance(configured, (list, tuple)) else [configured])]


def truncate_at_eos(tokens: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """``tokens`` up to and including the first end-of-sequence token."""
    out = []
    for token in tokens:
        out.append(int(token))
        if token in eos_ids:
            break
    return out


@torch.inference_mode()
def greedy_continuations(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    new_tokens: int,
    eos_ids: Sequence[int],
    pad_token_id: int,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Greedy continuations of token-id prompts (the model as it is: apply a plan around this call), each at most
    ``new_tokens`` long and ending at its first end-of-sequence token. Prompts are batched in the order given, left
    padded with ``pad_token_id``; ``progress(rows)`` is called after each batch."""
    if new_tokens < 1:
        raise DataError(f"new_tokens must be at least 1, got {new_tokens}.")
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}.")
    if any(len(p) == 0 for p in prompts):
        raise DataError("a prompt has no tokens.")
    if prompts:
        check_context(model, max(len(p) for p in prompts), new_tokens,
                      what="the prompt" if len(prompts) == 1 else "the longest prompt")
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        outputs.extend(_greedy_batch(model, batch, new_tokens, eos_ids, pad_token_id))
        if progress:
            progress(len(batch))
    return outputs


def _greedy_batch(model: nn.Module, batch: Sequence[Sequence[int]], new_tokens: int, eos_ids: Sequence[int],
                  pad_token_id: int) -> list[list[int]]:
    """Plain greedy decoding of one left-padded batch: argmax of the logits, nothing else (no sampling, penalties or
    other logits processing a checkpoint's generation_config might ask for), with the KV cache."""
    device = next(model.parameters()).device
    ids, mask = left_pad(batch, pad_token_id)
    return greedy_decode(model, ids.to(device), mask.to(device), new_tokens, eos_ids, pad_token_id)


def left_pad(batch: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as one left-padded [rows, width] batch and its attention mask (1 = token): every row's last
    prompt token is at position -1."""
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, prompt in enumerate(batch):
        ids[row, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


@torch.inference_mode()
def greedy_decode(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, eos_ids: Sequence[int],
                  pad_token_id: int) -> list[list[int]]:
    """Plain greedy decoding of left-padded ``ids`` [batch, width] with ``mask`` (1 = token), on the model's device:
    argmax of the logits, nothing else, with the KV cache; each row ends at its first end-of-sequence token (kept)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [batch, width]: a row's first real token is at position 0
    eos = torch.as_tensor(list(eos_ids), dtype=torch.long, device=ids.device)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    # logits_to_keep=1: only the last position's logits are needed ([batch, 1, vocab], not [batch, width, vocab])
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    steps = []
    for step in range(new_tokens):
        token = out.logits[:, -1].argmax(-1)  # [batch]
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        steps.append(token)
        finished |= torch.isin(token, eos)
        if step == new_tokens - 1 or bool(finished.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # [batch, width + step + 1]
        positions = positions[:, -1:] + 1  # [batch, 1]
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, cache=out.cache,
                    use_cache=True)
    generated = torch.stack(steps, dim=1).tolist()  # [batch, <= new_tokens]; rows that finished early are padded
    return [truncate_at_eos(row, eos_ids) for row in generated]
