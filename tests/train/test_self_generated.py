"""Self-generated distillation data (skiplm.train.data): shapes and masks, the seed, the on-disk cache (hits, resuming,
damaged batches, serving fewer sequences), the model left as it was, and `skiplm self-generate`."""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib

import pytest
import torch
from conftest import VOCAB, plan_for, run_cli

from skiplm.errors import DataError
from skiplm.train.data import MANIFEST, MIN_LENGTH, GenerationSettings, self_generated

SPECIAL = (0, 1, 2)  # pad, bos, eos of the tiny models


class ByteTokenizer:
    """A tokenizer-ish object for the tiny models (vocabulary 128, no chat template): a BOS, then one id per word."""

    chat_template = None
    all_special_ids = list(SPECIAL)
    pad_token_id, bos_token_id, eos_token_id = SPECIAL

    def __len__(self):
        return VOCAB

    def __call__(self, text, add_special_tokens=True):
        words = [3 + zlib.crc32(word.encode()) % (VOCAB - 3) for word in text.split()]
        ids = ([self.bos_token_id] if add_special_tokens else []) + words
        return type("Encoding", (), {"input_ids": ids})()

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"w{i}" for i in ids if not (skip_special_tokens and i in SPECIAL))


SMALL = GenerationSettings(sequences=8, length=96, batch_size=4, seed=3)  # (most GSM8K questions are < 48 words)
TOKENS_ONLY = GenerationSettings(sequences=6, length=24, batch_size=2, chat_fraction=0.0)


@pytest.fixture
def tok():
    return ByteTokenizer()


def _same(a, b) -> bool:
    return all(torch.equal(getattr(a, name), getattr(b, name))
               for name in ("input_ids", "attention_mask", "loss_mask", "chat", "prompt_index"))


class ForwardCounter:
    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_rows_and_masks(llama, tok, tmp_path):
    data = self_generated(llama, tok, SMALL, cache_dir=tmp_path)
    n, length = SMALL.sequences, SMALL.length
    assert data.input_ids.shape == (n, length) and data.input_ids.dtype == torch.long
    assert data.attention_mask.shape == data.loss_mask.shape == (n, length)
    assert data.attention_mask.dtype == data.loss_mask.dtype == torch.bool
    # batches alternate chat / token seeded (chat_fraction 0.5, the first a chat batch)
    assert data.chat.tolist() == [True] * 4 + [False] * 4
    assert (data.prompt_index[data.chat] >= 0).all() and (data.prompt_index[~data.chat] == -1).all()
    assert len(data.prompts) == 4 and all(i >= 1000 for i in data.prompts)  # from the end of GSM8K
    for row in range(n):
        real, loss = data.attention_mask[row], data.loss_mask[row]
        count = int(real.sum())
        assert real[:count].all() and not real[count:].any()  # right padded
        assert not (loss & ~real).any()  # the loss only on real tokens
        first = int(loss.nonzero()[0]) if loss.any() else count
        assert loss[first:count].all()  # generated: from the end of the prompt to the end of the row
        ids = data.input_ids[row]
        if count < length:  # ended early: at an end-of-sequence token
            assert int(ids[count - 1]) == tok.eos_token_id
        if not data.chat[row]:  # BOS and one ordinary token
            assert first == 2 and int(ids[0]) == tok.bos_token_id and int(ids[1]) not in SPECIAL
        else:
            assert 1 < first <= length // 2 and int(ids[0]) == tok.bos_token_id
    assert data.generated_tokens > 0 and data.generated == n and data.seconds > 0
    assert "8 sequences x 96 tokens" in data.source and "gsm8k" in data.source
    assert data.model.model_type == "llama"


def test_the_same_seed_gives_the_same_tokens(llama, tok, tmp_path):
    a = self_generated(llama, tok, SMALL, cache_dir=tmp_path / "a")
    b = self_generated(llama, tok, SMALL, cache_dir=tmp_path / "b")
    assert _same(a, b)
    c = self_generated(llama, tok, dataclasses.replace(SMALL, seed=4), cache_dir=tmp_path / "c")
    assert not torch.equal(a.input_ids, c.input_ids)


def test_greedy_and_tokens_only(llama, tok, tmp_path):
    data = self_generated(llama, tok, dataclasses.replace(TOKENS_ONLY, temperature=0.0), cache_dir=tmp_path)
    assert not data.chat.any() and data.prompts == ()
    assert data.input_ids.shape == (6, 24)


def test_fewer_sequences_than_a_batch_are_one_batch_of_them(llama, tok, tmp_path):
    data = self_generated(llama, tok, dataclasses.replace(TOKENS_ONLY, sequences=3, batch_size=32), cache_dir=tmp_path)
    assert len(data) == 3 and data.generated == 3 and data.settings.batch_size == 3


def test_a_cache_hit_returns_the_same_tensors_without_running_the_model(llama, tok, tmp_path):
    first = self_generated(llama, tok, SMALL, cache_dir=tmp_path)
    with ForwardCounter(llama) as counter:
        again = self_generated(llama, tok, SMALL, cache_dir=tmp_path)
    assert counter.calls == 0 and again.generated == 0
    assert _same(first, again) and again.seconds == pytest.approx(first.seconds)
    assert (again.path / MANIFEST).is_file() and again.path.parent == tmp_path


def test_an_interrupted_generation_resumes_where_it_stopped(llama, tok, tmp_path):
    whole = self_generated(llama, tok, SMALL, cache_dir=tmp_path / "whole")

    def interrupt(done, total):
        if done >= SMALL.batch_size:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        self_generated(llama, tok, SMALL, cache_dir=tmp_path / "cut", progress=interrupt)
    seen = []
    resumed = self_generated(llama, tok, SMALL, cache_dir=tmp_path / "cut", progress=lambda *a: seen.append(a))
    assert resumed.generated == SMALL.sequences - SMALL.batch_size  # the first batch came from the cache
    assert seen == [(4, 8), (8, 8)]
    assert _same(whole, resumed)


def test_a_damaged_batch_is_generated_again(llama, tok, tmp_path, caplog):
    first = self_generated(llama, tok, SMALL, cache_dir=tmp_path)
    batch = first.path / "batch-00001.pt"
    batch.write_bytes(batch.read_bytes()[:100])  # truncated
    with caplog.at_level(logging.WARNING, logger="skiplm.train.data"):
        again = self_generated(llama, tok, SMALL, cache_dir=tmp_path)
    assert "Batch 1" in caplog.text and "truncated" in caplog.text
    assert again.generated == SMALL.batch_size and _same(first, again)


def test_a_batch_from_other_settings_is_not_used(llama, tok, tmp_path, caplog):
    first = self_generated(llama, tok, SMALL, cache_dir=tmp_path)
    other = self_generated(llama, tok, dataclasses.replace(SMALL, seed=9), cache_dir=tmp_path)
    assert other.path != first.path
    (first.path / "batch-00000.pt").write_bytes((other.path / "batch-00000.pt").read_bytes())
    with caplog.at_level(logging.WARNING, logger="skiplm.train.data"):
        again = self_generated(llama, tok, SMALL, cache_dir=tmp_path)
    assert "Batch 0" in caplog.text and again.generated == SMALL.batch_size and _same(first, again)


def test_a_damaged_manifest_starts_over(llama, tok, tmp_path, caplog):
    first = self_generated(llama, tok, TOKENS_ONLY, cache_dir=tmp_path)
    (first.path / MANIFEST).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="skiplm.train.data"):
        again = self_generated(llama, tok, TOKENS_ONLY, cache_dir=tmp_path)
    assert "unreadable manifest" in caplog.text and again.generated == TOKENS_ONLY.sequences and _same(first, again)


def test_a_larger_cache_serves_fewer_sequences(llama, tok, tmp_path):
    many = self_generated(llama, tok, SMALL, cache_dir=tmp_path)
    for fewer in (4, 6, 1):
        with ForwardCounter(llama) as counter:
            few = self_generated(llama, tok, dataclasses.replace(SMALL, sequences=fewer), cache_dir=tmp_path)
        assert counter.calls == 0 and few.generated == 0 and len(few) == fewer
        assert torch.equal(few.input_ids, many.input_ids[:fewer])
        assert torch.equal(few.loss_mask, many.loss_mask[:fewer]) and few.settings.sequences == fewer
    # and more than it holds: only the missing batches are generated, the first ones are the cached ones
    more = self_generated(llama, tok, dataclasses.replace(SMALL, sequences=12), cache_dir=tmp_path)
    assert more.generated == 4 and torch.equal(more.input_ids[:8], many.input_ids)


def test_the_model_is_left_as_it_was(make_model, tok, tmp_path):
    model = make_model("llama")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.train()
    trained = self_generated(model, tok, TOKENS_ONLY, cache_dir=tmp_path / "a")
    assert model.training  # put back
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    model.eval()
    assert _same(trained, self_generated(model, tok, TOKENS_ONLY, cache_dir=tmp_path / "b"))  # generated in eval mode


def test_another_model_does_not_share_the_cache(make_model, tok, tmp_path):
    a = self_generated(make_model("llama", seed=0), tok, TOKENS_ONLY, cache_dir=tmp_path)
    b = self_generated(make_model("llama", seed=1), tok, TOKENS_ONLY, cache_dir=tmp_path)
    assert a.path != b.path and b.generated == TOKENS_ONLY.sequences
    changed = make_model("llama", seed=0)
    with torch.no_grad():  # a middle layer only: the weight digest still sees it
        changed.model.layers[2].mlp.down_proj.weight.mul_(1.01)
    assert self_generated(changed, tok, TOKENS_ONLY, cache_dir=tmp_path).path not in (a.path, b.path)


def test_split_and_text(llama, tok, tmp_path):
    data = self_generated(llama, tok, SMALL, cache_dir=tmp_path)
    train, held = data.split(2)
    assert len(train) == 6 and len(held) == 2 and held.chat.tolist() == [True, False]  # both kinds held out
    rows = {tuple(r) for r in data.input_ids.tolist()}
    assert {tuple(r) for r in train.input_ids.tolist()} | {tuple(r) for r in held.input_ids.tolist()} == rows
    assert train.settings.sequences == 6
    with pytest.raises(DataError, match="held_out"):
        data.split(8)
    text = data.text()
    assert text.count("\n\n") == len(data) - 1
    path = data.to_text_file(tmp_path / "out" / "self.txt")
    assert path.read_text(encoding="utf-8") == text


def test_refusals(llama, tok, tmp_path):
    from skiplm import apply

    with pytest.raises(DataError, match="beyond the model's context of 256"):
        self_generated(llama, tok, dataclasses.replace(TOKENS_ONLY, length=300), cache_dir=tmp_path)
    with apply(llama, plan_for(llama, blocks=[1])), pytest.raises(DataError, match="skipper is installed"):
        self_generated(llama, tok, TOKENS_ONLY, cache_dir=tmp_path)
    with pytest.raises(DataError, match="longer than half of the length"):
        self_generated(llama, tok, dataclasses.replace(SMALL, length=MIN_LENGTH), cache_dir=tmp_path)
    for bad in (dict(length=MIN_LENGTH - 1), dict(batch_size=0), dict(temperature=-1.0), dict(top_p=0.0),
                dict(top_p=1.5), dict(sequences=0), dict(chat_fraction=1.5), dict(seed=-1)):
        with pytest.raises(DataError):
            GenerationSettings(**bad)


def test_the_chat_template_path(tiny_folder, tmp_path):
    from skiplm.models.loading import load_model

    model, tokenizer = load_model(str(tiny_folder))
    assert tokenizer.chat_template
    settings = GenerationSettings(sequences=2, length=256, batch_size=2, chat_fraction=1.0)
    data = self_generated(model, tokenizer, settings, cache_dir=tmp_path)
    assert data.chat.all() and data.input_ids.shape == (2, 256)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert int(data.input_ids[0, 0]) == start  # the rendered template, not the raw question
    assert "assistant" in tokenizer.decode(data.input_ids[0][~data.loss_mask[0] & data.attention_mask[0]])


def test_the_cli_writes_the_text_file(tiny_folder, tmp_path):
    out = tmp_path / "self.txt"
    args = ("self-generate", tiny_folder, "--sequences", 3, "--length", 16, "--batch-size", 2, "--chat-fraction", 0,
            "--cache-dir", tmp_path / "cache", "--out", out)
    result = run_cli(*args)
    assert result.exception is None, result.output
    assert "3 sequences x 16 tokens" in result.output and "tokens/s" in result.output
    assert "cache:" in result.output and str(tmp_path / "cache") in result.output
    assert out.read_text(encoding="utf-8").strip()
    manifest = json.loads(next((tmp_path / "cache").glob(f"*/{MANIFEST}")).read_text())
    assert sorted(manifest["chunks"]) == ["0", "1"]  # whole batches: 4 sequences generated for 3
    again = run_cli(*args)
    assert again.exception is None and "0 generated now, 3 from the cache" in again.output


def test_the_cli_defaults_are_the_library_defaults():
    from skiplm.cli import cli

    command = cli.commands["self-generate"]
    defaults = {p.name: p.default for p in command.params}
    for field in dataclasses.fields(GenerationSettings):
        if field.name in defaults:
            assert defaults[field.name] == field.default, field.name
    length = next(p for p in command.params if p.name == "length")
    assert length.type.min == MIN_LENGTH
