"""Trained drafts (skiplm.speculative.trained): a LoRA adapter on a skip-set draft, active on the draft path only.
The full model is the oracle: greedy speculative output equals plain greedy token for token, sampled output follows
the full model's distribution, and the full model's logits and weights are untouched while a trained draft exists."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import skiplm
from skiplm.speculative import SpeculativeDecoder, generate, plain_generate
from skiplm.speculative.cache import DraftCache
from skiplm.speculative.lean import LeanDraft
from skiplm.speculative.trained import (
    DraftAdapter,
    DraftAdapterError,
    _lora_config,
    adapter_folder,
    load_trained_draft,
    save_trained_draft,
    train_draft,
)
from skiplm.train.distill import TrainSettings

from conftest import VOCAB, cached_tiny_model, plan_for, run_cli

FAMILIES = ["llama", "qwen2"]
# (draft precision, engine): the model's own modules (adapter attached in place), a float32 modules copy, and the
# lean engine in float32 / int8 / int8-dynamic (adapter merged into the copy's weights before quantizing)
ENGINES = [(None, "modules"), ("float32", "modules"), ("float32", "lean"), ("int8", "lean"), ("int8-dynamic", "lean")]


def random_adapter(model, plan, *, seed=0, rank=4, scale=0.3):
    """A LoRA adapter for ``plan``'s kept layers with random A and B (a trained adapter's shape, nonzero updates)."""
    from peft import get_peft_model, get_peft_model_state_dict

    from skiplm.heal.artifact import peft_quietly

    config = _lora_config(model, plan, rank, 0.0, "all")
    with peft_quietly():
        scratch = get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in scratch.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * scale)
    return DraftAdapter(config, get_peft_model_state_dict(scratch), {"decode": plan.decode.to_json()})


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_untouched(model, before):
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
    assert not any("lora" in name for name, _ in model.named_modules())
    assert getattr(model, "_skiplm_handle", None) is None


def prompts(batch, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, 9), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:  # left padding in the second row
        ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


# -- exactness ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_with_a_trained_draft_equals_plain_greedy_at_batch_1_and_3(family):
    model = cached_tiny_model(family)
    plan = plan_for(model, blocks=[1, 3])
    adapter = random_adapter(model, plan)
    before = snapshot(model)
    for batch in (1, 3):
        ids, mask = prompts(batch, seed=batch)
        expected = plain_generate(model, ids, mask, max_new_tokens=24, eos_token_id=[])
        for precision, engine in ENGINES:
            out = generate(model, None, ids, mask, plan=plan, draft_dtype=precision, draft_engine=engine,
                           draft_adapter=adapter, max_new_tokens=24, max_draft=4, fallback=False, eos_token_id=[],
                           draft_cache=False)
            assert out.tokens == expected, (batch, precision, engine)
            assert out.stats.rounds > 0 and out.stats.drafted > 0
    assert_untouched(model, before)


@torch.no_grad()
def test_the_adapter_is_on_the_draft_path_and_off_for_the_verifier():
    """The draft with its adapter computes the merged model under the plan (logits compared), the verifier the full
    model, bit for bit, while the adapter is attached in place."""
    model = cached_tiny_model("llama")
    plan = plan_for(model, blocks=[2])
    adapter = random_adapter(model, plan, seed=3)
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    with skiplm.apply(model, plan):
        untrained = model(ids).logits
    merged = adapter.merged(model)  # a view: the adapted weights new, the rest shared
    with skiplm.apply(merged, plan, check_model=False):
        trained = merged(ids).logits
    assert not torch.allclose(trained, untrained, atol=1e-3)  # the adapter changes the draft
    shared = {id(p) for p in model.parameters()}
    assert any(id(p) in shared for p in merged.parameters())  # the embeddings and norms are the model's own

    decoder = SpeculativeDecoder(model, plan, draft_adapter=adapter)  # modules engine, no copy: attached in place
    try:
        assert any("lora" in name for name, _ in model.named_modules())
        torch.testing.assert_close(model(ids).logits, trained, rtol=1e-4, atol=1e-4)  # the draft: plan + adapter
        with decoder.draft_handle.disabled():  # what the verifier runs
            assert torch.equal(model(ids).logits, full)
    finally:
        decoder.close()
    assert torch.equal(model(ids).logits, full)

    lean = LeanDraft(merged, "float32", plan)  # the lean engine built from the merged view: the same draft
    logits, _ = lean(ids, torch.ones_like(ids), torch.arange(11)[None].expand(2, -1), None, logits_to_keep=11)
    torch.testing.assert_close(logits, trained, rtol=1e-4, atol=1e-4)


def test_full_model_logits_and_weights_unchanged_while_trained_drafts_exist():
    model = cached_tiny_model("qwen2")
    plan = plan_for(model, blocks=[1])
    adapter = random_adapter(model, plan, seed=5)
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    before = snapshot(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.no_grad():
        full = model(ids).logits
    decoders = [SpeculativeDecoder(model, plan, draft_dtype=p, draft_engine=e, draft_adapter=adapter,
                                   draft_cache=False) for p, e in ENGINES[1:]]
    try:
        with torch.no_grad():
            assert torch.equal(model(ids).logits, full)
        for name, param in model.named_parameters():
            assert torch.equal(param, before[name]) and param.requires_grad == flags[name], name  # (peft froze them)
    finally:
        for decoder in decoders:
            decoder.close()
    assert_untouched(model, before)


def test_sampled_tokens_with_a_trained_draft_follow_the_full_model():
    """4,000 rows in one batch (as the untrained sampling test): token 2 is drawn by rejection sampling against the
    trained draft; its joint with token 1 must be the full model's, not the draft's."""
    from test_speculative import _chi2_ok, _exact_joint, _tv

    from skiplm.speculative import Sampling

    model = cached_tiny_model("llama")
    prompt = [5, 17, 33, 9, 60, 42]
    sampling = Sampling(True, temperature=0.8, top_k=4, top_p=0.95)
    plan = plan_for(model, mlp=[2])
    adapter = random_adapter(model, plan, seed=7, scale=0.05)
    rows = 4000
    with torch.no_grad():
        out = generate(model, None, torch.tensor([prompt] * rows), plan=plan, draft_adapter=adapter,
                       max_new_tokens=3, do_sample=True, temperature=0.8, top_k=4, top_p=0.95, max_draft=1, seed=11,
                       fallback=False, eos_token_id=[])
        counts = {}
        for tokens in out.tokens:
            counts[tuple(tokens[:2])] = counts.get(tuple(tokens[:2]), 0) + 1
        exact = _exact_joint(model, prompt, 2, sampling)
        merged = adapter.merged(model)
        with skiplm.apply(merged, plan, check_model=False) as handle:  # sampling token 2 from the trained draft
            wrong = _exact_joint(merged, prompt, 2, sampling, handle=handle, draft_from=1)
    stat, critical = _chi2_ok(counts, rows, exact)
    tv = _tv(counts, rows, exact)
    assert stat < critical and tv < 0.05, (stat, critical, tv)
    wrong_tv = 0.5 * sum(abs(exact.get(k, 0) - wrong.get(k, 0)) for k in set(exact) | set(wrong))
    assert wrong_tv > 0.1, wrong_tv  # the test would catch a sampler that took the trained draft's tokens
    assert 0.05 < out.stats.acceptance_rate < 0.95


# -- files ----------------------------------------------------------------------------------------------------------
def test_adapter_save_load_roundtrip_and_refusals(tmp_path):
    from peft import LoraConfig

    model = cached_tiny_model("llama")
    plan = skiplm.SkipPlan.from_layers(5, blocks=[1, 3], provenance={"draft": {"precision": "int8"}}).for_model(model)
    adapter = random_adapter(model, plan)
    path = save_trained_draft(plan, adapter, tmp_path / "draft.json")
    folder = adapter_folder(path)
    assert folder == tmp_path / "draft.adapter" and (folder / "adapter_model.safetensors").is_file()
    assert LoraConfig.from_pretrained(str(folder)).r == 4  # peft's own format
    loaded_plan, loaded = load_trained_draft(path)
    assert loaded_plan == plan and loaded_plan.provenance["draft"]["precision"] == "int8"
    assert loaded_plan.provenance["draft"]["adapter"]["digest"] == adapter.digest() == loaded.digest()
    assert set(loaded.state) == set(adapter.state)
    assert all(torch.equal(loaded.state[k], adapter.state[k]) for k in adapter.state)
    assert skiplm.SkipPlan.load(path) == plan  # still an ordinary plan file
    # another process (string hashing differs: peft's target_modules set is written in another order) reads it too
    import subprocess
    import sys

    code = f"from skiplm.speculative.trained import load_trained_draft; print(load_trained_draft({str(path)!r})[1].digest())"
    for seed in ("1", "2"):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**__import__("os").environ, "PYTHONHASHSEED": seed, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0 and done.stdout.strip() == adapter.digest(), done.stderr[-500:]

    with pytest.raises(DraftAdapterError, match="trained for another skip set"):
        SpeculativeDecoder(model, plan_for(model, blocks=[2]), draft_adapter=loaded)
    other = random_adapter(model, plan, seed=9)
    other.save(folder)  # another adapter where the plan's should be
    with pytest.raises(DraftAdapterError, match="holds another adapter"):
        load_trained_draft(path)
    adapter.save(folder)
    data = bytearray((folder / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(DraftAdapterError, match="checksum"):
        load_trained_draft(path)
    import shutil

    shutil.rmtree(folder)
    with pytest.raises(DraftAdapterError, match="missing"):
        load_trained_draft(path)


# -- the draft cache ---------------------------------------------------------------------------------------------------
def test_the_draft_cache_keys_on_the_adapter(tmp_path):
    from skiplm.speculative.stats import SetupStats

    model = cached_tiny_model("llama")
    plan = plan_for(model, blocks=[1])
    first, second = random_adapter(model, plan, seed=1), random_adapter(model, plan, seed=2)
    cache = DraftCache(tmp_path, min_parameters=0)
    keys = [cache.key(model, "lean", "int8", a) for a in (None, first, second)]
    assert "adapter" not in keys[0] and keys[1] != keys[2]
    assert len({cache.folder(k) for k in keys}) == 3  # kept side by side: none replaces another

    def lean(adapter, in_cache=cache):
        setup = SetupStats()
        engine = in_cache.lean(model, "int8", setup, adapter=adapter)
        return engine, setup.draft_source

    untrained, source = lean(None)
    assert source == "built"
    trained, source = lean(first)
    assert source == "built"  # never the untrained entry
    assert lean(first)[1] == "memory" and lean(None)[1] == "memory"
    fresh = DraftCache(tmp_path, min_parameters=0)  # another process: from disk, each its own
    from_disk, source = lean(first, fresh)
    assert source == "disk" and lean(None, fresh)[1] == "disk"
    assert lean(second, fresh)[1] == "built"
    ids = torch.randint(3, VOCAB, (1, 6))
    args = (ids, torch.ones_like(ids), torch.arange(6)[None], None)
    assert torch.equal(from_disk.shared(plan)(*args)[0], trained.shared(plan)(*args)[0])  # bit for bit
    assert not torch.equal(untrained.shared(plan)(*args)[0], trained.shared(plan)(*args)[0])
    manifests = [json.loads((f / "manifest.json").read_text()) for f in tmp_path.iterdir() if f.is_dir()]
    assert sorted(bool(m["key"].get("adapter")) for m in manifests) == [False, True, True]


# -- training -----------------------------------------------------------------------------------------------------------
def test_a_short_training_run_raises_the_acceptance_proxy(tmp_path):
    model = cached_tiny_model("llama")
    plan = plan_for(model, blocks=[2])
    before = snapshot(model)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(3, VOCAB, (72, 16), generator=g)
    settings = TrainSettings(steps=40, batch_size=8, learning_rate=1e-2, warmup_steps=2, eval_every=20, patience=0,
                             bf16=False, seed=0)
    adapter = train_draft(model, plan, data, held_out=8, rank=8, settings=settings, precision="int8",
                          run_dir=tmp_path / "run")
    record = adapter.record["training"]
    first, best = record["evaluations"][0], record["held_out"]  # on the 8 held-out sequences
    assert record["steps"] == 40 and first["step"] == 0
    assert best["acceptance"] > first["acceptance"] + 0.03, (first, best)  # sum(min(p, q)) toward the full model
    assert best["kl"] < first["kl"]
    assert adapter.record["precision"] == "int8" and adapter.record["decode"] == plan.decode.to_json()
    assert_untouched(model, before)
    # the trained draft drafts losslessly, and accepts more than the untrained one
    ids, mask = prompts(2, seed=4)
    expected = plain_generate(model, ids, mask, max_new_tokens=24, eos_token_id=[])
    trained = generate(model, None, ids, mask, plan=plan, draft_dtype="int8", draft_adapter=adapter,
                       max_new_tokens=24, fallback=False, eos_token_id=[], draft_cache=False)
    assert trained.tokens == expected
    with pytest.raises(DraftAdapterError, match="skips nothing"):
        train_draft(model, plan_for(model), data, settings=settings)


# -- the commands ---------------------------------------------------------------------------------------------------------
def test_draft_train_then_generate_and_bench_use_the_adapter(tiny_folder, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("SKIPLM_CACHE_DIR", str(tmp_path / "cache"))  # the self-generated data's cache

    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    plan = skiplm.SkipPlan.from_layers(4, blocks=[2], provenance={"draft": {"precision": "int8",
                                                                             "alternatives": [[1]]}})
    plan_file = plan.for_model(model).save(tmp_path / "plan.json")
    out = tmp_path / "trained.json"
    result = run_cli("draft-train", tiny_folder, "--plan", plan_file, "--steps", 4, "--eval-every", 2,
                     "--sequences", 6, "--length", 128, "--held-out", 2, "--batch-size", 2, "--rank", 2,
                     "--bf16", "off", "-o", out)
    assert result.exception is None, result.output
    assert "acceptance proxy" in result.output and (tmp_path / "trained.adapter" / "draft-adapter.json").is_file()
    trained_plan, adapter = load_trained_draft(out)
    assert trained_plan.provenance["draft"]["precision"] == "int8"
    assert "alternatives" not in trained_plan.provenance["draft"]  # the adapter fits its own skip set only
    assert adapter.record["training"]["steps"] == 4

    result = run_cli("generate", tiny_folder, "--speculative", "--plan", out, "--prompt", "Hello",
                     "--max-new-tokens", 8, "--no-draft-cache")
    assert result.exception is None, result.output
    assert "trained (LoRA r2" in result.output and "int8 copy" in result.output

    bench = tmp_path / "bench"
    result = run_cli("bench-speculative", tiny_folder, "--draft-plan", plan_file, "--draft-plan", out,
                     "--limit", 2, "--batch-sizes", "1,2", "--new-tokens", 8, "--prompts", "gsm8k",
                     "--no-draft-cache", "-o", bench)
    assert result.exception is None, result.output
    data = json.loads((bench / "speculative.json").read_text())
    assert "trained: LoRA r2" in data["drafts"]["trained"] and "trained" not in data["drafts"]["plan"]
    for entry in data["results"].values():
        assert entry["trained"]["identical_rows"] == entry["plan"]["identical_rows"] == 2
    training = adapter.training_seconds
    assert data["overall"]["trained"]["search_seconds"] == pytest.approx(training)  # training counts against it

    searched = tmp_path / "searched.json"  # draft-search takes the trained draft as a candidate, at each precision
    result = run_cli("draft-search", tiny_folder, "--max-blocks", 1, "--limit", 1, "--new-tokens", 6,
                     "--precisions", "int8", "--trained-plan", out, "--no-draft-cache", "-o", searched)
    assert result.exception is None, result.output
    search = json.loads((tmp_path / "searched.search.json").read_text())
    assert set(search["speedups"]) == {"skip-0-blocks-int8", "skip-1-blocks-int8", "trained-int8"}
    assert (load_trained_draft(searched)[1] is not None) == (search["best"] == "trained-int8")


def test_draft_search_trains_candidates_and_saves_a_trained_winner(tiny_folder, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from skiplm.speculative.search import run_draft_search

    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    trained_for = []

    def trainer(model_, plan):
        trained_for.append(sorted(plan.decode.blocks))
        return random_adapter(model_, plan, rank=2, scale=0.01)

    search = run_draft_search(model, tokenizer, precisions=["int8"], max_blocks=2, limit=1, new_tokens=6,
                              train=(1, 2), trainer=trainer)
    names = set(search.found["speedups"])
    assert {"skip-1-blocks-int8-lora", "skip-2-blocks-int8-lora", "skip-0-blocks-int8"} <= names
    assert [len(b) for b in trained_for] == [1, 2]  # one adapter per skip set
    measured = search.found["measured"]["results"]["calibration_b1"]
    assert all(measured[n]["identical_rows"] == 1 for n in names)
    assert len([d for d in search.found["measured"]["drafts"] if d.endswith("-lora")]) == 2
    path = search.save(tmp_path / "searched.json")  # whichever won, it reloads as what it was
    assert (load_trained_draft(path)[1] is not None) == (search.best.adapter is not None)
    # a trained winner: saved with its adapter beside the plan, no runner-ups (they would not fit the adapter)
    from skiplm.speculative.bench import Draft
    from skiplm.speculative.search import DraftSearch

    plan = skiplm.SkipPlan.from_layers(4, blocks=[1], provenance={"draft": {"precision": "int8"}}).for_model(model)
    winner = Draft("skip-1-blocks-int8-lora", plan=plan, adapter=random_adapter(model, plan, rank=2))
    path = DraftSearch(plan, winner, search.found, search.seconds).save(tmp_path / "trained.json")
    loaded_plan, adapter = load_trained_draft(path)
    assert adapter.digest() == winner.adapter.digest() and loaded_plan.decode.blocks == [1]
    assert json.loads((tmp_path / "trained.search.json").read_text())["best"] == "skip-1-blocks-int8-lora"
