"""A reduced-vocabulary draft head: the lean draft's logits over a subset of tokens (the model's there, -inf elsewhere),
greedy output still plain greedy's, sampling still the full model's distribution (rejection sampling with q zero off
the subset), the token set counted on corpora and cached, and the draft cache serving every vocabulary."""

from __future__ import annotations

import pytest
import torch

from skiplm.errors import DataError, PlanError
from skiplm.speculative import SpeculativeDecoder
from skiplm.speculative.cache import DraftCache
from skiplm.speculative.decoder import generate
from skiplm.speculative.lean import LeanDraft
from skiplm.speculative.sampling import Sampling
from skiplm.speculative.vocab import DraftVocab, draft_vocabulary, plan_draft_vocab, resolve_draft_vocab, token_counts

from conftest import VOCAB, cached_tiny_model, plan_for, run_cli
from test_speculative import _chi2_ok, _exact_joint, _tv, left_padded, oracle

HALF = torch.arange(0, VOCAB, 2)  # every other token id: the draft cannot propose the odd ones


def _full_logits(model, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: soft-capped logits, then restricted
def test_a_reduced_head_gives_the_models_logits_on_its_tokens_and_minus_infinity_elsewhere(family):
    model = cached_tiny_model(family)
    ids, mask = left_padded([9, 6], seed=3)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = _full_logits(model, ids, mask)
    lean = LeanDraft(model, "float32", vocab=HALF.flip(0))  # any order: kept sorted
    logits, _ = lean(ids, mask, positions, None, ids.shape[1])
    assert logits.shape == expected.shape
    real = mask.bool()
    torch.testing.assert_close(logits[real][:, HALF], expected[real][:, HALF], atol=2e-5, rtol=1e-4)
    assert torch.isneginf(logits[:, :, 1::2]).all()
    assert lean.head.out_features == HALF.numel()
    assert LeanDraft(model, "float32", vocab=torch.arange(VOCAB)).vocab is None  # the whole vocabulary: no subset


@pytest.mark.parametrize("precision", ["int8", "int8-dynamic"])
def test_the_reduced_head_is_the_rows_of_the_whole_heads_stored_form(precision):
    """Each row is quantized on its own, so a subset of the stored head is the stored form of the subset: the draft
    cache's one entry (the whole head) serves every vocabulary."""
    model = cached_tiny_model("qwen2")
    ids, mask = left_padded([7], seed=4)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    whole, _ = LeanDraft(model, precision)(ids, mask, positions, None, 7)
    reduced, _ = LeanDraft(model, precision, vocab=HALF)(ids, mask, positions, None, 7)
    torch.testing.assert_close(reduced[:, :, HALF], whole[:, :, HALF], atol=1e-5, rtol=1e-5)


def test_greedy_output_with_a_reduced_draft_vocabulary_is_plain_greedy():
    model = cached_tiny_model("llama")
    ids, mask = left_padded([8, 13, 5], seed=6)
    expected = oracle(model, ids, mask, 24)
    outputs = {}
    for name, vocab in (("whole", None), ("half", HALF), ("tiny", torch.arange(8))):
        with SpeculativeDecoder(model, draft_dtype="int8", draft_vocab=vocab) as decoder:
            assert decoder.draft_engine == "lean"
            outputs[name] = decoder.generate(ids, mask, max_new_tokens=24, fallback=False, eos_token_id=[])
        assert outputs[name].tokens == expected, name
    rates = {name: out.stats.acceptance_rate for name, out in outputs.items()}
    # the model emits odd tokens too: a draft that cannot propose them is accepted less often, but never wrong
    assert any(t % 2 for row in expected for t in row)
    assert rates["tiny"] < rates["half"] < rates["whole"], rates


def test_sampled_tokens_with_a_reduced_draft_vocabulary_follow_the_full_model():
    """4,000 rows in one batch, top-4 sampling: token 2 comes from rejection sampling against a draft whose q is zero
    on the odd tokens. The sampled pairs follow the full model's distribution (chi-square, total variation); the
    odd tokens, which the draft never proposes, are still produced (by the correction draw, whose residual is p
    there)."""
    model = cached_tiny_model("llama")
    prompt = [5, 17, 33, 9, 60, 42]
    sampling = Sampling(True, temperature=0.8, top_k=4, top_p=0.95)
    rows = 4000
    out = generate(model, None, torch.tensor([prompt] * rows), draft_dtype="float32", draft_vocab=HALF,
                   max_new_tokens=3, do_sample=True, temperature=0.8, top_k=4, top_p=0.95, max_draft=1, seed=321,
                   fallback=False, eos_token_id=[], draft_cache=False)
    assert out.stats.rounds >= 1 and out.stats.drafted >= rows
    counts = {}
    for tokens in out.tokens:
        counts[tuple(tokens[:2])] = counts.get(tuple(tokens[:2]), 0) + 1
    with torch.no_grad():
        exact = _exact_joint(model, prompt, 2, sampling)
    stat, critical = _chi2_ok(counts, rows, exact)
    tv = _tv(counts, rows, exact)
    assert stat < critical and tv < 0.05, (stat, critical, tv)
    odd_mass = sum(p for key, p in exact.items() if key[1] % 2)
    assert odd_mass > 0.1, odd_mass  # the restriction matters for this prompt
    assert sum(c for key, c in counts.items() if key[1] % 2) > 0.5 * odd_mass * rows
    assert 0.05 < out.stats.acceptance_rate < 0.95  # both branches of the rejection sampler were exercised


def test_a_reduced_vocabulary_needs_the_lean_engine():
    model = cached_tiny_model("llama")
    with pytest.raises(PlanError, match="needs the lean engine"):
        SpeculativeDecoder(model, draft_dtype="int8", draft_engine="modules", draft_vocab=HALF)
    with pytest.raises(PlanError, match="reduced draft vocabulary"):
        SpeculativeDecoder(model, plan_for(model, blocks=[1]), draft_vocab=HALF)  # no copy: nothing to restrict
    with pytest.raises(DataError, match="token ids in 0..127"):
        LeanDraft(model, "float32", vocab=torch.tensor([3, VOCAB]))


def test_one_draft_cache_entry_serves_every_vocabulary(tmp_path):
    model = cached_tiny_model("llama")
    cache = DraftCache(tmp_path, min_parameters=0)
    with SpeculativeDecoder(model, draft_dtype="int8", draft_cache=cache, draft_vocab=HALF) as first:
        assert first.setup.draft_source == "built" and first.draft_model.head.out_features == HALF.numel()
    with SpeculativeDecoder(model, draft_dtype="int8", draft_cache=cache) as whole:
        assert whole.setup.draft_source == "disk" and whole.draft_model.head.out_features == VOCAB
    with SpeculativeDecoder(model, draft_dtype="int8", draft_cache=cache, draft_vocab=HALF) as again:
        assert again.setup.draft_source == "memory" and again.draft_model.head.out_features == HALF.numel()
    assert len(cache.entries()) == 1


@pytest.fixture(scope="module")
def tokenizer(tiny_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_folder))


def test_the_token_set_is_the_most_frequent_tokens_of_the_corpora_and_is_cached(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPLM_CACHE_DIR", str(tmp_path))
    counts = token_counts(tokenizer, ("pydoc",))
    files = list((tmp_path / "draft-vocab").iterdir())
    assert len(files) == 1 and counts.shape == (len(tokenizer),) and counts.sum() > 10_000
    assert torch.equal(token_counts(tokenizer, ("pydoc",)), counts)  # read back from the file
    vocab = draft_vocabulary(tokenizer, 1000, ("pydoc",))
    assert isinstance(vocab, DraftVocab) and vocab.ids.numel() == 1000 and bool((vocab.ids.diff() > 0).all())
    assert set(tokenizer.all_special_ids) <= set(vocab.ids.tolist())  # always proposable
    outside = torch.ones(len(tokenizer), dtype=torch.bool)
    outside[vocab.ids] = False
    outside[tokenizer.all_special_ids] = False
    chosen = counts[vocab.ids[~torch.isin(vocab.ids, torch.tensor(tokenizer.all_special_ids))]]
    assert int(chosen.min()) >= int(counts[outside].max())  # no token left out is more frequent than one taken
    assert 0.8 < vocab.coverage < 1.0
    assert draft_vocabulary(tokenizer, 0) is None and draft_vocabulary(tokenizer, len(tokenizer)) is None
    with pytest.raises(DataError, match="positive number"):
        draft_vocabulary(tokenizer, -5)
    # a draft plan records the choice, and a command makes the same set from it
    plan = plan_for(cached_tiny_model("llama")).__class__.from_layers(
        4, provenance={"draft": {"precision": "int8", "vocab": vocab.to_json()}})
    assert plan_draft_vocab(plan)["size"] == 1000
    assert torch.equal(resolve_draft_vocab(tokenizer, None, plan).ids, vocab.ids)
    assert resolve_draft_vocab(tokenizer, 0, plan) is None  # --draft-vocab 0: the whole vocabulary


def test_generate_speculative_with_draft_vocab_on_the_command_line(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPLM_CACHE_DIR", str(tmp_path))
    result = run_cli("generate", tiny_folder, "--prompt", "Hello", "--max-new-tokens", "8", "--speculative",
                     "--draft-dtype", "int8", "--draft-vocab", "4096")
    assert result.exception is None, result.output
    assert "proposing the 4,096 most frequent tokens of gsm8k, pydoc" in " ".join(result.output.split())


def test_bench_and_draft_search_take_draft_vocabularies(tiny_folder, tmp_path, monkeypatch):
    """bench-speculative runs each draft once per size, paired in one run, every output exact; draft-search records
    the vocabulary in the draft plan, which generate then drafts with."""
    import json

    import skiplm

    monkeypatch.setenv("SKIPLM_CACHE_DIR", str(tmp_path / "cache"))
    result = run_cli("bench-speculative", tiny_folder, "--draft-dtype", "int8", "--draft-vocab", "2048,0",
                     "--prompts", "gsm8k", "--limit", 1, "--batch-sizes", 1, "--new-tokens", 8, "-o", tmp_path / "b")
    assert result.exception is None, result.output
    bench = json.loads((tmp_path / "b" / "speculative.json").read_text())
    assert set(bench["drafts"]) == {"int8", "int8-v2048"} and "2,048 most frequent" in bench["drafts"]["int8-v2048"]
    assert all(bench["results"]["gsm8k_b1"][name]["identical_rows"] == 1 for name in bench["drafts"])
    out = tmp_path / "draft.json"
    result = run_cli("draft-search", tiny_folder, "--max-blocks", 1, "--limit", 1, "--new-tokens", 4, "--precisions",
                     "int8", "--draft-vocab", 1024, "-o", out)
    assert result.exception is None, result.output
    assert plan_draft_vocab(skiplm.SkipPlan.load(out))["size"] == 1024
    result = run_cli("generate", tiny_folder, "--prompt", "Hi", "--max-new-tokens", 4, "--speculative", "--plan", out)
    assert result.exception is None and "1,024 most frequent" in " ".join(result.output.split()), result.output


@pytest.mark.slow
def test_the_default_model_with_its_most_frequent_tokens_drafts_plain_greedy_output():
    """The shipped model, the lean int8-dynamic draft proposing its 4,096 most frequent tokens (counted on the
    corpora, cached): a GSM8K chat answer equals plain greedy decoding, and most drafts are still accepted."""
    import skiplm
    from skiplm.speculative.decoder import plain_generate

    model, tokenizer = skiplm.load_model("smollm2-135m")
    vocab = draft_vocabulary(tokenizer, 4096, vocab_size=model.get_output_embeddings().weight.shape[0])
    text = tokenizer.apply_chat_template([{"role": "user", "content": "A shop sells 3 pens for $2. How much do 12 "
                                                                      "pens cost?"}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    expected = plain_generate(model, ids, max_new_tokens=48)
    with SpeculativeDecoder(model, draft_dtype="int8-dynamic", draft_vocab=vocab) as decoder:
        assert decoder.draft_model.head.out_features == 4096
        out = decoder.generate(ids, max_new_tokens=48, fallback=False)
    assert out.tokens == expected
    assert out.stats.acceptance_rate > 0.5
