"""Lossless self-speculative decoding: a skipped and/or low-precision view of the model drafts, the full model verifies.

``skiplm.speculative.generate`` (one call), :class:`SpeculativeDecoder` (kept across calls), ``custom_generate`` (inside
transformers' own ``generate()``). The pipeline, module by module: ``state`` (the committed tokens of a batch),
``sampling`` (the sampling settings and the acceptance rules), ``drafts`` (the draft interface and the draft kinds,
registered in :data:`skiplm.registry.DRAFTS`; ``lean`` and ``quantize``: the lean engine and the low-precision
weights), ``controllers`` (draft length, fallback, on-the-fly skip-set choice), ``round`` (one speculative round and
the verifier), ``decoder`` (the generation loop), ``hf`` (the transformers integration), ``vocab`` (reduced-vocabulary
draft heads); ``bench`` and ``search``
measure drafts against plain decoding.
"""

from .controllers import AdaptiveDraftLength, DraftSelector, SpeedMonitor
from .decoder import DEFAULT_MAX_DRAFT, SpeculativeDecoder, generate, plain_generate
from .drafts import Drafter, PromptLookup, draft_alternatives, draft_precision
from .hf import custom_generate
from .sampling import Sampler, Sampling
from .stats import RoundInfo, SpeculativeOutput, SpeculativeStats
from .vocab import DraftVocab, draft_vocabulary
from . import trained  # noqa: F401, E402 (registers the "lora" trained-draft kind)

__all__ = ["DEFAULT_MAX_DRAFT", "AdaptiveDraftLength", "DraftSelector", "Drafter", "PromptLookup", "RoundInfo",
           "Sampler", "Sampling", "SpeculativeDecoder", "SpeculativeOutput", "SpeculativeStats", "SpeedMonitor",
           "custom_generate", "draft_alternatives", "draft_precision", "generate", "plain_generate", "DraftVocab",
           "draft_vocabulary"]
