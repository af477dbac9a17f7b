"""GGUF export of block plans: tiny GGUFs written from seeded models, exported, and read back by transformers' GGUF
loader (the logits oracle) and, where llama-cpp-python is installed, by llama.cpp itself."""

from __future__ import annotations

import importlib.util

import gguf
import numpy as np
import pytest
import torch
import transformers

from skiplm import SkipPlan
from skiplm.errors import PlanError
from skiplm.export.gguf import (GGUFExportError, Precision, bits_per_weight, export_gguf, gguf_tensor,
                                hf_weights_by_gguf_name, layerwise_types)
from skiplm.files import OutputError

NUM_BLOCKS = 6
HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 64, 128, 4, 2, 96
ARCH = {"llama": "llama", "qwen2": "qwen2"}


def _config(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=NUM_BLOCKS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                  rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=True)  # as SmolLM2: no output.weight
    return transformers.Qwen2Config(**common, tie_word_embeddings=False)  # q/k/v biases and an output head


def write_tiny_gguf(path, family: str, matrix_type: str = "q8_0", seed: int = 0):
    """A GGUF of a seeded tiny model (no tokenizer: llama.cpp's 'none' vocabulary), matrices in ``matrix_type``."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(family)).eval()
    with torch.no_grad():  # norms away from 1, so a wrong norm layout shows in the logits
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    arch = ARCH[family]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(NUM_BLOCKS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("none")
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    state = model.state_dict()
    for name, hf_name in sorted(hf_weights_by_gguf_name(model, arch).items()):
        if name == "output.weight" and model.config.tie_word_embeddings:
            continue
        kind = matrix_type if state[hf_name].dim() == 2 else "f32"
        data, qtype = gguf_tensor(model, arch, name, state[hf_name], kind)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def load_gguf(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    model.config._name_or_path = str(path)
    return model


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def source(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}.gguf"
    return write_tiny_gguf(path, request.param)


IDS = torch.tensor([[5, 17, 42, 8, 91, 3, 60, 33, 12, 77]])


def logits(model, plan=None):
    with torch.no_grad():
        if plan is None:
            return model(IDS).logits
        with plan.install(model):
            return model(IDS).logits


@pytest.mark.parametrize("blocks", [[0], [NUM_BLOCKS - 1], [2, 3], [0, 2, 3, NUM_BLOCKS - 1]])
def test_exported_block_plan_gives_the_planned_models_logits(source, tmp_path, blocks):
    """First, last and consecutive blocks: the file has the kept blocks renumbered 0..n-1, their tensors copied
    byte for byte, and transformers reads it back as exactly the planned model."""
    model = load_gguf(source)
    plan = SkipPlan.from_layers(NUM_BLOCKS, blocks=blocks)
    result = export_gguf(model, plan, tmp_path / "out.gguf")
    kept = [b for b in range(NUM_BLOCKS) if b not in blocks]
    assert result.kept_blocks == kept and result.requantized == 0

    reader, original = gguf.GGUFReader(result.path), gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    assert reader.fields[f"{arch}.block_count"].contents() == len(kept)
    names = {t.name: t for t in reader.tensors}
    assert {int(n.split(".")[1]) for n in names if n.startswith("blk.")} == set(range(len(kept)))
    before = {t.name: t for t in original.tensors}
    for new, old in enumerate(kept):
        for suffix in ("attn_q.weight", "ffn_down.weight", "attn_norm.weight"):
            assert np.array_equal(names[f"blk.{new}.{suffix}"].data, before[f"blk.{old}.{suffix}"].data)
    assert len(names) == len(before) - len(blocks) * sum(n.startswith("blk.0.") for n in before)

    exported = load_gguf(result.path)
    assert exported.config.num_hidden_layers == len(kept)
    torch.testing.assert_close(logits(exported), logits(model, plan), rtol=0, atol=1e-5)


def test_changed_weights_are_quantized_again_and_read_back(source, tmp_path):
    """A weight that no longer matches the source (as healing leaves it) is written anew (Q8_0 by default); the
    export then follows the changed model, not the source."""
    model = load_gguf(source)
    plan = SkipPlan.from_layers(NUM_BLOCKS, blocks=[1])
    with torch.no_grad():
        model.model.layers[4].self_attn.q_proj.weight.mul_(1.5)
        model.model.layers[4].mlp.up_proj.weight.add_(0.05)
    result = export_gguf(model, plan, tmp_path / "changed.gguf")
    assert result.requantized == 2
    reader = gguf.GGUFReader(result.path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.3.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0  # old block 4 is new block 3
    exported = load_gguf(result.path)
    expected = logits(model, plan)
    got = logits(exported)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_uniform_and_layerwise_precision(source, tmp_path):
    model = load_gguf(source)
    plan = SkipPlan.from_layers(NUM_BLOCKS, blocks=[2])
    uniform = export_gguf(model, plan, tmp_path / "f16.gguf", precision="f16")
    assert set(uniform.block_types.values()) == {"f16"} and uniform.bits_per_weight == 16.0
    torch.testing.assert_close(logits(load_gguf(uniform.path)), logits(model, plan), rtol=0, atol=2e-2)

    importance = [0.1, 0.9, 0.5, 0.3, 0.8, 0.2]  # kept blocks 0,1,3,4,5 -> most important: 1, then 4
    layerwise = export_gguf(model, plan, tmp_path / "mixed.gguf", precision="layerwise:6.5:q4_0,q8_0",
                            importance=importance)
    # 6.5 bits = half-way between 4.5 and 8.5: 2 of the 5 kept blocks (floor) get Q8_0, the two most important
    assert layerwise.block_types == {0: "q4_0", 1: "q8_0", 2: "q4_0", 3: "q8_0", 4: "q4_0"}
    assert layerwise.bits_per_weight == pytest.approx((2 * 8.5 + 3 * 4.5) / 5)
    assert layerwise.bits_per_weight <= 6.5
    reader = gguf.GGUFReader(layerwise.path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.ffn_down.weight"] == "Q8_0" and types["blk.2.ffn_down.weight"] == "Q4_0"
    assert types["blk.2.attn_norm.weight"] == "F32"  # norms are never quantized
    exported = logits(load_gguf(layerwise.path))
    assert (exported.argmax(-1) == logits(model, plan).argmax(-1)).float().mean() >= 0.5


def test_layerwise_allocation():
    importance = {0: 3.0, 1: 1.0, 2: 2.0, 3: 0.0}
    assert layerwise_types(importance, 5.0, ["q4_0", "q5_0", "q8_0"]) == {0: "q5_0", 1: "q4_0", 2: "q5_0", 3: "q4_0"}
    assert layerwise_types(importance, 5.5, ["q4_0", "q5_0", "q8_0"]) == dict.fromkeys(importance, "q5_0")
    assert layerwise_types(importance, 4.5, ["q4_0", "q8_0"]) == dict.fromkeys(importance, "q4_0")
    assert bits_per_weight(gguf.GGMLQuantizationType.Q4_1) == 5.0
    assert Precision.parse("layerwise:5").types == ("q4_0", "q5_0", "q8_0")
    for bad in ["q3_x", "layerwise:", "layerwise:9:q4_0,q5_0", "layerwise:5:q4_0", "layerwise:5:q4_0,zz"]:
        with pytest.raises(GGUFExportError):
            Precision.parse(bad)


def test_refusals(source, tmp_path):
    model = load_gguf(source)
    with pytest.raises(PlanError, match="half a block"):
        export_gguf(model, SkipPlan.from_layers(NUM_BLOCKS, attention=[2]), tmp_path / "x.gguf")
    with pytest.raises(GGUFExportError, match="importance"):
        export_gguf(model, SkipPlan.from_layers(NUM_BLOCKS, blocks=[2]), tmp_path / "x.gguf", precision="layerwise:5")
    with pytest.raises(GGUFExportError, match=r"\.gguf"):
        export_gguf(model, SkipPlan.from_layers(NUM_BLOCKS, blocks=[2]), tmp_path / "x.bin")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(OutputError):
        export_gguf(model, SkipPlan.from_layers(NUM_BLOCKS, blocks=[2]), tmp_path / "dir.gguf")
    with pytest.raises(GGUFExportError, match="not loaded from one"):
        model.config._name_or_path = str(tmp_path)
        export_gguf(model, SkipPlan.from_layers(NUM_BLOCKS, blocks=[2]), tmp_path / "y.gguf")
    assert not list(tmp_path.glob("*.gguf*tmp*")) and not (tmp_path / "x.gguf").exists()


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed "
                    "(scripts/llama-cpp.sh builds it)")
def test_llama_cpp_runs_the_export(tmp_path):
    """llama.cpp itself loads the renumbered file and computes the planned model's logits (to its own precision:
    it quantizes activations for Q8_0 matrix products)."""
    import llama_cpp

    source = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    model = load_gguf(source)
    plan = SkipPlan.from_layers(NUM_BLOCKS, blocks=[0, 3, 4])
    result = export_gguf(model, plan, tmp_path / "out.gguf")
    llm = llama_cpp.Llama(str(result.path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(IDS[0].tolist())
    got = torch.tensor(np.array(llm.scores[: IDS.shape[1]]))
    expected = logits(model, plan)[0]
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()


def test_a_healed_plan_exports_the_healed_weights(tmp_path):
    """A bridge-healed plan (the map folded into a kept down projection): the GGUF gives the healed model's logits,
    not the unhealed plan's; only the tensors healing changed are written anew."""
    from skiplm.heal import heal

    source = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    model = load_gguf(source)
    plan = SkipPlan.from_layers(NUM_BLOCKS, blocks=[3]).for_model(model)
    g = torch.Generator().manual_seed(0)
    healed = heal(model, plan, "bridge", calibration=[torch.randint(3, VOCAB, (1, 48), generator=g) for _ in range(8)])
    result = export_gguf(model, plan, tmp_path / "healed.gguf", healed=healed)
    assert 1 <= result.requantized <= 2 and result.record["healed"] == "bridge"
    with torch.no_grad(), healed.install(model, merge="restorable"):
        expected = model(IDS).logits
    unhealed = logits(model, plan)
    got = logits(load_gguf(result.path))
    assert (got - expected).abs().max() < 0.2 * (unhealed - expected).abs().max()
    torch.testing.assert_close(logits(model, plan), unhealed)  # the model itself is left as it was


@pytest.mark.slow
def test_cli_exports_the_default_model(tmp_path):
    """`skiplm export --format gguf` on the shipped model: a 27-block file, tensors copied, the planned logits."""
    import skiplm
    from conftest import run_cli

    plan_file = tmp_path / "plan.json"
    SkipPlan.from_layers(30, blocks=[0, 14, 15, 29]).save(plan_file)
    out = tmp_path / "smol.gguf"
    result = run_cli("export", "--plan", plan_file, "-o", out)
    assert result.exception is None, result.output
    assert "26 blocks (Q4_1 x26; 5.00 bits/weight)" in " ".join(result.output.split())
    reader = gguf.GGUFReader(out)
    assert reader.fields["llama.block_count"].contents() == 26
    assert reader.fields["tokenizer.chat_template"].contents().startswith("{% for message")
    model, tokenizer = skiplm.load_model()
    ids = tokenizer("Natalia sold clips to 48 of her friends", return_tensors="pt").input_ids
    with torch.no_grad():
        exported = load_gguf(out)(ids).logits
        with SkipPlan.from_layers(30, blocks=[0, 14, 15, 29]).install(model, check_model=False):
            planned = model(ids).logits
    torch.testing.assert_close(exported, planned, rtol=0, atol=1e-4)
    bad = run_cli("export", "--plan", plan_file, "-o", tmp_path / "b.gguf", "--quantize", "q3_x")
    assert isinstance(bad.exception, GGUFExportError) and "unknown precision" in str(bad.exception)
