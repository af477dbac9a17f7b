"""The lean draft engine: held to the modeling code in float32 (same logits as the model under the same plan, cached
and incremental, with left padding and sliding windows), its cache, its precisions, and where it does not apply."""

from __future__ import annotations

import pytest
import torch

import skiplm
from skiplm.speculative.lean import LeanCache, LeanDraft
from skiplm.errors import DataError, PlanError
from skiplm.speculative.quantize import CastLinear, DynamicInt8Linear, draft_linear
from skiplm.speculative import SpeculativeDecoder

from conftest import VOCAB, cached_tiny_model, plan_for
from test_speculative import left_padded, oracle

LEAN_FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]  # mistral: a sliding window of 8, shorter than the sequences
PLANS = {"none": None, "blocks+mlp": dict(blocks=[1], mlp=[3]), "attention": dict(attention=[0, 4])}


def _reference(model, ids, mask, plan):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        if plan is None:
            return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        with skiplm.apply(model, plan):
            return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


@pytest.mark.parametrize("family", LEAN_FAMILIES)
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_float32_lean_draft_gives_the_models_logits_under_the_same_plan(family, plan_name):
    model = cached_tiny_model(family)
    plan = plan_for(model, **PLANS[plan_name]) if PLANS[plan_name] is not None else None
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
    # crop the cache back (a rejected draft) and feed different tokens: the logits follow the new tokens
    cache.crop(-3)
    other = torch.randint(3, VOCAB, (3, 3), generator=torch.Generator().manual_seed(2))
    logits, cache = lean(other, mask[:, :14], positions[:, 11:14], cache, 3)
    replaced = torch.cat([ids[:, :11], other], dim=1)
    torch.testing.assert_close(logits, _reference(model, replaced, mask, plan)[:, 11:14], atol=2e-5, rtol=1e-4)
    assert cache.length == 14


def test_lean_cache_grows_past_its_first_capacity_and_keeps_what_it_held():
    model = cached_tiny_model("llama")
    ids = torch.randint(3, VOCAB, (1, 262), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    positions = torch.arange(262)[None]
    lean = LeanDraft(model, "float32")
    _, cache = lean(ids[:, :250], mask[:, :250], positions[:, :250], None)
    capacity = cache.capacity(0)
    logits, cache = lean(ids[:, 250:], mask, positions[:, 250:], cache, 12)
    assert cache.capacity(0) > capacity >= 250 and cache.length == 262
    torch.testing.assert_close(logits, _reference(model, ids, mask, None)[:, 250:], atol=2e-5, rtol=1e-4)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_key_value_heads * head_dim * 4  # keys and values, float32
    assert cache.nbytes() == sum(cache.capacity(layer) * per_token for layer in range(config.num_hidden_layers))


@pytest.mark.parametrize("precision", ["bfloat16", "int8", "int8-dynamic"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_speculative_output_with_a_lean_draft_is_exact(family, precision):
    model = cached_tiny_model(family)
    ids, mask = left_padded([8, 13, 5], seed=6)
    expected = oracle(model, ids, mask, 24)
    with SpeculativeDecoder(model, plan_for(model, blocks=[2]), draft_dtype=precision) as decoder:
        assert decoder.draft_engine == "lean"
        for batch in (1, 3):
            out = decoder.generate(ids[:batch], mask[:batch], max_new_tokens=24, fallback=False, eos_token_id=[])
            assert out.tokens == expected[:batch]
            assert out.stats.rounds > 0 and out.stats.draft_cache_bytes > 0
        decoder.set_plan(plan_for(model, attention=[1]))  # a new plan from the next generation on
        assert decoder.plan.decode.attention == {1}
        assert decoder.generate(ids, mask, max_new_tokens=24, fallback=False, eos_token_id=[]).tokens == expected
    assert getattr(model, "_skiplm_handle", None) is None


def test_the_lean_draft_is_close_to_the_model_in_low_precision():
    model = cached_tiny_model("llama")
    ids, mask = left_padded([16], seed=7)
    positions = torch.arange(16)[None]
    expected = _reference(model, ids, mask, None)
    for precision, tolerance in (("bfloat16", 0.05), ("int8", 0.1), ("int8-dynamic", 0.15)):
        logits, _ = LeanDraft(model, precision)(ids, mask, positions, None, 16)
        error = (logits - expected).norm() / expected.norm()
        assert error < tolerance, (precision, float(error))


# (the families the lean draft leaves out, and why: tests/speculative/test_lean_families.py)


def test_draft_engine_choices_are_checked():
    model = cached_tiny_model("llama")
    with pytest.raises(DataError, match="unknown draft engine 'fast'"):
        SpeculativeDecoder(model, draft_dtype="int8", draft_engine="fast")
    with pytest.raises(PlanError, match="give a draft precision"):
        SpeculativeDecoder(model, plan_for(model, blocks=[1]), draft_engine="lean")
    with SpeculativeDecoder(model, plan_for(model, blocks=[1]), draft_dtype="int8", draft_engine="modules") as decoder:
        assert decoder.draft_engine == "modules" and decoder.draft_handle is not None
    with pytest.raises(PlanError, match="covers 4 layers"):
        SpeculativeDecoder(model, skiplm.SkipPlan.from_layers(4, blocks=[1]), draft_dtype="int8", check_model=False)


def test_draft_products_in_each_precision():
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 64), torch.randn(48)
    x = torch.randn(2, 3, 64)
    exact = x @ weight.T + bias
    dynamic = draft_linear(weight, bias, "int8-dynamic")
    assert isinstance(dynamic, DynamicInt8Linear) and dynamic(x).dtype == torch.float32
    assert ((dynamic(x) - exact).norm() / exact.norm()) < 0.03  # int8 weights and int8 inputs
    packed = draft_linear(weight, bias, "bfloat16")
    plain = CastLinear(weight, bias, torch.bfloat16, packed=False)
    assert isinstance(packed, CastLinear) and packed(x.bfloat16()).shape == (2, 3, 48)
    torch.testing.assert_close(packed(x.bfloat16()).float(), plain(x.bfloat16()).float(), atol=0.1, rtol=0.02)
    assert torch.equal(draft_linear(weight, bias, "float32")(x), torch.nn.functional.linear(x, weight, bias))
    for product in (dynamic, packed, draft_linear(weight, bias, "int8")):  # the lean engine's direct 2-D path
        flat = x.reshape(6, 64).to(torch.float32 if product is dynamic else torch.bfloat16)
        torch.testing.assert_close(product.product(flat), product(flat), atol=0, rtol=0)
    assert LeanCache().nbytes() == 0


def test_int8_dynamic_drafts_are_refused_where_their_kernels_do_not_run(tiny_folder, monkeypatch):
    from conftest import run_cli

    from skiplm.speculative import quantize as quantize

    assert quantize.precision_unavailable("int8-dynamic", torch.device("cpu")) is None
    assert quantize.precision_unavailable("int8", torch.device("meta")) is None
    assert "CPU quantized kernels" in quantize.precision_unavailable("int8-dynamic", torch.device("meta"))
    monkeypatch.setattr(quantize, "_dynamic_int8_works", lambda device: False)  # as on a GPU
    with pytest.raises(skiplm.errors.ModelLoadError, match="use --draft-dtype int8"):
        draft_linear(torch.ones(4, 8), None, "int8-dynamic")
    result = run_cli("draft-search", tiny_folder, "--precisions", "int8-dynamic", "-o", "unused.json")
    assert "none of --precisions can draft on this device" in str(result.exception)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_the_lean_draft_adopts_the_full_models_keys_and_values(family):
    model = cached_tiny_model(family)
    ids, mask = left_padded([12, 7], seed=9)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        full = model(input_ids=ids[:, :11], attention_mask=mask[:, :11], position_ids=positions[:, :11],
                     use_cache=True).cache
    lean = LeanDraft(model, "float32")
    _, computed = lean(ids[:, :4], mask[:, :4], positions[:, :4], None)
    adopted = lean.adopt(full, 4, 11, computed)
    if family == "mistral":  # its sliding-window layers kept only their window: nothing is taken
        assert adopted is None and computed.length == 4
        return
    assert adopted is computed and adopted.length == 11
    # in float32 the lean draft computes what the model computes: over the adopted keys, the next token's logits
    # are the full model's
    logits, _ = lean(ids[:, 11:], mask, positions[:, 11:], adopted, 1)
    torch.testing.assert_close(logits, _reference(model, ids, mask, None)[:, 11:], atol=2e-5, rtol=1e-4)
    skipping = LeanDraft(model, "int8", plan_for(model, attention=[1], mlp=[2]))
    taken = skipping.adopt(full, 0, 11, None)  # a fresh cache adopts the whole prefix
    assert taken.length == 11 and 1 not in taken.buffers and 0 in taken.buffers  # skipped attention: no keys needed
    assert taken.buffers[0].dtype == torch.bfloat16
    assert lean.adopt(full, 3, 11, LeanCache()) is None  # the cache must hold exactly the tokens before `start`


def test_the_verifier_head_is_packed_for_lean_families_only_and_stays_exact():
    ids, mask = left_padded([9, 6], seed=10)
    for family, packed in (("llama", True), ("gemma2", False)):
        model = cached_tiny_model(family)
        expected = oracle(model, ids, mask, 20)
        head_bytes = model.get_output_embeddings().weight.numel() * 4
        for pack_head in (True, False):
            with SpeculativeDecoder(model, plan_for(model, blocks=[2]), pack_head=pack_head) as decoder:
                out = decoder.generate(ids, mask, max_new_tokens=20, fallback=False, eos_token_id=[])
            assert out.tokens == expected
            assert out.stats.verify_weight_bytes == (head_bytes if packed and pack_head else 0)


@pytest.mark.parametrize("precision", ["int8", "int8-dynamic"])
def test_int8_drafts_through_the_models_own_modules_are_exact(precision):
    from skiplm.speculative.quantize import Int8Linear

    model = cached_tiny_model("gemma2")  # a copy of its modules drafts
    ids, mask = left_padded([8, 5], seed=11)
    with SpeculativeDecoder(model, plan_for(model, blocks=[2]), draft_dtype=precision,
                            draft_engine="modules") as decoder:
        assert decoder.draft_engine == "modules"
        kind = Int8Linear if precision == "int8" else DynamicInt8Linear
        assert all(isinstance(m, kind) for m in [decoder.draft_model.lm_head,
                                                 decoder.draft_model.model.layers[0].mlp.down_proj])
        out = decoder.generate(ids, mask, max_new_tokens=16, fallback=False, eos_token_id=[])
    assert out.tokens == oracle(model, ids, mask, 16)


@pytest.mark.parametrize("precision", ["float32", "int8", "int8-dynamic"])
def test_the_compiled_layer_loop_computes_what_the_eager_one_does(precision):
    from skiplm.speculative.lean import _Stack

    model = cached_tiny_model("qwen3")  # query / key norms too
    ids, mask = left_padded([9, 6], seed=12)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    lean = LeanDraft(model, precision)
    assert isinstance(lean.stack, torch.jit.ScriptModule)  # compiled here; where TorchScript fails it runs eagerly
    compiled, _ = lean(ids, mask, positions, None, ids.shape[1])
    lean.stack = _Stack(lean.layers)
    eager, _ = lean(ids, mask, positions, None, ids.shape[1])
    assert torch.equal(compiled, eager)


def test_draft_kinds_are_registered_and_the_engine_is_chosen_through_the_registry():
    from skiplm.registry import DRAFTS
    from skiplm.speculative.drafts import ModulesDraft, draft_engines

    assert {"modules", "lean", "lookup"} <= set(DRAFTS.names())
    assert DRAFTS.get("lean").needs == {"precision"} and "llama" in DRAFTS.get("lean").extra["families"]
    assert set(draft_engines()) == {"auto", "modules", "lean"}
    model = cached_tiny_model("llama")
    ids, mask = left_padded([7, 10], seed=13)
    built = []

    class Counting(ModulesDraft):
        engine = "counting"

        @classmethod
        def build(cls, model, precision, length):
            built.append(precision)
            return super().build(model, precision, length)

    always = {"engine": True, "priority": -1, "unsupported": lambda model, precision: None}
    with DRAFTS.temporarily("counting", Counting, extra=always):
        assert "counting" in draft_engines()
        with SpeculativeDecoder(model, plan_for(model, blocks=[1]), draft_engine="counting") as decoder:
            assert decoder.draft_engine == "counting" and built == [None]
            out = decoder.generate(ids, mask, max_new_tokens=12, fallback=False, eos_token_id=[])
        assert out.tokens == oracle(model, ids, mask, 12) and out.stats.draft_engine == "counting"
        with SpeculativeDecoder(model, draft_dtype="int8") as decoder:  # auto: still the highest priority, lean
            assert decoder.draft_engine == "lean"
    assert "counting" not in draft_engines() and getattr(model, "_skiplm_handle", None) is None
