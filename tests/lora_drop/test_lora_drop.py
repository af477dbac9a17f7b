"""LoRA-Drop (skiplm.lora_drop) on tiny seeded models: an anchor at every token gives the vanilla model; scoring in
one forward (teacher_forced) equals step-by-step decoding with the cache; a dropped step computes exactly the stated
rule and writes no keys or values at droppable layers; a left-padded batch equals each row alone; the folder round
trips through load_skipper; bad input is refused clearly; a short training run lowers the held-out KL."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import skiplm
from skiplm.lora_drop import (RECORD_FILE, WEIGHTS_FILE, LoraDrop, LoraDropError, kv_cache_bytes, load_lora_drop,
                              paper_droppable, train_lora_drop)
from skiplm.registry import REUSE, SKIPPER_FILES
from skiplm.train.distill import TrainSettings

from conftest import VOCAB, cached_tiny_model, run_cli, tiny_model

FAMILIES = ["llama", "qwen2", "qwen3", "phi3", "olmo2"]  # full-attention families (sliding ones are refused)
IDS = torch.randint(3, VOCAB, (1, 14), generator=torch.Generator().manual_seed(3))


def skipper(model, every=2, rank=4, *, seed=1, scale=0.3, droppable=None):
    """A LoRA-Drop skipper for ``model`` with non-zero corrections (as if trained), so they matter in every test."""
    made = LoraDrop.initial(model, every, rank, droppable=droppable, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    made.corrections = {i: (a, torch.randn(b.shape, generator=g) * scale) for i, (a, b) in made.corrections.items()}
    return made


def stepwise(model, ids, skip, prompt: int = 1, attention_mask=None):
    """Logits of every position [B, T, V]: a prefill of ``prompt`` tokens under ``skip``, then one token per forward
    with the KV cache; and the cache."""
    mask = None if attention_mask is None else attention_mask[:, :prompt]
    with torch.no_grad(), skiplm.apply(model, skip) as handle:
        out = model(ids[:, :prompt], attention_mask=mask, use_cache=True)
        cache, logits = out.cache, [out.logits]
        for t in range(prompt, ids.shape[1]):
            mask = None if attention_mask is None else attention_mask[:, :t + 1]
            out = model(ids[:, t:t + 1], attention_mask=mask, cache=cache, use_cache=True)
            cache = out.cache
            logits.append(out.logits)
        return torch.cat(logits, dim=1), cache, handle.stats.to_json()


def one_forward(model, ids, skip, attention_mask=None):
    with torch.no_grad(), skiplm.apply(model, skip):
        return model(ids, attention_mask=attention_mask, use_cache=False).logits


@pytest.fixture(params=FAMILIES)
def model(request):
    m = cached_tiny_model(request.param)
    yield m
    assert getattr(m, "_skiplm_handle", None) is None, "a test left a skipper applied"
    assert not any(name.endswith("lora_drop") for name, _ in m.named_modules()), "a correction was left attached"


def test_the_paper_rule_and_the_registrations():
    assert paper_droppable(30) == tuple(i for i in range(30) if i not in (0, 4, 8, 12, 16, 20, 24, 28))
    assert len(paper_droppable(30)) == 22
    assert "arXiv 2601.02569" in REUSE.get("lora-drop").paper
    assert "skiplm.lora-drop" in SKIPPER_FILES


def test_an_anchor_at_every_token_gives_the_vanilla_model(model):
    every_token = skipper(model, every=1)
    assert every_token.is_empty()
    with torch.no_grad():
        vanilla = model(IDS).logits
    torch.testing.assert_close(one_forward(model, IDS, every_token), vanilla, rtol=0, atol=0)
    torch.testing.assert_close(one_forward(model, IDS, every_token.teacher_forced()), vanilla, rtol=0, atol=0)
    logits, _, stats = stepwise(model, IDS, every_token)
    torch.testing.assert_close(logits, vanilla, rtol=1e-5, atol=1e-5)  # cached decoding: vanilla's own rounding
    assert stats["decode"]["layer_drop_ratio"] == 0
    with torch.no_grad(), skiplm.apply(model, every_token):
        generated = model.generate(IDS[:, :4], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with torch.no_grad():
        assert torch.equal(generated, model.generate(IDS[:, :4], max_new_tokens=8, min_new_tokens=8, do_sample=False))


@pytest.mark.parametrize("every", [2, 3])
def test_one_forward_equals_step_by_step_decoding(model, every):
    skip = skipper(model, every)
    reference = one_forward(model, IDS, skip.teacher_forced())
    logits, cache, stats = stepwise(model, IDS, skip)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert (reference - model(IDS).logits).abs().max() > 1e-2  # it does drop something
    # KV rule: droppable layers hold the prompt token and the anchors only; the others every token
    steps = IDS.shape[1] - 1
    anchors = sum(1 for s in range(steps) if (s + 1) % every == 0)
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    assert lengths == [1 + anchors if i in skip.droppable else IDS.shape[1] for i in range(skip.num_layers)]
    assert stats["decode"]["layer_drop_ratio"] == pytest.approx((steps - anchors) * len(skip.droppable)
                                                                / (steps * skip.num_layers))


def test_a_longer_prompt_runs_in_full_then_decodes_on_schedule(model):
    skip = skipper(model, 2)
    logits, cache, _ = stepwise(model, IDS, skip, prompt=5)
    reference = one_forward(model, IDS, dataclasses.replace(skip, forced_prompt=5))
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(logits[:, :5], model(IDS[:, :5]).logits, rtol=1e-5, atol=1e-5)  # prefill in full
    # a prefill scored on the schedule (teacher-forced view, with a cache) continues exactly too
    with torch.no_grad(), skiplm.apply(model, skip.teacher_forced()):
        out = model(IDS[:, :6], use_cache=True)
        cache, more = out.cache, [out.logits]
        for t in range(6, IDS.shape[1]):
            out = model(IDS[:, t:t + 1], cache=cache, use_cache=True)
            more.append(out.logits)
    torch.testing.assert_close(torch.cat(more, 1), one_forward(model, IDS, skip.teacher_forced()), rtol=1e-4,
                               atol=1e-4)


def test_a_dropped_step_reuses_the_anchor_update_exactly(llama):
    """Zero correction, one droppable layer, no anchor after the prompt: layer 2's output for every decoded token is
    its input plus the prompt token's update at layer 2; no key or value is written there."""
    skip = LoraDrop(5, anchor_every=1000, droppable=(2,), model=skiplm.plan.model_identity(llama))
    seen = []
    hook = llama.model.layers[2].register_forward_hook(
        lambda module, args, kwargs, output: seen.append((kwargs.get("hidden_states", args[0] if args else None),
                                                          output)), with_kwargs=True)
    try:
        _, cache, _ = stepwise(llama, IDS[:, :6], skip)
    finally:
        hook.remove()
    (first_in, first_out), *steps = seen
    update = first_out - first_in
    for layer_in, layer_out in steps:
        torch.testing.assert_close(layer_out, layer_in + update, rtol=0, atol=0)
    assert cache.layers[2].keys.shape[-2] == 1 and cache.layers[1].keys.shape[-2] == 6


def test_a_dry_run_counts_but_drops_nothing(llama):
    skip = skipper(llama, 2)
    with torch.no_grad():
        vanilla = llama(IDS).logits
    with torch.no_grad(), skiplm.apply(llama, skip, dry_run=True) as handle:
        out = llama(IDS[:, :1], use_cache=True)
        cache, logits = out.cache, [out.logits]
        for t in range(1, IDS.shape[1]):
            out = llama(IDS[:, t:t + 1], cache=cache, use_cache=True)
            logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), vanilla, rtol=1e-5, atol=1e-5)
    assert handle.stats.to_json()["decode"]["dropped_layers_per_token"] == pytest.approx(3 * 7 / 13)


def test_kv_memory_matches_the_schedule(llama):
    skip = skipper(llama, 4)
    _, cache, _ = stepwise(llama, IDS, skip, prompt=2)
    with torch.no_grad():
        full = llama(IDS, use_cache=True).cache
    fraction = kv_cache_bytes(cache) / kv_cache_bytes(full)
    assert fraction == pytest.approx(skip.kv_fraction(2, IDS.shape[1] - 2))
    assert fraction == pytest.approx((2 * 14 + 3 * (2 + 3)) / (5 * 14))  # 2 full layers, 3 with prompt + 3 anchors


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_left_padded_batch_equals_each_row_alone(family):
    m = cached_tiny_model(family)
    skip = skipper(m, 2)
    rows = [IDS[0, :7], IDS[0, 3:7], IDS[0, 1:6]]
    width = max(len(r) for r in rows)
    batch = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), torch.ones(len(r), dtype=torch.long)])
                        for r in rows])
    settings = dict(max_new_tokens=9, min_new_tokens=9, do_sample=False, output_logits=True,
                    return_dict_in_generate=True)
    with torch.no_grad(), skiplm.apply(m, skip):
        together = m.generate(input_ids=batch, attention_mask=mask, **settings)
        alone = [m.generate(input_ids=r[None], **settings) for r in rows]
    batch_logits = torch.stack(together.logits, 1)
    for i, single in enumerate(alone):
        assert torch.equal(together.sequences[i, width:], single.sequences[0, len(rows[i]):])
        torch.testing.assert_close(batch_logits[i], torch.stack(single.logits, 1)[0], rtol=1e-4, atol=1e-4)
    # the one-forward view of a padded batch: each row as alone too
    scored = one_forward(m, batch, skip.teacher_forced(), attention_mask=mask)
    for i, r in enumerate(rows):
        torch.testing.assert_close(scored[i, width - len(r):], one_forward(m, r[None], skip.teacher_forced())[0],
                                   rtol=1e-4, atol=1e-4)


def test_the_folder_round_trips(llama, tmp_path):
    skip = skipper(llama, 3).for_model(llama)
    folder = skip.save(tmp_path / "ld")
    assert sorted(p.name for p in folder.iterdir()) == [WEIGHTS_FILE, RECORD_FILE]
    for path in (folder, folder / RECORD_FILE):
        loaded = skiplm.load_skipper(path)
        assert isinstance(loaded, LoraDrop) and loaded.describe() == skip.describe()
        torch.testing.assert_close(one_forward(llama, IDS, loaded.teacher_forced()),
                                   one_forward(llama, IDS, skip.teacher_forced()), rtol=0, atol=0)
    assert skip.save(folder) == folder  # an earlier LoRA-Drop folder is replaced
    bare = LoraDrop(5, 2, model=skip.model).save(tmp_path / "bare")  # no correction: no weights file
    assert sorted(p.name for p in bare.iterdir()) == [RECORD_FILE]
    assert skiplm.load_skipper(bare).corrections is None
    weights = folder / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(LoraDropError, match="checksum"):
        load_lora_drop(folder)
    record = json.loads((folder / RECORD_FILE).read_text())
    (folder / RECORD_FILE).write_text(json.dumps({**record, "schema_version": 99}))
    with pytest.raises(LoraDropError, match="schema version"):
        skiplm.load_skipper(folder)


def test_bad_input_is_refused_clearly(llama, tmp_path):
    with pytest.raises(LoraDropError, match="anchor_every"):
        LoraDrop(5, 0)
    with pytest.raises(LoraDropError, match="layer 0 always runs"):
        LoraDrop(5, 2, droppable=(0, 1))
    with pytest.raises(LoraDropError, match="not droppable"):
        LoraDrop(5, 2, droppable=(1,), corrections={2: (torch.zeros(8, 32), torch.zeros(32, 8))})
    with pytest.raises(LoraDropError, match="must be A"):
        LoraDrop(5, 2, rank=4, droppable=(1,), corrections={1: (torch.zeros(8, 32), torch.zeros(32, 8))})
    with pytest.raises(skiplm.errors.PlanMismatchError):
        skiplm.apply(llama, skipper(tiny_model("llama", seed=5)))
    wide = LoraDrop(5, 2, rank=2, droppable=(1,), corrections={1: (torch.zeros(2, 16), torch.zeros(16, 2))})
    with pytest.raises(LoraDropError, match="hidden size"):
        skiplm.apply(llama, wide, check_model=False)
    with pytest.raises(LoraDropError, match="sliding-window"):
        skiplm.apply(cached_tiny_model("mistral"), LoraDrop(5, 2), check_model=False)
    skip = skipper(llama, 2)
    with torch.no_grad(), skiplm.apply(llama, skip):
        with pytest.raises(skiplm.errors.PlanError, match="already"):
            skiplm.apply(llama, skip)
        cache = llama(IDS[:, :4], use_cache=True).cache
        with pytest.raises(LoraDropError, match="one token per forward"):
            llama(IDS[:, 4:6], cache=cache, use_cache=True)
    with torch.no_grad():
        foreign = llama(IDS[:, :4], use_cache=True).cache
        with skiplm.apply(llama, skip):
            with pytest.raises(LoraDropError, match="cannot continue"):
                llama(IDS[:, 4:5], cache=foreign, use_cache=True)
    with pytest.raises(LoraDropError, match="not a LoRA-Drop folder"):
        load_lora_drop(tmp_path)
    with pytest.raises(LoraDropError, match="nothing to train"):
        train_lora_drop(llama, 1, calibration=torch.randint(3, VOCAB, (10, 16)))


def test_a_short_training_run_lowers_the_held_out_kl(tmp_path):
    model = tiny_model("llama", num_layers=6)
    with torch.no_grad():
        vanilla = model(IDS).logits
    data = torch.randint(3, VOCAB, (40, 32), generator=torch.Generator().manual_seed(0))
    settings = TrainSettings(steps=24, eval_every=12, learning_rate=3e-2, warmup_steps=1, bf16=False, batch_size=4)
    trained = train_lora_drop(model, 2, 4, calibration=data, settings=settings, run_dir=tmp_path / "run")
    record = trained.provenance["training"]
    assert record["held_out"]["kl"] < record["evaluations"][0]["kl"] * 0.95, record["evaluations"]
    assert trained.corrections and any(float(up.abs().max()) > 0 for _, up in trained.corrections.values())
    assert trained.forced_prompt is None  # the generation view is what is returned
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, vanilla)  # training left the model as it was
    assert all(p.requires_grad for p in model.parameters())
    lm = train_lora_drop(model, 2, 4, calibration=data, objective="lm",
                         settings=dataclasses.replace(settings, steps=5))
    assert lm.provenance["objective"] == "lm" and lm.provenance["training"]["steps"] == 5


def test_the_command_writes_a_folder_every_command_takes(tiny_folder, tmp_path):
    out = tmp_path / "ld"
    result = run_cli("lora-drop", tiny_folder, "--anchor-every", 2, "--rank", 2, "--data", "gsm8k", "--sequences", 10,
                     "--length", 32, "--held-out", 2, "--steps", 2, "--eval-every", 1, "--bf16", "off", "-o", out)
    assert result.exception is None, result.output
    loaded = skiplm.load_skipper(out / RECORD_FILE)
    assert loaded.anchor_every == 2 and loaded.rank == 2 and loaded.droppable == (1, 2, 3)
    assert not (tmp_path / "ld.run").exists()
    result = run_cli("generate", tiny_folder, "--plan", out / RECORD_FILE, "--prompt", "Hello", "--max-new-tokens", 6)
    assert result.exception is None, result.output
    result = run_cli("eval", tiny_folder, "--plan", out / RECORD_FILE, "--corpus", "gsm8k", "--tokens", 200,
                     "--context", 64, "--stride", 32, "-o", tmp_path / "eval")
    assert result.exception is None, result.output
    result = run_cli("bench", tiny_folder, "--plan", out / RECORD_FILE, "--batch-sizes", 1, "--prompt-tokens", 8,
                     "--decode-prompt-tokens", 8, "--new-tokens", 4, "--repeats", 1, "--warmup", 0,
                     "-o", tmp_path / "bench")
    assert result.exception is None, result.output
    bench = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert {"lora-drop", "lora-drop (decisions only)"} <= set(bench["speed"])
    result = run_cli("lora-drop", tiny_folder, "--anchor-every", 2, "--droppable", "0,1", "--no-train",
                     "-o", tmp_path / "bad")
    assert isinstance(result.exception, LoraDropError)
