"""FiRST routers (skiplm.routers): exactness against the full model, the KV-cache rule, batches whose rows choose
differently, the folder format, bad input, and a short training run."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import skiplm
from skiplm import SkipPlan
from skiplm.routers import FiRST, RouterError, load_first, train_first
from skiplm.train.distill import TrainSettings

from conftest import NUM_LAYERS, VOCAB, cached_tiny_model, greedy_with_cache, run_cli

FAMILIES = ["llama", "qwen2", "mistral", "gemma2"]


def prompts(batch=1, length=12, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def random_routers(model, *, seed=1, scale=4.0, threshold=0.5, **fields) -> FiRST:
    """Routers with random weights: rows of different prompts tend to choose differently."""
    base = FiRST.initial(model)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(base.weight.shape, generator=generator) * scale
    return dataclasses.replace(base, weight=weight, bias=torch.zeros(len(base.routed)), threshold=threshold, **fields)


@pytest.fixture(params=FAMILIES)
def tiny(request):
    model = cached_tiny_model(request.param)
    yield model
    assert getattr(model, "_skiplm_handle", None) is None, "a test left a skipper applied"


def test_routers_that_skip_nothing_give_the_vanilla_logits_exactly(tiny):
    ids = prompts(2)
    vanilla = tiny(ids).logits
    expected = tiny.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    for first in (FiRST.initial(tiny), dataclasses.replace(random_routers(tiny), threshold=0.0)):
        assert first.is_empty() == (first.threshold <= 0)
        with skiplm.apply(tiny, first) as handle:
            assert torch.equal(tiny(ids).logits, vanilla)
            assert torch.equal(tiny.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False), expected)
        assert handle.skipped_layers() == [[], []]
        assert handle.stats.to_json()["decode"]["skipped_blocks_per_token"] == 0.0


def test_cached_decoding_equals_recomputation_with_the_same_decisions(tiny):
    ids = prompts(1, 10, seed=3)
    first = random_routers(tiny, seed=2)
    with skiplm.apply(tiny, first) as handle:
        sequence, cached = greedy_with_cache(tiny, ids, 6)
        skipped = handle.skipped_layers()[0]
    assert skipped, "the routers should skip something for this test to mean anything"
    assert handle.stats.to_json()["decode"]["skipped_blocks_per_token"] == len(skipped)
    # recomputation 1: the same blocks skipped statically, one forward over prompt + continuation
    with skiplm.apply(tiny, SkipPlan.from_layers(NUM_LAYERS, blocks=skipped).for_model(tiny)):
        static = tiny(sequence).logits[0, ids.shape[1] - 1:]
    torch.testing.assert_close(cached, static)
    # recomputation 2: the routers themselves reading only the prompt (route_tokens), one forward without a cache
    with skiplm.apply(tiny, dataclasses.replace(first, route_tokens=ids.shape[1])) as handle:
        routed = tiny(sequence, use_cache=False).logits[0, ids.shape[1] - 1:]
        assert handle.skipped_layers()[0] == skipped
    torch.testing.assert_close(cached, routed)


def test_a_layer_every_row_skips_does_not_run(tiny):
    first = dataclasses.replace(FiRST.initial(tiny), bias=torch.tensor([3.0, -3.0, 3.0]))  # layer 2 skipped by all
    probe = tiny.model.layers[2].mlp
    calls = []
    hook = probe.register_forward_hook(lambda *args: calls.append(1))
    try:
        with skiplm.apply(tiny, first) as handle:
            tiny.generate(prompts(2), max_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    assert calls == [] and handle.skipped_layers() == [[2], [2]]
    assert handle.stats.blocks_skipped_by_all_rows == 1


def test_rows_that_choose_differently_each_get_what_they_would_alone(tiny):
    ids = prompts(4, 10, seed=5)
    first = random_routers(tiny, seed=4)
    with skiplm.apply(tiny, first) as handle:
        batched = tiny.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
        choices = handle.skipped_layers()
    assert len({tuple(c) for c in choices}) > 1, f"rows chose alike ({choices}); the test needs them to differ"
    every_row = set.intersection(*(set(c) for c in choices))  # what a batch step saves: layers no row runs
    assert handle.stats.to_json()["decode"]["blocks_skipped_by_every_row"] == len(every_row)
    for row in range(ids.shape[0]):
        with skiplm.apply(tiny, first) as handle:
            alone = tiny.generate(ids[row:row + 1], max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
            assert handle.skipped_layers()[0] == choices[row]
        assert torch.equal(alone.sequences[0], batched.sequences[row])
        torch.testing.assert_close(torch.stack(alone.logits)[:, 0], torch.stack(batched.logits)[:, row],
                                   rtol=1e-4, atol=1e-4)


def test_padded_rows_route_on_their_real_tokens():
    model = cached_tiny_model("llama")
    first = random_routers(model, seed=4)
    long, short = prompts(1, 10, seed=5), prompts(1, 6, seed=6)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)
    mask = torch.tensor([[1] * 10, [0] * 4 + [1] * 6])
    with skiplm.apply(model, first) as handle:
        batched = model.generate(torch.cat([long, padded]), attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        choices = handle.skipped_layers()
    for row, ids in enumerate((long, short)):
        with skiplm.apply(model, first) as handle:
            alone = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
            assert handle.skipped_layers()[0] == choices[row]
        assert torch.equal(alone[0, -5:], batched[row, -5:])


def test_dry_run_decides_and_counts_but_skips_nothing():
    model = cached_tiny_model("llama")
    ids = prompts(2)
    first = random_routers(model, seed=2)
    with skiplm.apply(model, first, dry_run=True) as handle:
        logits = model(ids).logits
    assert torch.equal(logits, model(ids).logits)
    assert handle.stats.to_json()["skipped_blocks_per_sequence"] > 0


@pytest.fixture(scope="module")
def trained():
    """A short training run on a tiny llama (6 layers, routers on 1-4), LoRA rank 4."""
    model = cached_tiny_model("llama", num_layers=6)
    data = torch.randint(3, VOCAB, (20, 24), generator=torch.Generator().manual_seed(0))
    settings = TrainSettings(steps=24, batch_size=4, eval_every=8, patience=0, bf16=False, learning_rate=1e-2)
    return model, train_first(model, data, blocks=2.0, rank=4, prompt_tokens=8, held_out=4, settings=settings)


def test_a_short_training_run_lowers_the_kl_and_reaches_the_skip_rate(trained):
    model, first = trained
    record = first.provenance["training"]
    assert record["evaluations"][-1]["kl"] < record["evaluations"][0]["kl"]
    assert first.provenance["calibrated_blocks_per_sequence"] == pytest.approx(2.0, abs=0.5)
    assert first.adapter is not None and first.adapter.config.r == 4
    assert not hasattr(model, "skiplm_routers")  # the routers were the model's submodule only while training
    assert all(p.requires_grad for p in model.parameters())  # the flags training changed are back
    # with the adapter and the threshold, the prompts it was calibrated on skip about 2 blocks per sequence
    ids = torch.randint(3, VOCAB, (8, 8), generator=torch.Generator().manual_seed(0))
    with skiplm.apply(model, first.teacher_forced()) as handle:
        model(ids, use_cache=False)
    assert 0 < handle.stats.to_json()["skipped_blocks_per_sequence"] < 4


def test_the_folder_round_trips_and_the_adapter_comes_off_again(trained, tmp_path):
    model, first = trained
    ids = prompts(2, 10, seed=7)
    before = model(ids).logits
    with skiplm.apply(model, first):
        expected = model(ids).logits
    first.save(tmp_path / "first")
    assert (tmp_path / "first" / "adapter" / "adapter_config.json").is_file()
    for path in (tmp_path / "first", tmp_path / "first" / "first.json"):
        loaded = skiplm.load_skipper(path)
        assert isinstance(loaded, FiRST) and loaded.threshold == first.threshold
        with skiplm.apply(model, loaded):
            torch.testing.assert_close(model(ids).logits, expected)
        with skiplm.apply(model, loaded, merge=False):  # the adapter unmerged (peft) gives the same
            torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(model(ids).logits, before)  # every weight back bit for bit
    loaded.check_model(model)
    with pytest.raises(skiplm.PlanMismatchError):
        loaded.check_model(cached_tiny_model("llama", seed=1, num_layers=6))


def test_damaged_or_foreign_folders_are_refused(trained, tmp_path):
    _, first = trained
    folder = first.save(tmp_path / "first")
    weights = folder / "routers.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(RouterError, match="truncated"):
        load_first(folder)
    first.save(folder)  # replaces the damaged folder
    record = json.loads((folder / "first.json").read_text())
    (folder / "first.json").write_text(json.dumps({**record, "schema_version": 99}))
    with pytest.raises(RouterError, match="schema version"):
        skiplm.load_skipper(folder)
    with pytest.raises(RouterError, match="not a FiRST folder"):
        load_first(tmp_path)


def test_bad_input_is_refused_with_a_clear_error():
    model = cached_tiny_model("llama")
    base = FiRST.initial(model)
    bad = [dict(routed=(3, 1, 2)), dict(routed=(1, 2, 9)), dict(threshold=float("nan")),
           dict(weight=torch.zeros(2, 32)), dict(bias=torch.full((3,), float("inf"))), dict(route_tokens=0)]
    for change in bad:
        with pytest.raises(RouterError):
            dataclasses.replace(base, **change)
    with pytest.raises(RouterError, match="once per sequence"):
        base.install(model, record=True)
    with pytest.raises(RouterError, match="merge"):
        base.install(model, merge="sometimes")
    with pytest.raises(skiplm.PlanError):
        base.install(cached_tiny_model("llama", num_layers=6), check_model=False)
    with skiplm.apply(model, random_routers(model)):
        out = model(prompts(2), use_cache=True)
        with pytest.raises(RouterError, match="batch"):
            model(prompts(1, 1), cache=out.cache, use_cache=True)
    with pytest.raises(RouterError, match="greater than 1"):
        train_first(model, prompts(10, 16), speedup=0.9)
    with pytest.raises(RouterError, match="out of reach"):
        train_first(model, prompts(10, 16), blocks=3.0)
    with pytest.raises(RouterError, match="prompt"):
        train_first(model, prompts(10, 16), blocks=1.0, prompt_tokens=16)


def test_the_first_command_trains_and_its_folder_runs_in_eval(tiny_folder, tmp_path):
    out = tmp_path / "routers"
    result = run_cli("first", tiny_folder, "--blocks", "1", "--data", "gsm8k", "--sequences", "6", "--length", "24",
                     "--steps", "2", "--option", "prompt_tokens=8", "--option", "held_out=2", "--option", "rank=2",
                     "--option", "bf16=off", "-o", out)
    assert result.exception is None, result.output
    assert (out / "first.json").is_file() and not (tmp_path / "routers.run").exists()
    result = run_cli("eval", tiny_folder, "--plan", out / "first.json", "--corpus", "pydoc", "--tokens", "64",
                     "--context", "32", "--stride", "16")
    assert result.exception is None, result.output
    result = run_cli("generate", tiny_folder, "--plan", out / "first.json", "--prompt", "Two plus two is",
                     "--max-new-tokens", 4)
    assert result.exception is None, result.output
    result = run_cli("bench", tiny_folder, "--plan", out / "first.json", "--batch-sizes", "1,2", "--prompt-tokens", 8,
                     "--decode-prompt-tokens", 8, "--new-tokens", 2, "--repeats", 1, "--warmup", 0,
                     "--no-compare-pruned", "-o", tmp_path / "bench")
    assert result.exception is None, result.output
    rows = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert "first (decisions only)" in json.dumps(rows)
    result = run_cli("first", tiny_folder, "--blocks", "1", "--option", "bogus=1", "-o", tmp_path / "other")
    assert "no option 'bogus'" in str(result.exception)
