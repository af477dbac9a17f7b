"""CoLa chain search: chains run the model's own layers in a new order, and the MCTS finds the known optimum."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from skiplm.analysis.cola import ChainScorer, chain_of, chained, search
from skiplm.errors import DataError, PlanError

from conftest import VOCAB, run_cli, tiny_model

LAYERS = 5


def test_chain_of_actions():
    assert chain_of([1, 0, 2, 1]) == (0, 2, 2, 3)
    assert chain_of([0, 0]) == ()


def test_the_full_chain_is_the_full_model_and_chains_are_restored():
    model = tiny_model("gemma3_text", num_layers=LAYERS)  # sliding and global layers: layer_types follow the chain
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    reference = model(ids).logits
    with chained(model, range(LAYERS)):
        assert torch.equal(model(ids, use_cache=False).logits, reference)
    with chained(model, (0, 1, 1, 4)):
        looped = model(ids, use_cache=False).logits
        assert model.config.num_hidden_layers == 4
    assert not torch.allclose(looped, reference)
    assert model.config.num_hidden_layers == LAYERS and len(model.model.layers) == LAYERS
    assert torch.equal(model(ids).logits, reference)


def test_a_repeated_layer_is_applied_twice():
    """Running (0, 0) equals applying layer 0's module to its own output (checked by hand with the module)."""
    model = tiny_model("llama", num_layers=2)
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    captured = []
    hook = model.model.layers[0].register_forward_hook(lambda m, args, out: captured.append(out))
    with chained(model, (0, 0)):
        model(ids, use_cache=False)
    hook.remove()
    assert len(captured) == 2 and not torch.equal(captured[0], captured[1])


def test_bad_chains_and_samples_are_refused():
    model = tiny_model("llama", num_layers=2)
    with pytest.raises(PlanError, match="at least one"):
        with chained(model, ()):
            pass
    with pytest.raises(PlanError, match="outside"):
        with chained(model, (0, 5)):
            pass
    with pytest.raises(DataError, match="non-empty"):
        ChainScorer(model, [5, 6], [])


def _planted_model():
    """Layers 1 and 3 are exact identities (their output projections are zero): skipping them changes nothing."""
    model = tiny_model("llama", num_layers=LAYERS, seed=3)
    with torch.no_grad():
        for layer in (1, 3):
            model.model.layers[layer].self_attn.o_proj.weight.zero_()
            model.model.layers[layer].mlp.down_proj.weight.zero_()
    return model


def _exhaustive(scorer: ChainScorer):
    """Every chain of the search space, scored."""
    scores = [scorer(chain_of(actions)) for actions in itertools.product((0, 1, 2), repeat=LAYERS) if any(actions)]
    return [s for s in scores if s.kept]


def test_search_finds_the_shortest_chain_that_keeps_the_answer():
    model = _planted_model()
    prompt = torch.randint(3, VOCAB, (12,), generator=torch.Generator().manual_seed(7)).tolist()
    answer = model.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False)[0, 12:].tolist()
    kept = _exhaustive(ChainScorer(model, prompt, answer))
    optimum = min(len(s.chain) for s in kept)
    assert optimum <= LAYERS - 2  # the planted identities can go
    result = search(model, prompt, answer, iterations=400, seed=0)
    assert result.full.kept
    assert result.shortest_kept is not None and len(result.shortest_kept.chain) == optimum
    assert ChainScorer(model, prompt, answer)(result.shortest_kept.chain).kept  # re-checked from scratch
    assert result.evaluations <= 400 + 1 and result.seconds > 0


def test_search_fixes_an_answer_a_poisoned_layer_breaks():
    """Layer 2's MLP is scaled up until the full model gets the answer wrong; the answer is what the model says
    without layer 2. The search must find a chain that keeps it (and none needs layer 2 twice)."""
    model = tiny_model("llama", num_layers=LAYERS, seed=4)
    prompt = torch.randint(3, VOCAB, (12,), generator=torch.Generator().manual_seed(8)).tolist()
    with chained(model, (0, 1, 3, 4)):
        answer = model.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False, use_cache=False)[0, 12:]
    answer = answer.tolist()
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(40.0)
    result = search(model, prompt, answer, iterations=300, seed=1)
    assert not result.full.kept
    assert result.fixed and result.shortest_kept.kept


def test_cola_command_writes_results(tiny_folder, tmp_path):
    result = run_cli("cola", str(tiny_folder), "--limit", "2", "--iterations", "12", "-o", str(tmp_path / "cola"))
    assert result.exception is None, result.output
    data = json.loads((tmp_path / "cola" / "cola.json").read_text())
    assert data["summary"]["problems"] == 2 and len(data["problems"]) == 2
    for problem in data["problems"]:
        assert problem["answer"] and 1 <= problem["evaluations"] <= 13
    assert "chains evaluated" in (tmp_path / "cola" / "cola.md").read_text()
