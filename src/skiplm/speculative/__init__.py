"""Lossless self-speculative decoding: a skipped and/or low-precision view of the model drafts, the full model verifies.

``skiplm.speculative.generate`` (one call), :class:`SpeculativeDecoder` (kept across calls), ``custom_generate`` (inside
transformers' own ``generate()``); the lean draft engine, draft quantization, draft search and the benchmark live in
this package's modules.
"""

from .decoder import (DEFAULT_MAX_DRAFT, AdaptiveDraftLength, DraftSelector, PromptLookup, RoundInfo, Sampling,
                      SpeculativeDecoder, SpeculativeOutput, SpeculativeStats, SpeedMonitor, custom_generate,
                      draft_alternatives, draft_precision, generate, plain_generate)

__all__ = ["DEFAULT_MAX_DRAFT", "AdaptiveDraftLength", "DraftSelector", "PromptLookup", "RoundInfo", "Sampling",
           "SpeculativeDecoder", "SpeculativeOutput", "SpeculativeStats", "SpeedMonitor", "custom_generate",
           "draft_alternatives", "draft_precision", "generate", "plain_generate"]
