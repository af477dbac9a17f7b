"""`skiplm analyze`: every metric against a direct computation on tiny models, and the CLI's files."""

import json
import math

import click
import pytest
import torch

import skiplm
from skiplm.analysis.importance import UNITS, AnalysisResult, _spearman, analysis_steps, analyze, write_analysis
from skiplm.models.data import load_corpus
from skiplm.errors import DataError, SkipLMError

from conftest import FAMILIES, NUM_LAYERS, VOCAB, cached_tiny_model, run_cli

# The module whose output is what a branch adds to the residual stream (found independently of skiplm's adapters:
# the post-norm for the families that normalise a branch's output, else the attention / MLP module itself).
POST_NORMED = {"gemma2", "gemma3_text", "olmo2"}
SPAN_MAX = NUM_LAYERS


def branch_output_module(family: str, part: str) -> str:
    if family in POST_NORMED:
        return "post_attention_layernorm" if part == "attention" else "post_feedforward_layernorm"
    return "self_attn" if part == "attention" else "mlp"


def calibration(seed: int = 0, batches: int = 2, length: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (1, length), generator=g) for _ in range(batches)]


@torch.inference_mode()
def direct_states(model, family, batches):
    """Per layer: (block input, mid, block output) [N, d] each, and the final logits [N, vocab], captured by hand:
    hidden_states from transformers, branch outputs from forward hooks, the last output from the final norm's input."""
    layers = model.model.layers
    attention_out, mlp_out, last = [[] for _ in layers], [[] for _ in layers], []
    handles = []
    for index, layer in enumerate(layers):
        for part, store in (("attention", attention_out), ("mlp", mlp_out)):
            module = getattr(layer, branch_output_module(family, part))
            handles.append(module.register_forward_hook(
                lambda m, args, out, store=store, index=index: store[index].append(
                    (out[0] if isinstance(out, tuple) else out).reshape(-1, out_dim(model)))))
    handles.append(model.model.norm.register_forward_pre_hook(lambda m, args: last.append(args[0].reshape(-1, out_dim(model)))))
    hidden, logits = [], []
    try:
        for ids in batches:
            out = model(ids, output_hidden_states=True, use_cache=False)
            hidden.append([h.reshape(-1, out_dim(model)) for h in out.hidden_states[:-1]])  # [-1] is after the norm
            logits.append(out.logits.reshape(-1, out.logits.shape[-1]))
    finally:
        for handle in handles:
            handle.remove()
    block_in = [torch.cat([h[index] for h in hidden]) for index in range(len(layers))] + [torch.cat(last)]
    mids = [block_in[index] + torch.cat(attention_out[index]) for index in range(len(layers))]
    for index in range(len(layers)):  # the hand-built mid is consistent with the next block input
        assert torch.allclose(mids[index] + torch.cat(mlp_out[index]), block_in[index + 1], atol=1e-4)
    return block_in, mids, torch.cat(logits)


def out_dim(model) -> int:
    return model.config.hidden_size


def io(block_in, mids, layer, unit):
    if unit == "attention":
        return block_in[layer], mids[layer]
    if unit == "mlp":
        return mids[layer], block_in[layer + 1]
    return block_in[layer], block_in[layer + 1]


def close(a, b, tol=1e-4):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, rtol=tol, atol=tol), (a, b)


_RESULTS = {}


def analysis_of(family, skip_one=False):
    key = (family, skip_one)
    if key not in _RESULTS:
        _RESULTS[key] = analyze(cached_tiny_model(family), calibration(), span_max=SPAN_MAX, skip_one=skip_one,
                                corpus="random", model_name=f"tiny-{family}")
    return _RESULTS[key]


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_metrics_match_a_direct_computation(family):
    model = cached_tiny_model(family)
    result = analysis_of(family)
    block_in, mids, _ = direct_states(model, family, calibration())
    cos = torch.nn.functional.cosine_similarity
    for unit in UNITS:
        pairs = [io(block_in, mids, layer, unit) for layer in range(NUM_LAYERS)]
        close(result.cosine[unit], [cos(a, b, dim=-1).mean() for a, b in pairs])
        close(result.relative_contribution[unit], [((b - a).norm(dim=-1) / a.norm(dim=-1)).mean() for a, b in pairs])
        close(result.l2_norm_change[unit], [(b.norm(dim=-1) - a.norm(dim=-1)).abs().mean() for a, b in pairs])
    close(result.block_influence, [1 - c for c in result.cosine["block"]], tol=1e-6)
    close(result.residual_norm, [h.norm(dim=-1).mean() for h in block_in])
    assert sorted(result.angular_distance) == list(range(1, SPAN_MAX + 1))
    for n, values in result.angular_distance.items():
        expected = [(torch.arccos(cos(block_in[l], block_in[l + n], dim=-1).clamp(-1, 1)) / math.pi).mean()
                    for l in range(NUM_LAYERS - n + 1)]
        close(values, expected)


@pytest.mark.parametrize("family", ["llama", "gemma2", "olmo2"])
def test_logit_lens_matches_the_head_applied_by_hand(family):
    model = cached_tiny_model(family)
    result = analysis_of(family)
    block_in, _, final_logits = direct_states(model, family, calibration())
    cap = getattr(model.config, "final_logit_softcapping", None)  # gemma2: 30.0
    reference = torch.log_softmax(final_logits, dim=-1)
    kls, top1 = [], []
    with torch.inference_mode():
        for state in block_in:
            logits = model.lm_head(model.model.norm(state))
            if cap:
                logits = torch.tanh(logits / cap) * cap
            early = torch.log_softmax(logits, dim=-1)
            kls.append((reference.exp() * (reference - early)).sum(-1).mean())
            top1.append((early.argmax(-1) == reference.argmax(-1)).float().mean())
    close([result.logit_lens_kl_embeddings] + result.logit_lens_kl, kls)
    close(result.logit_lens_top1, top1[1:])
    assert result.logit_lens_kl[-1] < 1e-5 and result.logit_lens_top1[-1] == 1.0  # the exit after the last layer is the model
    assert max(result.logit_lens_kl) > 0.01
    close(result.logit_lens_gain(), [kls[i] - kls[i + 1] for i in range(NUM_LAYERS)])


@pytest.mark.parametrize("family", ["llama", "gemma2", "olmo2"])
def test_skip_one_matches_running_the_model_under_a_plan(family):
    model = cached_tiny_model(family)
    result = analysis_of(family, skip_one=True)
    batches = calibration()
    ids = torch.cat(batches)

    def loss_and_logits():
        logits = model(ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        return loss.item(), logits.reshape(-1, VOCAB)

    with torch.inference_mode():
        full_loss, full_logits = loss_and_logits()
        assert math.isclose(result.full_loss, full_loss, rel_tol=1e-5)
        reference = torch.log_softmax(full_logits, dim=-1)
        for layer in range(NUM_LAYERS):
            for unit in UNITS:
                plan = skiplm.SkipPlan.from_layers(NUM_LAYERS, **{"blocks" if unit == "block" else unit: [layer]})
                with skiplm.apply(model, plan, check_model=False):
                    loss, logits = loss_and_logits()
                kl = (reference.exp() * (reference - torch.log_softmax(logits, dim=-1))).sum(-1).mean().item()
                assert math.isclose(result.skip_one_loss_increase[unit][layer], loss - full_loss, rel_tol=1e-4,
                                    abs_tol=1e-5), (unit, layer)
                assert math.isclose(result.skip_one_kl[unit][layer], kl, rel_tol=1e-4, abs_tol=1e-6), (unit, layer)
    assert min(result.skip_one_kl["block"]) > 0  # every skip changes the tiny model's output


@pytest.mark.parametrize("family", ["llama", "gemma2", "olmo2", "phi3"])
def test_zd_matches_z_scores_by_hand(family):
    model = cached_tiny_model(family)
    result = analysis_of(family)
    prefixes = {"attention": "self_attn.", "mlp": "mlp.", "block": ""}
    for unit, prefix in prefixes.items():
        expected = []
        for layer in range(NUM_LAYERS):
            count = size = 0
            for name, weight in model.named_parameters():
                if name.startswith(f"model.layers.{layer}.{prefix}") and weight.dim() == 2:
                    z = (weight - weight.mean()) / weight.std()
                    count += int((z.abs() > 1).sum())
                    size += weight.numel()
            expected.append(count / size)
        close(result.zd[unit], expected, tol=1e-9)
    assert all(0.25 < v < 0.4 for v in result.zd["block"])  # Gaussian-initialised weights: about 0.317


def test_result_json_settings_columns_and_progress():
    model = cached_tiny_model("llama")
    batches = calibration(batches=3, length=10)
    steps = []
    result = analyze(model, batches, skip_one=False, corpus="random", model_name="tiny", progress=steps.append)
    assert len(steps) == analysis_steps(NUM_LAYERS, 3, skip_one=False)
    data = json.loads(json.dumps(result.to_json()))
    assert data["settings"] | {"seconds": 0} == {"corpus": "random", "sequences": 3, "length": 10, "tokens": 30,
                                                 "span_max": 1, "skip_one": False, "dtype": "float32", "seconds": 0}
    metrics = data["metrics"]
    assert metrics["skip_one_loss_increase"] is None and metrics["skip_one_kl"] is None
    assert list(metrics["angular_distance"]) == ["1"] and len(metrics["angular_distance"]["1"]) == NUM_LAYERS
    assert len(metrics["residual_norm"]) == NUM_LAYERS + 1
    assert set(data["definitions"]) >= {"cosine", "l2_norm_change", "logit_lens_kl", "zd", "skip_one_kl"}
    assert all(len(column.values) == NUM_LAYERS for column in result.columns())
    assert "skip Δloss block" not in [c.label for c in result.columns()]
    assert data["agreement"]["spearman"][0][0] == pytest.approx(1.0)
    assert AnalysisResult.from_json(data).to_json() == data  # an analysis.json can be re-plotted


def test_spearman():
    assert _spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert _spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_bad_input_is_refused():
    model = cached_tiny_model("llama")
    with pytest.raises(DataError, match="at least one"):
        analyze(model, [])
    with pytest.raises(DataError, match="at least 2 tokens"):
        analyze(model, [torch.tensor([[5]])])
    with pytest.raises(SkipLMError, match="span_max must be in 1..5"):
        analyze(model, calibration(), span_max=6)


def test_write_analysis_without_skip_one(tmp_path):
    paths = write_analysis(analysis_of("olmo2"), tmp_path)
    for kind in ("heatmap", "lines", "angular", "agreement"):
        assert paths[kind].stat().st_size > 5000
    assert "| 4 |" in (tmp_path / "analysis.md").read_text()





def test_cli_analyze_writes_json_markdown_and_plots(tiny_folder, tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text(load_corpus("pydoc")[:4000])
    out = tmp_path / "analysis"
    result = run_cli("analyze", tiny_folder, "--corpus", corpus, "--sequences", 2, "--length", 16, "--span-max", 2,
                     "-o", out)
    assert result.exception is None, result.output
    data = json.loads((out / "analysis.json").read_text())
    assert data["model"] == str(tiny_folder) and data["num_layers"] == 4
    assert data["settings"]["corpus"] == "text.txt" and data["settings"]["tokens"] == 32
    assert "machine" in data
    metrics = data["metrics"]
    for key in ("cosine", "relative_contribution", "l2_norm_change", "skip_one_loss_increase", "skip_one_kl", "zd"):
        assert set(metrics[key]) == set(UNITS) and all(len(v) == 4 for v in metrics[key].values()), key
    for key in ("block_influence", "logit_lens_kl", "logit_lens_top1"):
        assert len(metrics[key]) == 4, key
    assert {n: len(v) for n, v in metrics["angular_distance"].items()} == {"1": 4, "2": 3}
    for name in ("heatmap.png", "metrics.png", "angular_distance.png", "agreement.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    assert "skip Δloss block" in (out / "analysis.md").read_text()
    assert "BI" in result.output and "blk↑" in result.output  # the table


def test_cli_analyze_explains_bad_input(tiny_folder, tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_text("Only a few words here.")
    result = run_cli("analyze", tiny_folder, "--corpus", corpus, "--sequences", 4, "--length", 64, "-o", tmp_path / "a")
    assert isinstance(result.exception, DataError)
    assert "short.txt" in str(result.exception) and "256 tokens (4 x 64)" in str(result.exception)
    result = run_cli("analyze", tiny_folder, "--corpus", corpus, "--span-max", 9, "--no-skip-one", "--length", 2,
                     "--sequences", 1, "-o", tmp_path / "b")
    assert isinstance(result.exception, click.BadParameter) and "model's 4 layers" in str(result.exception)
