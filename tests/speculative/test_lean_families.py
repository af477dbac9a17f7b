"""The lean draft engine beyond Llama / Mistral / Qwen: Gemma (1, 2, 3), Phi-3, OLMo 2 and Granite, each held to its
modeling code in float32 (the same logits as the model under the same plan, cached and incremental, with left padding
and sliding windows), exact in the speculative loop, and the families it leaves out named with their reason."""

from __future__ import annotations

import pytest
import torch
import transformers

from skiplm.errors import PlanError
from skiplm.speculative import SpeculativeDecoder
from skiplm.speculative.lean import LEAN_FAMILIES, LeanDraft, lean_draft_unsupported, plain_logits
from skiplm.speculative.quantize import packed_head

from conftest import _COMMON, SLIDING_WINDOW, VOCAB, cached_tiny_model, plan_for
from test_draft_engine import PLANS, _reference
from test_speculative import left_padded, oracle

NEW_FAMILIES = ["gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "granite", "smollm3"]


def _extra_model(family: str, **overrides) -> transformers.PreTrainedModel:
    """A tiny seeded model of a family conftest does not build (gemma, granite), or of one with other settings."""
    common = dict(_COMMON, **overrides)
    if family == "gemma":
        config = transformers.GemmaConfig(**common, head_dim=8)
    elif family == "granite":
        # multipliers away from 1, so that each one matters in the logits
        config = transformers.GraniteConfig(**common, embedding_multiplier=3.0, residual_multiplier=0.5,
                                            attention_multiplier=0.3, logits_scaling=2.5)
    elif family == "smollm3":
        # layers 1 and 3 without rotary embeddings; the rotating ones with a sliding window
        config = transformers.SmolLM3Config(**common, no_rope_layers=[1, 0, 1, 0, 1], use_sliding_window=True,
                                            sliding_window=SLIDING_WINDOW,
                                            layer_types=["sliding_attention", "full_attention"] * 2
                                            + ["sliding_attention"])
    elif family == "phi3":
        config = transformers.Phi3Config(**common)
    elif family == "stablelm":
        config = transformers.StableLmConfig(**{k: v for k, v in common.items() if k != "tie_word_embeddings"})
    else:
        raise KeyError(family)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
    model.to(torch.float32).eval()
    model.generation_config.pad_token_id = config.pad_token_id
    return model


_EXTRA: dict[str, transformers.PreTrainedModel] = {}


def _model(family: str):
    if family in ("gemma", "granite", "smollm3"):
        if family not in _EXTRA:
            _EXTRA[family] = _extra_model(family)
        return _EXTRA[family]
    return cached_tiny_model(family)


@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_float32_lean_draft_gives_the_models_logits_in_the_new_families(family, plan_name):
    model = _model(family)
    assert lean_draft_unsupported(model) is None
    plan = plan_for(model, **PLANS[plan_name]) if PLANS[plan_name] is not None else None
    # 14 tokens: longer than the sliding window (8) of gemma2 / gemma3's local layers
    ids, mask = left_padded([14, 9, 12], seed=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = _reference(model, ids, mask, plan)
    lean = LeanDraft(model, "float32", plan)
    cache, pieces = None, []
    for start, end in ((0, 9), (9, 10), (10, 14)):  # prefill, one token, then several (as a draft catches up)
        logits, cache = lean(ids[:, start:end], mask[:, :end], positions[:, start:end], cache, end - start)
        pieces.append(logits)
    got = torch.cat(pieces, dim=1)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=2e-5, rtol=1e-4)
    cache.crop(-3)  # a rejected draft: the logits follow the tokens fed after it
    other = torch.randint(3, VOCAB, (3, 3), generator=torch.Generator().manual_seed(2))
    logits, cache = lean(other, mask[:, :14], positions[:, 11:14], cache, 3)
    replaced = torch.cat([ids[:, :11], other], dim=1)
    torch.testing.assert_close(logits, _reference(model, replaced, mask, plan)[:, 11:14], atol=2e-5, rtol=1e-4)


def test_the_family_pieces_the_tests_rely_on_are_there():
    """Guard: the tiny models exercise what makes each family different (else the test above proves little)."""
    gemma2, gemma3 = cached_tiny_model("gemma2").config, cached_tiny_model("gemma3_text").config
    assert gemma2.attn_logit_softcapping and gemma2.final_logit_softcapping  # both soft-cappings on
    assert gemma2.sliding_window == gemma3.sliding_window == SLIDING_WINDOW
    assert len(set(gemma3.layer_types)) == 2  # local and global layers, rotated with different bases
    granite = _model("granite").config
    assert (granite.embedding_multiplier, granite.residual_multiplier, granite.logits_scaling) != (1.0, 1.0, 1.0)
    assert hasattr(cached_tiny_model("phi3").model.layers[0].self_attn, "qkv_proj")
    assert cached_tiny_model("olmo2").model.layers[0].self_attn.q_norm.weight.shape[0] == 32  # over the projection
    smollm3 = _model("smollm3").model.layers
    assert [layer.self_attn.use_rope for layer in smollm3] == [1, 0, 1, 0, 1]
    assert smollm3[0].self_attn.sliding_window == SLIDING_WINDOW and smollm3[1].self_attn.sliding_window is None
    assert {t for f in LEAN_FAMILIES for t in f.model_types} >= set(NEW_FAMILIES)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "phi3", "olmo2", "granite", "smollm3"])
def test_speculative_output_with_a_lean_int8_draft_is_exact_in_the_new_families(family):
    model = _model(family)
    ids, mask = left_padded([8, 13, 5], seed=6)
    expected = oracle(model, ids, mask, 20)
    with SpeculativeDecoder(model, plan_for(model, blocks=[2]), draft_dtype="int8") as decoder:
        assert decoder.draft_engine == "lean"
        out = decoder.generate(ids, mask, max_new_tokens=20, fallback=False, eos_token_id=[])
    assert out.tokens == expected
    assert out.stats.accepted > 0


def test_the_verifier_packs_its_head_only_where_the_logits_are_the_heads_output():
    """Gemma 2 soft-caps its logits and Granite divides them: the verifier must run their own heads (a packed copy of
    the head alone would verify other logits)."""
    assert plain_logits(cached_tiny_model("llama")) and plain_logits(cached_tiny_model("olmo2"))
    for model in (cached_tiny_model("gemma2"), _model("granite")):
        assert not plain_logits(model) and packed_head(model) is None
    assert plain_logits(cached_tiny_model("gemma3_text"))  # (its config sets no final soft-capping)


def test_families_left_out_say_why_and_draft_through_their_modules():
    phi = _extra_model("phi3", partial_rotary_factor=0.5)  # Phi-4-mini-style: rotary over part of each head
    reason = lean_draft_unsupported(phi)
    assert reason is not None and "partial_rotary_factor" in reason
    ids, mask = left_padded([7, 10], seed=8)
    with SpeculativeDecoder(phi, draft_dtype="int8") as decoder:  # auto: the model's own modules
        assert decoder.draft_engine == "modules"
        assert decoder.generate(ids, mask, max_new_tokens=12, fallback=False, eos_token_id=[]).tokens == oracle(
            phi, ids, mask, 12)
    with pytest.raises(PlanError, match="partial_rotary_factor"):
        SpeculativeDecoder(phi, draft_dtype="int8", draft_engine="lean")
    stablelm = _extra_model("stablelm")
    reason = lean_draft_unsupported(stablelm)
    assert "stablelm" in reason and "LayerNorm" in reason
    for unfit in (phi, stablelm):
        with pytest.raises(ValueError, match="does not support"):
            LeanDraft(unfit, "int8")
