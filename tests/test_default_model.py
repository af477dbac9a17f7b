"""The oracle checks on the real shipped model (SmolLM2-135M-Instruct, 30 layers, fp32)."""

import copy
import dataclasses

import pytest
import torch

import skiplm
from skiplm.errors import ModelLoadError, PlanMismatchError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    model, tokenizer = skiplm.load_model("smollm2-135m")
    return model, tokenizer


def chat_inputs(tokenizer, questions):
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def test_default_model_is_what_we_ship(smol):
    model, tokenizer = smol
    assert skiplm.get_adapter(model).model_types[0] == "llama"
    assert model.config.num_hidden_layers == 30
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.padding_side == "left"


def test_empty_plan_is_exactly_vanilla(smol):
    model, tokenizer = smol
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.inference_mode():
        vanilla = model(ids).logits
        with skiplm.apply(model, skiplm.SkipPlan.empty(30).for_model(model)):
            planned = model(ids).logits
    assert torch.equal(vanilla, planned)


@pytest.mark.parametrize("kind", ["uniform", "sublayers", "layer0-attention"])
def test_cached_decoding_equals_recomputation(smol, kind):
    model, tokenizer = smol
    if kind == "uniform":
        plan = skiplm.plan_uniform(model, speedup=1.25)
    elif kind == "sublayers":
        plan = skiplm.SkipPlan.from_layers(30, attention=[5, 11, 17], mlp=[8, 20]).for_model(model)
    else:
        plan = skiplm.SkipPlan.from_layers(30, attention=[0], blocks=[14]).for_model(model)
    ids = tokenizer("Natalia sold clips to 48 of her friends in April, and then she sold half as many",
                    return_tensors="pt").input_ids
    prefix = 6
    with torch.inference_mode(), skiplm.apply(model, plan):
        recomputed = model(ids).logits
        out = model(ids[:, :prefix], use_cache=True)
        steps = [out.logits]
        for t in range(prefix, ids.shape[1]):
            out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
        incremental = torch.cat(steps, dim=1)
    with torch.inference_mode():
        vanilla = model(ids).logits
    # fp32 reordering noise: the unplanned model's own cached-vs-recomputed gap here is ~1e-4 on logits of size ~20,
    # so the real model gets 5e-4 (tiny models in test_runtime.py are held to 1e-4) and identical argmax.
    assert (incremental - recomputed).abs().max().item() < 5e-4
    assert torch.equal(incremental.argmax(-1), recomputed.argmax(-1))
    assert (recomputed - vanilla).abs().max().item() > 1e-2  # the plan really changes the model


def test_batched_generation_with_padding_equals_rows_alone(smol):
    model, tokenizer = smol
    plan = skiplm.plan_uniform(model, speedup=1.25)
    questions = ["What is 7 times 8?", "Name a prime number larger than 20 and explain why it is prime."]
    with torch.inference_mode(), skiplm.apply(model, plan):
        batch = chat_inputs(tokenizer, questions)
        together = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new_together = together[:, batch.input_ids.shape[1] :]
        for row, question in enumerate(questions):
            alone_inputs = chat_inputs(tokenizer, [question])
            alone = model.generate(**alone_inputs, max_new_tokens=12, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
            assert torch.equal(alone[0, alone_inputs.input_ids.shape[1] :], new_together[row])


def test_plan_for_other_weights_is_refused(smol):
    model, _ = smol
    plan = skiplm.plan_uniform(model, skip=4)
    other = type(model)(model.config)  # same shapes, fresh random weights
    with pytest.raises(PlanMismatchError, match="different weights"):
        skiplm.apply(other, plan)
    bf16 = skiplm.plan_uniform(model, skip=4)
    bf16.check_model(copy.deepcopy(model).to(torch.bfloat16))  # same weights in another dtype: accepted
    assert dataclasses.replace(plan, provenance={}) == dataclasses.replace(bf16, provenance={})


def test_load_model_errors_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a model folder"):
        skiplm.load_model(str(tmp_path / "missing" / "model"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        skiplm.load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="does not exist"):
        skiplm.load_model(str(tmp_path / "absent.gguf"))
    with pytest.raises(ModelLoadError, match="could not load model"):
        skiplm.load_model("no-such-org/no-such-model")  # HF_HUB_OFFLINE=1 in tests


def test_exported_default_model_reloads_with_vanilla_transformers(smol, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = smol
    plan = skiplm.plan_uniform(model, speedup=1.25)
    skiplm.export_pruned(model, plan, tmp_path, tokenizer=tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 30 - len(plan.decode.blocks)
    ids = tokenizer("Weng earns $12 an hour for babysitting.", return_tensors="pt").input_ids
    with torch.inference_mode():
        with skiplm.apply(model, plan):
            planned = model(ids).logits
        assert (reloaded(ids).logits - planned).abs().max().item() < 1e-4


@pytest.mark.parametrize("method", ["ffn-skip", "lac"])
def test_policy_that_never_skips_is_exactly_vanilla(smol, method):
    from skiplm.policies import make_policy

    model, tokenizer = smol
    inputs = chat_inputs(tokenizer, ["What is 7 times 8?", "Name a color."])
    never = make_policy(method, 30, 1.5 if method == "ffn-skip" else 0.0)
    with torch.inference_mode():
        vanilla = model(**inputs).logits
        expected = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        with skiplm.apply(model, never, check_model=False) as handle:
            assert torch.equal(model(**inputs).logits, vanilla)
            assert torch.equal(model.generate(**inputs, max_new_tokens=12, do_sample=False), expected)
    assert handle.stats.mlp_skip_ratio("decode") == 0.0


@pytest.mark.parametrize("method,threshold", [("ffn-skip", 0.97), ("lac", 0.03)])
def test_policy_cached_decoding_equals_recomputation(smol, method, threshold):
    """Per-token skipping with the KV cache (lac: attention contributions dropped too, keys and values written) equals
    one uncached forward over the whole sequence that makes the same decisions."""
    from conftest import greedy_with_cache, replay
    from skiplm.policies import apply_policy, make_policy

    model, tokenizer = smol
    ids = chat_inputs(tokenizer, ["Natalia sold clips to 48 of her friends in April. How many in May?"]).input_ids
    policy = make_policy(method, 30, threshold)
    with torch.inference_mode():
        with apply_policy(model, policy, check_model=False, record=True) as handle:
            sequence, cached = greedy_with_cache(model, ids, 10)
        assert handle.stats.mlp_skip_ratio("decode") > 0.05
        with apply_policy(model, replay(policy, handle.maps, 30), check_model=False):
            recomputed = model(sequence).logits[0, ids.shape[1] - 1:]
    torch.testing.assert_close(cached, recomputed, atol=5e-4, rtol=1e-4)
    assert torch.equal(cached.argmax(-1), recomputed.argmax(-1))


@pytest.mark.parametrize("draft", ["skip-blocks", "int8", "int8-adapt", "int8-lookup", "int8-modules"])
def test_speculative_greedy_equals_plain_greedy_on_the_default_model(smol, draft):
    from skiplm.measure.agreement import Prompt, encode_prompts, left_pad
    from skiplm.speculative.decoder import SpeculativeDecoder

    model, tokenizer = smol
    questions = ["What is 7 times 8?", "Name three colours.", "A train goes 60 km in 1.5 hours. What is its speed?"]
    rows = encode_prompts(tokenizer, [Prompt(q) for q in questions], chat=True)
    eos = tokenizer.eos_token_id
    expected = []  # transformers' own greedy decoding, each row alone: the oracle
    with torch.inference_mode():
        for row in rows:
            out = model.generate(torch.tensor([row]), max_new_tokens=32, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, len(row):].tolist()
            expected.append(out[: out.index(eos) + 1] if eos in out else out)
    plan = skiplm.SkipPlan.from_layers(30, blocks=[3, 25]).for_model(model)
    from skiplm.speculative import PromptLookup

    options = {"skip-blocks": dict(plan=plan), "int8": dict(draft_dtype="int8"),
               "int8-modules": dict(draft_dtype="int8", draft_engine="modules"),
               # 1-gram lookup used at every match: many lookup drafts, most of them wrong
               "int8-lookup": dict(draft_dtype="int8", prompt_lookup=PromptLookup(ngram=1, min_kept=0.0)),
               "int8-adapt": dict(plan=plan, draft_dtype="int8",
                                  alternatives=[skiplm.SkipPlan.from_layers(30), skiplm.SkipPlan.from_layers(30, blocks=[25])])}
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    with SpeculativeDecoder(model, **options[draft]) as decoder:
        if decoder.selector is not None:
            decoder.selector.explore_every = 2  # switch often: every switch refills the draft's cache
        for batch in (1, 3):  # batch 3: left padding, rows that accept different numbers of drafts
            out = decoder.generate(ids[:batch], mask[:batch], max_new_tokens=32, fallback=False, eos_token_id=eos,
                                   pad_token_id=tokenizer.pad_token_id, max_draft=4)
            assert out.tokens == expected[:batch]
            assert out.stats.rounds > 0 and out.stats.accepted > 0
    assert getattr(model, "_skiplm_handle", None) is None


def test_lean_draft_computes_what_the_model_computes(smol):
    """The lean draft engine, in float32, against the model's own modules; in int8, its agreement with them."""
    from skiplm.models.data import load_corpus
    from skiplm.speculative.lean import LeanDraft
    from skiplm.measure.perplexity import tokenize_corpus

    model, tokenizer = smol
    ids = tokenize_corpus(tokenizer, load_corpus("gsm8k"), 256)[None]
    mask, positions = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
    lean, _ = LeanDraft(model, "float32")(ids, mask, positions, None, ids.shape[1])
    torch.testing.assert_close(lean, expected, atol=2e-3, rtol=1e-3)
    assert torch.equal(lean.argmax(-1), expected.argmax(-1))
    int8, _ = LeanDraft(model, "int8")(ids, mask, positions, None, ids.shape[1])
    assert (int8.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9  # measured 0.958 on 1,024 tokens
    # int8-dynamic quantizes each input with one scale, so it drafts one token at a time, after taking the prompt's
    # keys and values from the full model (as in the speculative loop); measured 0.961 over 256 such steps
    dynamic, start = LeanDraft(model, "int8-dynamic"), 192
    with torch.inference_mode():
        cache = dynamic.adopt(model(input_ids=ids[:, :start], use_cache=True).cache, 0, start, None)
    agree = []
    for index in range(start, ids.shape[1]):
        logits, cache = dynamic(ids[:, index:index + 1], mask[:, :index + 1], positions[:, index:index + 1], cache)
        agree.append(bool(logits[0, -1].argmax() == expected[0, index].argmax()))
    assert sum(agree) / len(agree) > 0.85


def test_transformers_generate_with_skiplm_custom_generate_is_exact(smol):
    from skiplm.speculative import custom_generate

    model, tokenizer = smol
    inputs = chat_inputs(tokenizer, ["What is 7 times 8?", "Name three colours."])
    options = dict(max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        vanilla = model.generate(**inputs, **options)
        speculative = model.generate(**inputs, **options, custom_generate=custom_generate, draft_dtype="int8",
                                     prompt_lookup=3)
    assert torch.equal(speculative, vanilla)
