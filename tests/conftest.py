"""Tiny, seeded, randomly initialised models of every family skiplm supports (no network, no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import transformers

# Tiny tensors: intra-op threads only add overhead (on a 2-core machine, a 2-thread softmax of 200 floats takes ~8 ms).
torch.set_num_threads(1)

NUM_LAYERS = 5
VOCAB = 128
SLIDING_WINDOW = 8  # sequences in the tests are longer than this
ATTN_IMPLEMENTATION = "eager"

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2"]
SLIDING_FAMILIES = {"mistral", "gemma2", "gemma3_text"}

# The Linear that does the first piece of work of each branch (used to prove that a skipped branch does not run).
ATTENTION_PROBE = {"phi3": "qkv_proj"}  # default: q_proj
MLP_PROBE = {"phi3": "gate_up_proj"}  # default: gate_proj

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def _config(family: str, num_layers: int) -> transformers.PretrainedConfig:
    common = dict(_COMMON, num_hidden_layers=num_layers)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=SLIDING_WINDOW)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=8)
    if family == "gemma2":
        # Gemma 2 alternates sliding-window and global layers.
        return transformers.Gemma2Config(**common, head_dim=8, sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=8)
    if family == "gemma3_text":
        # Every 2nd layer global, the others sliding.
        layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
        return transformers.Gemma3TextConfig(
            **common, head_dim=8, sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=8, layer_types=layer_types
        )
    if family == "phi3":
        return transformers.Phi3Config(**common)
    if family == "olmo2":
        return transformers.Olmo2Config(**common)
    raise KeyError(family)


_MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
}


def tiny_model(family: str, *, seed: int = 0, num_layers: int = NUM_LAYERS) -> transformers.PreTrainedModel:
    """A tiny fp32 ``family`` model in eval mode, its weights drawn from ``seed``."""
    config = _config(family, num_layers)
    config._attn_implementation = ATTN_IMPLEMENTATION
    torch.manual_seed(seed)
    model = getattr(transformers, _MODEL_CLASSES[family])(config)
    # Random init with std 0.02 makes every layer nearly an identity; larger weights make skips visible in the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
    model.to(torch.float32).eval()
    model.generation_config.pad_token_id = config.pad_token_id
    return model


def tiny_gpt2(seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny model of a family skiplm does not support."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


_CACHE: dict[tuple[str, int, int], transformers.PreTrainedModel] = {}


def plan_for(model, **layers):
    """A plan skipping ``layers`` (blocks=, attention=, mlp=) stamped for ``model``."""
    from skiplm import SkipPlan

    return SkipPlan.from_layers(NUM_LAYERS, **layers).for_model(model)


def _fixed_masks_class():
    import dataclasses

    from skiplm.policies import HaltingPolicy

    @dataclasses.dataclass
    class FixedMasks(HaltingPolicy):
        """A test policy that runs given per-token masks: ``masks[part][layer]`` is a [batch, tokens] bool tensor."""

        masks: dict = dataclasses.field(default_factory=dict)
        attention: bool = False

        @property
        def skips_attention(self):  # type: ignore[override]
            return self.attention

        def run_mask(self, layer, part):
            return self.masks.get(part, {}).get(layer)

        def observe(self, *args):
            pass

    return FixedMasks


FixedMasks = _fixed_masks_class()


def replay(policy, maps, num_layers: int):
    """The decisions a policy recorded in ``maps`` (a prefill, then decode steps) as masks over the whole sequence,
    for one forward without a cache."""
    masks = {}
    for part in ("mlp", "attention"):
        grids = torch.cat([m.grid(part, num_layers) for m in maps], dim=2)  # [layers, batch, all tokens]
        masks[part] = {layer: grids[layer] for layer in policy.skippable}
    return FixedMasks(num_layers, {"prefill": 0.0}, protect_first=policy.protect_first,
                      protect_last=policy.protect_last, masks=masks, attention=policy.skips_attention)


def greedy_with_cache(model, ids, steps: int):
    """Greedy decoding of ``ids`` [1, T] with the KV cache, step by step: (the whole sequence, the logits of every
    next-token prediction [steps + 1, vocab])."""
    out = model(ids, use_cache=True)
    cache, logits, sequence = out.cache, [out.logits[:, -1]], ids
    for _ in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, token], dim=1)
        out = model(token, cache=cache, use_cache=True)
        cache = out.cache
        logits.append(out.logits[:, -1])
    return sequence, torch.cat(logits)


def cached_tiny_model(family: str, *, seed: int = 0, num_layers: int = NUM_LAYERS) -> transformers.PreTrainedModel:
    """Shared instance of :func:`tiny_model` (tests must not leave a plan applied or change its weights)."""
    key = (family, seed, num_layers)
    if key not in _CACHE:
        _CACHE[key] = tiny_model(family, seed=seed, num_layers=num_layers)
    return _CACHE[key]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(family):
    """A tiny model of each supported family; fails the test if a plan is left applied on it."""
    m = cached_tiny_model(family)
    yield m
    assert getattr(m, "_skiplm_handle", None) is None, "a test left a skip plan applied"


@pytest.fixture
def llama():
    m = cached_tiny_model("llama")
    yield m
    assert getattr(m, "_skiplm_handle", None) is None, "a test left a skip plan applied"


@pytest.fixture
def make_model():
    """Factory fixture: ``make_model(family, seed=..., num_layers=...)`` builds a fresh tiny model."""
    return tiny_model


@pytest.fixture
def ids() -> torch.Tensor:
    """A [1, 20] batch of token ids (longer than the sliding window), avoiding pad / bos / eos."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, VOCAB, (1, 20), generator=g)


# -- a tiny model saved as a folder with the real tokenizer, for the CLI -------------------------------------------
@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from skiplm.models.loading import _converted_gguf, default_gguf_path

    tokenizer = AutoTokenizer.from_pretrained(str(_converted_gguf(default_gguf_path(), "smollm2-135m")))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    folder = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_cli(*args):
    """Invoke the ``skiplm`` CLI in-process; the result's ``exception`` is the error a user would see."""
    from click.testing import CliRunner

    from skiplm.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], standalone_mode=False, catch_exceptions=True)


def heal_folder(model, out, *, name=None):
    """A bridge heal folder at ``out`` for ``model`` (a tiny model folder's: 4 blocks), block 1 skipped."""
    from skiplm import SkipPlan
    from skiplm.heal import heal

    g = torch.Generator().manual_seed(7)
    calibration = [torch.randint(3, 1000, (1, 32), generator=g) for _ in range(4)]
    plan = SkipPlan.from_layers(4, blocks=[1]).for_model(model, name=name)
    return heal(model, plan, "bridge", calibration=calibration).save(out)


@pytest.fixture(scope="session")
def tiny_heal(tiny_folder, tmp_path_factory):
    """A bridge heal folder for the tiny model folder (block 1 skipped), and the plan it heals as a plan file:
    ``.folder`` (named ``b1``, so its rows are ``b1 (healed)``), ``.plan_file`` (``b1.json``)."""
    import types

    from skiplm.models.loading import load_model

    model, _ = load_model(str(tiny_folder))
    root = tmp_path_factory.mktemp("heal")
    folder = heal_folder(model, root / "b1")
    from skiplm.heal import load_healed

    plan_file = load_healed(folder).plan.save(root / "plans" / "b1.json")
    return types.SimpleNamespace(folder=folder, plan_file=plan_file)
