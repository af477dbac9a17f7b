"""Inputs a model cannot take, refused clearly before any weights load or any token is generated: folders and files
that are not loadable models (`ModelLoadError` naming the path and what is wrong), devices this torch cannot use, and
prompts longer than the model's context (refused saying both lengths, or truncated only when asked)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
import transformers

import skiplm
from skiplm.errors import DataError, DeviceError, ModelLoadError, UnsupportedArchitectureError, UnsupportedModelError
from skiplm.measure.agreement import Prompt, measure_agreement
from skiplm.models.generation import (check_context, context_length, eos_token_ids, fit_context, greedy_continuations,
                                      greedy_decode, left_pad)


@pytest.fixture
def folder(tiny_folder, tmp_path):
    """A writable copy of the tiny model folder, to damage."""
    copy = tmp_path / "model"
    shutil.copytree(tiny_folder, copy)
    return copy


@pytest.fixture
def no_weights_loaded(monkeypatch):
    """Fails the test if transformers is asked to load weights (the refusal must come first)."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the folder was refused")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


# -- folders that are not loadable models ------------------------------------------------------------------------------
def test_folder_with_only_a_config(folder, no_weights_loaded):
    only = folder.parent / "config-only"
    only.mkdir()
    shutil.copy(folder / "config.json", only)
    with pytest.raises(ModelLoadError, match="no weights") as info:
        skiplm.load_model(str(only))
    assert str(only) in str(info.value) and "model.safetensors" in str(info.value)


@pytest.mark.parametrize("keep", [0, 100, "half"])
def test_truncated_safetensors(folder, no_weights_loaded, keep):
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2 if keep == "half" else keep])
    with pytest.raises(ModelLoadError, match="is empty" if keep == 0 else "truncated or corrupt") as info:
        skiplm.load_model(str(folder))
    assert str(weights) in str(info.value) and "re-download" in str(info.value)


def test_missing_shard(folder, no_weights_loaded):
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors",
                                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="2 are missing.*incomplete"):
        skiplm.load_model(str(folder))


def test_unsupported_architecture_is_refused_before_its_weights_load(folder, no_weights_loaded):
    transformers.GPT2Config(n_layer=2).save_pretrained(folder)  # a family transformers knows and skiplm does not
    with pytest.raises(UnsupportedModelError, match="'gpt2' model, a family skiplm has no adapter for") as info:
        skiplm.load_model(str(folder))
    assert isinstance(info.value, ModelLoadError) and isinstance(info.value, UnsupportedArchitectureError)
    assert "llama" in str(info.value)  # the supported families are listed


def test_unknown_architecture(folder, no_weights_loaded):
    _edit_config(folder, model_type="no_such_family", architectures=["NoSuchForCausalLM"])
    with pytest.raises(ModelLoadError, match="'no_such_family', which this transformers .* does not know"):
        skiplm.load_model(str(folder))


@pytest.mark.parametrize("text, phrase", [("{not json", "not readable JSON"), ("[1, 2]", "not a model config"),
                                          ('{"hidden_size": 32}', 'no "model_type"')])
def test_unreadable_config(folder, no_weights_loaded, text, phrase):
    (folder / "config.json").write_text(text)
    with pytest.raises(ModelLoadError, match=phrase) as info:
        skiplm.load_model(str(folder))
    assert str(folder) in str(info.value)


def test_missing_tokenizer(folder, no_weights_loaded):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="has no tokenizer.*tokenizer.save_pretrained") as info:
        skiplm.load_model(str(folder))
    assert str(folder) in str(info.value)


def test_weights_that_do_not_match_the_config(folder):
    _edit_config(folder, hidden_size=64)
    with pytest.raises(ModelLoadError, match="other shapes than its config.json"):
        skiplm.load_model(str(folder))


@pytest.mark.parametrize("content, phrase", [(b"", "it is empty"),
                                             (b"not a gguf at all", "it does not start with the GGUF magic bytes")])
def test_file_named_gguf_that_is_not_one(tmp_path, monkeypatch, content, phrase):
    monkeypatch.setenv("SKIPLM_CACHE_DIR", str(tmp_path / "cache"))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(content)
    with pytest.raises(ModelLoadError, match=f"is not a GGUF file: {phrase}") as info:
        skiplm.load_model(str(fake))
    assert str(fake) in str(info.value)
    assert not (tmp_path / "cache").exists()  # refused before a conversion was started


def test_damaged_converted_copy_says_how_to_rebuild(tmp_path, monkeypatch):
    from skiplm.models import loading

    monkeypatch.setenv("SKIPLM_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    stat = gguf.stat()  # the cache key, as loading._converted_gguf makes it
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    cached = loading.cache_dir() / "models" / f"tiny-{key}"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (cached / "model.safetensors").write_bytes(b"\x10\x00")  # a copy cut short (say, a full disk)
    with pytest.raises(ModelLoadError, match=f"truncated or corrupt.*delete {cached}"):
        skiplm.load_model(str(gguf))


# -- devices: checked before anything is read ------------------------------------------------------------------------
def test_unusable_device_is_refused_before_loading(folder, no_weights_loaded):
    (folder / "model.safetensors").unlink()  # the device must be refused first, not the folder
    with pytest.raises(DeviceError, match="not a device"):
        skiplm.load_model(str(folder), device="foo")
    with pytest.raises(DeviceError, match="does not run models on 'meta'"):
        skiplm.load_model(str(folder), device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="--device cpu"):
            skiplm.load_model(str(folder), device="cuda")


def test_load_model_takes_a_torch_device(tiny_folder):
    model, _ = skiplm.load_model(str(tiny_folder), device=torch.device("cpu"))
    assert next(model.parameters()).device.type == "cpu"


# -- prompts longer than the context -----------------------------------------------------------------------------------
CONTEXT = 24


@pytest.fixture(scope="module")
def short_context():
    """A tiny llama whose context is 24 positions."""
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = 2
    return model


def _prompt(length: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 128, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_context_length(short_context):
    assert context_length(short_context) == CONTEXT
    assert context_length(torch.nn.Linear(2, 2)) is None  # no config: nothing to check against
    assert check_context(torch.nn.Linear(2, 2), 10**6, 10) == 10**6


def test_check_context_says_both_lengths(short_context):
    assert check_context(short_context, 20, 4) == 20  # exactly fits
    with pytest.raises(DataError) as info:
        check_context(short_context, 21, 4)
    message = str(info.value)
    assert "the prompt is 21 tokens and 4 new tokens are asked for (25 in all)" in message
    assert f"context is {CONTEXT} tokens" in message and "--truncate-prompt" in message
    assert check_context(short_context, 21, 4, truncate=True) == 20  # the last 20 tokens fit with 4 more
    with pytest.raises(DataError, match=f"ask for at most {CONTEXT - 1} new tokens"):
        check_context(short_context, 5, CONTEXT, truncate=True)  # no prompt fits beside that many new tokens


def test_plain_generation_refuses_a_prompt_beyond_the_context(short_context):
    with pytest.raises(DataError, match=f"the longest prompt is 30 tokens and 8 new tokens .* context is {CONTEXT}"):
        greedy_continuations(short_context, [_prompt(5), _prompt(30)], new_tokens=8, eos_ids=[2], pad_token_id=0)
    # hf generate, as `skiplm generate` runs it: the inputs are checked first
    inputs = {"input_ids": torch.tensor([_prompt(30)]), "attention_mask": torch.ones(1, 30, dtype=torch.long)}
    with pytest.raises(DataError, match=f"the prompt is 30 tokens and 8 new tokens .* context is {CONTEXT}"):
        fit_context(short_context, inputs, 8)


def test_truncation_keeps_the_output_of_the_truncated_prompt(short_context):
    prompt = _prompt(30)
    inputs = {"input_ids": torch.tensor([prompt]), "attention_mask": torch.ones(1, 30, dtype=torch.long)}
    fitted = fit_context(short_context, inputs, 8, truncate=True)
    assert fitted["input_ids"].tolist() == [prompt[-16:]] and fitted["attention_mask"].shape == (1, 16)
    kept = torch.tensor([prompt[-16:]])
    expected = short_context.generate(kept, attention_mask=torch.ones_like(kept), max_new_tokens=8, do_sample=False,
                                      pad_token_id=0)
    got = short_context.generate(**fitted, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)
    # the tensors the speculative decoder verifies with (left padded, with a mask) are cut the same way
    ids, mask = left_pad([prompt, prompt[:20]], 0)
    fitted = fit_context(short_context, {"input_ids": ids, "attention_mask": mask}, 8, truncate=True)
    assert fitted["input_ids"].shape == fitted["attention_mask"].shape == (2, 16)
    assert greedy_decode(short_context, fitted["input_ids"], fitted["attention_mask"], 8, [2], 0) == \
        greedy_decode(short_context, *left_pad([prompt[-16:], prompt[4:20]], 0), 8, [2], 0)
    # what fits is left alone
    small = {"input_ids": torch.tensor([prompt[:10]])}
    assert fit_context(short_context, small, 8, truncate=True)["input_ids"].tolist() == [prompt[:10]]


class _Tokenizer:
    """Raw token ids in and out (no chat template): enough for measure_agreement."""

    chat_template = None
    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True):
        return type("Encoded", (), {"input_ids": [int(t) for t in text.split()]})()

    def decode(self, tokens, skip_special_tokens=True):
        return " ".join(map(str, tokens))


def test_agreement_refuses_or_truncates_long_prompts(short_context):
    long, short = _prompt(30, seed=1), _prompt(6, seed=2)
    prompts = [Prompt(" ".join(map(str, long))), Prompt(" ".join(map(str, short)))]
    plans = {"skip": skiplm.SkipPlan.from_layers(2, mlp=[1])}
    tokenizer = _Tokenizer()
    assert eos_token_ids(short_context, tokenizer) == [2]
    with pytest.raises(DataError, match="the longest prompt is 30 tokens and 8 new tokens"):
        measure_agreement(short_context, tokenizer, prompts, plans, new_tokens=8, chat=False)
    result = measure_agreement(short_context, tokenizer, prompts, plans, new_tokens=8, chat=False, truncate=True)
    assert result["settings"]["truncated_prompts"] == 1
    assert [p["prompt_tokens"] for p in result["per_prompt"]] == [16, 6]
    cut = measure_agreement(short_context, tokenizer, [Prompt(" ".join(map(str, long[-16:]))), prompts[1]], plans,
                            new_tokens=8, chat=False)
    for name in ("full", "skip"):
        assert [p[name]["tokens"] for p in result["per_prompt"]] == [p[name]["tokens"] for p in cut["per_prompt"]]


# -- the paths users call: `skiplm generate`, plain and speculative ------------------------------------------------
@pytest.mark.parametrize("speculative", [False, True])
def test_generate_refuses_a_prompt_beyond_the_context(tiny_folder, tmp_path, speculative):
    from conftest import run_cli

    model, _ = skiplm.load_model(str(tiny_folder))
    context = context_length(model)  # 512
    plan = skiplm.SkipPlan.from_layers(4, blocks=[1]).for_model(model).save(tmp_path / "plan.json")
    extra = ["--speculative", "--plan", plan] if speculative else []
    result = run_cli("generate", tiny_folder, "--raw", "--prompt", "word " * (context + 20), "--max-new-tokens", 8,
                     *extra)
    assert isinstance(result.exception, DataError), result.output
    message = str(result.exception)
    assert f"context is {context} tokens" in message and "8 new tokens are asked for" in message
    assert "the prompt is" in message and "--truncate-prompt" in message
