"""The draft cache: a draft read back from disk is the draft built fresh, bit for bit, and decodes the same; a stale,
foreign, damaged or misfitting entry is rebuilt with a warning saying why; entries appear whole or not at all; it can
be turned off; the setup is reported apart from decoding."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from skiplm.speculative import SpeculativeDecoder
from skiplm.speculative import cache as draft_cache_module
from skiplm.speculative.cache import MANIFEST, WEIGHTS, DraftCache, resolve_draft_cache
from skiplm.speculative.lean import LeanDraft
from skiplm.speculative.quantize import CastLinear, DynamicInt8Linear, DraftWeights, Int8Linear, draft_copy

from conftest import cached_tiny_model, plan_for, run_cli, tiny_model
from test_speculative import left_padded, oracle

TOKENS = 16


@pytest.fixture
def cache_root(monkeypatch, tmp_path):
    """skiplm's cache in a temporary folder; the draft cache's root in it."""
    monkeypatch.setenv("SKIPLM_CACHE_DIR", str(tmp_path / "skiplm"))
    monkeypatch.delenv("SKIPLM_DRAFT_CACHE", raising=False)
    return tmp_path / "skiplm" / "drafts"


def _cache() -> DraftCache:
    return DraftCache(min_parameters=0)  # (tiny models are not stored by default)


def _product_state(product) -> dict[str, torch.Tensor]:
    """Everything a product computes with, as plain tensors (a packed int8-dynamic weight unpacked)."""
    if isinstance(product, DynamicInt8Linear):
        weight, bias = torch.ops.quantized.linear_unpack(product.packed)
        state = {"int8": weight.int_repr(), "scales": weight.q_per_channel_scales(),
                 "zero_points": weight.q_per_channel_zero_points()}
        return state if bias is None else {**state, "bias": bias}
    if isinstance(product, Int8Linear):
        return {name: t for name, t in (("weight", product.weight_int8), ("scale", product.scale),
                                        ("bias", product.bias)) if t is not None}
    assert isinstance(product, CastLinear)
    weight = product.weight if product.packed is None else product.packed.to_dense()
    return {"weight": weight} if product.bias is None else {"weight": weight, "bias": product.bias}


def _lean_state(lean: LeanDraft) -> dict[str, torch.Tensor]:
    state = {}
    for index, layer in enumerate(lean.layers):
        for part in ("qkv", "o", "gate_up", "down"):
            state.update({f"{index}.{part}.{k}": v for k, v in _product_state(getattr(layer, part)).items()})
        state.update({f"{index}.floors": torch.stack([layer.attention_floor, layer.mlp_floor]),
                      f"{index}.q_norm": layer.q_norm, f"{index}.k_norm": layer.k_norm})
    state.update({f"head.{k}": v for k, v in _product_state(lean.head).items()})
    return state


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def _lean_logits(lean: LeanDraft, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, cache = lean(ids, mask, positions, None, ids.shape[1])
    step, _ = lean(ids[:, -1:], torch.cat([mask, mask[:, -1:]], dim=1), positions[:, -1:] + 1, cache, 1)
    return torch.cat([logits, step], dim=1)


# -- a cached draft is the fresh one -----------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["int8-dynamic", "int8", "bfloat16"])
def test_a_cached_lean_draft_equals_a_fresh_one_bit_for_bit(cache_root, precision):
    model = cached_tiny_model("qwen3" if precision == "int8" else "llama")  # qwen3: query / key norms too
    fresh_weights = DraftWeights(precision)
    fresh = LeanDraft(model, precision, weights=fresh_weights)
    built = _cache().lean(model, precision)  # builds and stores
    entry = next(cache_root.iterdir())
    assert (entry / MANIFEST).is_file() and (entry / WEIGHTS).is_file()
    from safetensors.torch import load_file

    _assert_bitwise(load_file(entry / WEIGHTS), fresh_weights.tensors)  # every stored tensor, as computed fresh
    loaded_setup = draft_cache_module.SetupStats()
    loaded = _cache().lean(model, precision, loaded_setup)  # a new cache object: read from disk
    assert loaded_setup.draft_source == "disk" and loaded_setup.quantize_seconds < 0.05
    for other in (built, loaded):
        _assert_bitwise(_lean_state(other), _lean_state(fresh))
    ids, mask = left_padded([7, 11], seed=3)
    expected = _lean_logits(fresh, ids, mask)
    assert torch.equal(_lean_logits(loaded, ids, mask), expected)


@pytest.mark.parametrize("precision", ["int8-dynamic", "int8"])
def test_speculative_output_with_a_cached_draft_is_the_fresh_drafts_and_exact(cache_root, precision):
    model = cached_tiny_model("llama")
    ids, mask = left_padded([9, 5, 12], seed=8)
    plan = plan_for(model, blocks=[2])
    outputs, sources = [], []
    for draft_cache in (False, _cache(), _cache()):  # fresh (no cache), built and stored, read back
        with SpeculativeDecoder(model, plan, draft_dtype=precision, draft_cache=draft_cache) as decoder:
            result = decoder.generate(ids, mask, max_new_tokens=TOKENS, eos_token_id=[], fallback=False)
            outputs.append((result.tokens, result.stats.accepted, result.stats.drafted))
            sources.append(result.stats.setup.draft_source)
    assert sources == ["built", "built", "disk"]
    assert outputs[0] == outputs[1] == outputs[2]  # same tokens, and the same drafts accepted: the same draft
    assert outputs[0][0] == oracle(model, ids, mask, TOKENS)


def test_a_cached_modules_copy_equals_a_fresh_one(cache_root):
    model = cached_tiny_model("gemma2")  # the draft is a copy of its modules
    fresh = draft_copy(model, "int8-dynamic")
    _cache().modules_copy(model, "int8-dynamic")
    setup = draft_cache_module.SetupStats()
    loaded = _cache().modules_copy(model, "int8-dynamic", setup)
    assert setup.draft_source == "disk"
    fresh_modules, loaded_modules = dict(fresh.named_modules()), dict(loaded.named_modules())
    products = [name for name, module in fresh_modules.items() if isinstance(module, DynamicInt8Linear)]
    assert products
    for name in products:
        _assert_bitwise(_product_state(loaded_modules[name]), _product_state(fresh_modules[name]))
    _assert_bitwise(dict(loaded.state_dict()), dict(fresh.state_dict()))
    ids, mask = left_padded([6, 10], seed=4)
    with SpeculativeDecoder(model, draft_dtype="int8-dynamic", draft_cache=_cache(),
                            draft_engine="modules") as decoder:
        assert decoder.draft_engine == "modules" and decoder.setup.draft_source == "disk"
        assert decoder.generate(ids, mask, max_new_tokens=TOKENS, eos_token_id=[]).tokens == oracle(model, ids, mask,
                                                                                                  TOKENS)


# -- stale, foreign, damaged: rebuilt, with a message ------------------------------------------------------------------
def _build(model, precision="int8-dynamic"):
    setup = draft_cache_module.SetupStats()
    lean = _cache().lean(model, precision, setup)
    return lean, setup


def test_a_draft_cached_for_other_weights_is_rebuilt_with_a_message(cache_root, caplog):
    model = tiny_model("llama", seed=5)
    _build(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.5)  # other weights, same names and shapes
    with caplog.at_level(logging.WARNING, logger="skiplm.speculative.cache"):
        lean, setup = _build(model)
    assert setup.draft_source == "built" and "other weights" in setup.cache_note
    assert "not usable" in caplog.text and "other weights" in caplog.text
    _assert_bitwise(_lean_state(lean), _lean_state(LeanDraft(model, "int8-dynamic")))  # the new weights'
    assert len(list(cache_root.iterdir())) == 1  # the entry was replaced, not added to
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="skiplm.speculative.cache"):
        assert _build(model)[1].draft_source == "disk"  # the replaced entry serves the new weights
    assert not caplog.text


def _entry(cache_root):
    (entry,) = list(cache_root.iterdir())
    return entry


def _edit_manifest(entry, change):
    manifest = json.loads((entry / MANIFEST).read_text())
    change(manifest)
    (entry / MANIFEST).write_text(json.dumps(manifest))


def _truncate(entry):
    data = (entry / WEIGHTS).read_bytes()
    (entry / WEIGHTS).write_bytes(data[:len(data) // 2])


def _garble_header(entry):
    data = bytearray((entry / WEIGHTS).read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header after its length
    (entry / WEIGHTS).write_bytes(bytes(data))
    _edit_manifest(entry, lambda m: None)


def _misfit(entry):
    """A tensor of another shape, in a file that is otherwise whole and belongs to the entry."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(entry / WEIGHTS), framework="pt") as file:
        tensors = {name: file.get_tensor(name) for name in file.keys()}
        metadata = file.metadata()
    tensors["layers.0.o.weight"] = tensors["layers.0.o.weight"][:, :-1].contiguous()
    save_file(tensors, str(entry / WEIGHTS), metadata=metadata)
    _edit_manifest(entry, lambda m: m.update(bytes=(entry / WEIGHTS).stat().st_size))


DAMAGE = {
    "another torch": (lambda e: _edit_manifest(e, lambda m: m["key"].update(torch="1.0.0")), "made with torch 1.0.0"),
    "another precision": (lambda e: _edit_manifest(e, lambda m: m["key"].update(precision="int8")),
                          "holds a int8 draft"),
    "another model": (lambda e: _edit_manifest(e, lambda m: m["key"]["model"].update(fingerprint="0" * 16)),
                      "another model"),
    "another format": (lambda e: _edit_manifest(e, lambda m: m.update(version=99)), "not a version-1"),
    "unreadable manifest": (lambda e: (e / MANIFEST).write_text("{not json"), "manifest is unreadable"),
    "missing manifest": (lambda e: (e / MANIFEST).unlink(), "manifest is unreadable"),
    "missing weights": (lambda e: (e / WEIGHTS).unlink(), "is missing"),
    "truncated weights": (_truncate, "truncated"),
    "garbled weights": (_garble_header, "does not load"),
    "misfitting tensor": (_misfit, "does not fit this model"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_foreign_or_damaged_entry_is_rebuilt_with_a_message(cache_root, caplog, damage):
    model = cached_tiny_model("llama")
    fresh = LeanDraft(model, "int8-dynamic")
    _build(model)
    harm, phrase = DAMAGE[damage]
    harm(_entry(cache_root))
    with caplog.at_level(logging.WARNING, logger="skiplm.speculative.cache"):
        lean, setup = _build(model)
    assert setup.draft_source == "built", setup
    assert phrase in caplog.text and "Building the draft again" in caplog.text, caplog.text
    assert phrase in setup.cache_note
    _assert_bitwise(_lean_state(lean), _lean_state(fresh))
    assert _build(model)[1].draft_source == "disk"  # the rebuilt entry is whole again


# -- written whole or not at all ---------------------------------------------------------------------------------------
def test_an_entry_is_written_atomically(cache_root, caplog, monkeypatch):
    import safetensors.torch

    model = cached_tiny_model("llama")
    real_save = safetensors.torch.save_file

    def half_then_fail(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        with open(path, "r+b") as file:
            file.truncate(100)  # a half-written file ...
        raise OSError(28, "No space left on device")  # ... and the disk is full

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with caplog.at_level(logging.WARNING, logger="skiplm.speculative.cache"):
        lean, setup = _build(model)
    assert "Could not store the draft" in caplog.text and "not stored" in setup.cache_note
    assert not cache_root.exists() or not any(cache_root.iterdir())  # no entry, no half-written folder left
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)

    def interrupted(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        raise KeyboardInterrupt  # killed between the weights and the manifest

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _build(model)
    assert not cache_root.exists() or not any(cache_root.iterdir())
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert _build(model)[1].draft_source == "built"
    assert _build(model)[1].draft_source == "disk"
    assert [p.name for p in _entry(cache_root).iterdir()] != [] and not list(cache_root.glob(".*"))


# -- off, in the process, cleared, reported ----------------------------------------------------------------------------
def test_the_draft_cache_can_be_turned_off(cache_root, monkeypatch):
    model = cached_tiny_model("llama")
    monkeypatch.setattr(draft_cache_module, "MIN_PARAMETERS", 0)  # (the default cache stores tiny models too)
    with SpeculativeDecoder(model, draft_dtype="int8", draft_cache=False) as decoder:
        assert decoder.draft_cache is None and decoder.setup.draft_source == "built"
    assert not cache_root.exists()
    monkeypatch.setenv("SKIPLM_DRAFT_CACHE", "0")
    assert resolve_draft_cache(None) is None and resolve_draft_cache(True) is None
    with SpeculativeDecoder(model, draft_dtype="int8") as decoder:
        assert decoder.draft_cache is None
    assert not cache_root.exists()
    monkeypatch.delenv("SKIPLM_DRAFT_CACHE")
    with SpeculativeDecoder(model, draft_dtype="int8") as decoder:  # on by default
        assert decoder.draft_cache is not None and decoder.setup.cache_path.startswith(str(cache_root))
    assert len(list(cache_root.iterdir())) == 1
    assert DraftCache().clear() > 0 and not cache_root.exists()


def test_models_below_the_size_threshold_are_not_stored(cache_root):
    model = cached_tiny_model("llama")
    with SpeculativeDecoder(model, draft_dtype="int8") as decoder:
        assert decoder.draft_cache is not None and "not stored" in decoder.setup.cache_note
    assert not cache_root.exists()


def test_decoders_sharing_a_cache_share_the_engine_but_not_the_plan(cache_root):
    model = cached_tiny_model("llama")
    ids, mask = left_padded([8, 12], seed=9)
    shared = _cache()
    first = SpeculativeDecoder(model, plan_for(model, blocks=[1]), draft_dtype="int8-dynamic", draft_cache=shared)
    second = SpeculativeDecoder(model, draft_dtype="int8-dynamic", draft_cache=shared)
    assert first.setup.draft_source == "built" and second.setup.draft_source == "memory"
    assert second.draft_model.stack is first.draft_model.stack  # compiled once
    assert list(first.plan.decode.blocks) == [1] and not list(second.plan.decode.blocks)
    expected = oracle(model, ids, mask, TOKENS)
    for decoder in (first, second):
        assert decoder.generate(ids, mask, max_new_tokens=TOKENS, eos_token_id=[]).tokens == expected
    assert list(first.plan.decode.blocks) == [1]


def test_the_setup_is_reported_apart_from_decoding(cache_root):
    model = cached_tiny_model("llama")
    ids, mask = left_padded([8], seed=2)
    with SpeculativeDecoder(model, draft_dtype="int8-dynamic", draft_cache=_cache()) as decoder:
        first = decoder.generate(ids, mask, max_new_tokens=8, eos_token_id=[]).stats
        second = decoder.generate(ids, mask, max_new_tokens=8, eos_token_id=[]).stats
    setup = first.setup
    assert setup is decoder.setup and setup.seconds > 0 and first.setup_seconds == setup.seconds
    parts = setup.key_seconds + setup.quantize_seconds + setup.pack_seconds + setup.compile_seconds + \
        setup.warmup_seconds + setup.store_seconds + setup.head_seconds
    assert parts <= setup.seconds + 1e-6
    assert second.setup is None and second.setup_seconds == 0.0  # paid once per decoder
    assert "setup" in first.describe() and "setup" not in second.describe()
    data = first.to_json()
    assert data["setup_seconds"] == setup.seconds and data["setup"]["draft_source"] == "built"
    json.dumps(data)


def test_generate_reports_setup_and_takes_no_draft_cache(tiny_folder, cache_root, monkeypatch):
    monkeypatch.setattr(draft_cache_module, "MIN_PARAMETERS", 0)
    args = ["generate", tiny_folder, "--speculative", "--draft-dtype", "int8", "--prompt", "Hi",
            "--max-new-tokens", 6, "--prompt-lookup", 0]
    result = run_cli(*args, "--no-draft-cache")
    assert result.exit_code == 0, result.output
    assert not cache_root.exists() and "draft built now" in " ".join(result.output.split())
    for source in ("draft built now", "draft from the draft cache"):
        outcome = run_cli(*args)
        assert outcome.exit_code == 0, outcome.output
        printed = " ".join(outcome.output.split())  # (the console wraps lines)
        # (a one-shot command builds the draft in the background, while the first plain steps decode)
        assert "the draft built meanwhile in" in printed and source in printed, printed
    assert len(list(cache_root.iterdir())) == 1
    listing = run_cli("draft-cache")
    assert listing.exit_code == 0 and "int8 draft, lean engine" in listing.output
    assert run_cli("draft-cache", "--clear").exit_code == 0 and not cache_root.exists()


def _held_build(monkeypatch):
    """make_draft held until the returned event is set (a slow build, on the test's schedule)."""
    import threading

    from skiplm.speculative import decoder as decoder_module

    release, real = threading.Event(), decoder_module.make_draft

    def held(*args, **kwargs):
        assert release.wait(60), "the test never released the build"
        return real(*args, **kwargs)

    monkeypatch.setattr(decoder_module, "make_draft", held)
    return release


def test_a_draft_built_in_the_background_decodes_plain_steps_meanwhile_and_stays_exact(cache_root, monkeypatch):
    model = cached_tiny_model("llama")
    ids, mask = left_padded([7, 11], seed=5)
    release = _held_build(monkeypatch)
    steps = []

    def streamer(new):  # the build is released after five plain steps
        steps.append(new)
        if len(steps) == 5:
            release.set()

    decoder = SpeculativeDecoder(model, draft_dtype="int8-dynamic", draft_cache=_cache(), background=True)
    assert not decoder.draft_ready()  # the constructor did not wait
    result = decoder.generate(ids, mask, max_new_tokens=TOKENS, eos_token_id=[], streamer=streamer)
    stats = result.stats
    assert result.tokens == oracle(model, ids, mask, TOKENS)  # plain steps, then speculation: exact throughout
    assert stats.building_steps >= 5 and stats.rounds >= 1 and stats.plain_steps >= stats.building_steps
    # the steps taken while building (slowed by the build) never reach the speed monitor
    assert decoder.monitors[2].plain_observed <= stats.plain_steps - stats.building_steps
    assert stats.setup is decoder.setup and stats.setup.background and stats.draft_engine == "lean"
    assert "while the draft was being built" in stats.describe() and "built in the background" in stats.describe()
    again = decoder.generate(ids, mask, max_new_tokens=TOKENS, eos_token_id=[]).stats
    assert again.building_steps == 0 and again.setup is None and again.rounds >= 1
    decoder.close()


def test_a_generation_that_ends_before_the_background_build_is_all_plain(cache_root, monkeypatch):
    model = cached_tiny_model("llama")
    ids, mask = left_padded([6], seed=3)
    release = _held_build(monkeypatch)
    decoder = SpeculativeDecoder(model, draft_dtype="int8", draft_cache=_cache(), background=True)
    short = decoder.generate(ids, mask, max_new_tokens=4, eos_token_id=[])
    assert short.tokens == oracle(model, ids, mask, 4) and short.stats.rounds == 0
    assert short.stats.building_steps == short.stats.plain_steps == 3  # (the prefill gives the first token)
    assert short.stats.setup is None  # not done yet: reported with the generation that adopts the draft
    release.set()
    decoder.draft  # waits for the build
    later = decoder.generate(ids, mask, max_new_tokens=TOKENS, eos_token_id=[]).stats
    assert later.setup is decoder.setup and later.rounds >= 1 and later.building_steps == 0
    decoder.close()


def test_a_background_build_that_fails_raises_its_own_error(cache_root, monkeypatch):
    from skiplm.errors import PlanError
    from skiplm.speculative import decoder as decoder_module

    def failing(*args, **kwargs):
        raise PlanError("no draft today: try --draft-dtype int8.")

    monkeypatch.setattr(decoder_module, "make_draft", failing)
    model = cached_tiny_model("llama")
    ids, mask = left_padded([6], seed=3)
    decoder = SpeculativeDecoder(model, draft_dtype="int8", draft_cache=_cache(), background=True)
    with pytest.raises(PlanError, match="no draft today"):
        decoder.generate(ids, mask, max_new_tokens=TOKENS, eos_token_id=[])
    decoder.close()  # nothing to close; the error is not raised twice
