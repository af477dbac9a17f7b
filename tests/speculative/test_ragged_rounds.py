"""Ragged speculative rounds at batch > 1: every row commits its own accepted drafts, rows that accepted fewer leave
masked holes in the caches, and each row's output is still what the full model decodes for it alone."""

from __future__ import annotations

import pytest
import torch

from skiplm.speculative import Sampling, SpeculativeDecoder, generate
from skiplm.speculative.decoder import has_sliding_window
from skiplm.speculative.state import Committed

from conftest import cached_tiny_model, plan_for
from test_speculative import _chi2_ok, _exact_joint, _tv, left_padded, oracle


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def test_a_ragged_commit_leaves_masked_holes_and_counts_positions_over_real_tokens():
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    state = Committed(ids, mask, 4, eos=torch.tensor([2]), pad=0, limit=10, ragged=True)
    state.commit(torch.tensor([[11], [21]]))  # the prefill's token
    # row 0 accepted 2 drafts (3 tokens), row 1 none (its own token only): 3 columns, 2 holes in row 1
    state.commit(torch.tensor([[12, 13, 14], [22, 23, 24]]), lengths=torch.tensor([3, 1]))
    assert state.committed == 7 and state.seq.shape[1] >= 7  # grown past the capacity of 4
    assert state.mask[:, 4:7].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert state.seq[1, 6].item() == 22  # row 1's one token sits in the step's last column
    assert state.outputs == [[11, 12, 13, 14], [21, 22]]
    assert state.holes.tolist() == [0, 2] and state.new_tokens == 4
    assert state.row_tokens(0).tolist() == [5, 6, 11, 12, 13, 14]
    assert state.row_tokens(1).tolist() == [7, 8, 9, 21, 22]
    # the next column's position counts each row's real tokens: row 0 has 6 (1 pad), row 1 has 5
    state.reserve(9)
    assert state.positions(7, 2).tolist() == [[6, 7], [5, 6]]
    assert state.room(10) == 8  # row 1 may still commit 10 - 2 tokens
    # the limit: a row stops at 10 new tokens even when a round would commit more
    state.commit(torch.tensor([[15, 16, 17, 18, 19, 20, 30], [25, 26, 27, 28, 29, 31, 32]]))
    assert len(state.outputs[0]) == 10 and len(state.outputs[1]) == 9
    assert not state.done(10) and state.finished.tolist() == [True, False]


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_rows_commit_their_own_drafts_and_stay_exact(family):
    model = cached_tiny_model(family)
    assert not has_sliding_window(model)
    ids, mask = left_padded([4, 12, 7, 9], seed=31)
    expected = oracle(model, ids, mask, 36)
    rounds = []
    with SpeculativeDecoder(model, plan_for(model, blocks=[1, 3])) as decoder:
        out = decoder.generate(ids, mask, max_new_tokens=36, max_draft=4, fallback=False, eos_token_id=[],
                               on_round=rounds.append)
    assert out.tokens == expected
    ragged = [r for r in rounds if max(r.accepted) > min(r.accepted)]
    assert ragged, "the rows never accepted different numbers of drafts: the test exercises nothing"
    # every row committed what it accepted: nothing was thrown away to wait for the slowest row
    assert out.stats.discarded == 0 and out.stats.committed_from_draft == out.stats.accepted


def test_ragged_rounds_with_eos_and_prompt_lookup_stay_exact():
    model = cached_tiny_model("llama")
    ids, mask = left_padded([6, 10, 3], seed=5)
    plain = oracle(model, ids, mask, 30)
    eos = [plain[1][11]]  # row 1 ends early, on a token the full model emits
    expected = oracle(model, ids, mask, 30, eos=eos)
    with SpeculativeDecoder(model, plan_for(model, attention=[1, 2], mlp=[3]), prompt_lookup=2) as decoder:
        out = decoder.generate(ids, mask, max_new_tokens=30, max_draft=3, fallback=False, eos_token_id=eos)
    assert out.tokens == expected


def test_sliding_window_models_advance_every_row_by_the_fewest_accepted():
    model = cached_tiny_model("gemma2")  # sliding windows of 8 tokens, shorter than the sequences
    assert has_sliding_window(model)
    ids, mask = left_padded([5, 11, 8], seed=2)
    rounds = []
    out = generate(model, None, ids, mask, plan=plan_for(model, blocks=[1, 3]), max_new_tokens=30, max_draft=4,
                   fallback=False, eos_token_id=[], on_round=rounds.append)
    assert out.tokens == oracle(model, ids, mask, 30)
    assert rounds and all(r.committed == min(r.accepted) + 1 for r in rounds)


def test_sampled_tokens_follow_the_full_model_in_ragged_rounds():
    """4,000 rows, 3 tokens each, drafts of up to 2: rows accept different drafts and commit them raggedly; the joint
    distribution of tokens 2 and 3 (after the prefill's token 1) must be the full model's."""
    model = cached_tiny_model("llama")
    prompt = [5, 17, 33, 9, 60, 42]
    sampling = Sampling(True, temperature=0.8, top_k=3, top_p=1.0)
    rows = 4000
    rounds = []
    out = generate(model, None, torch.tensor([prompt] * rows), plan=plan_for(model, mlp=[2]), max_new_tokens=3,
                   do_sample=True, temperature=0.8, top_k=3, max_draft=2, seed=7, fallback=False, eos_token_id=[],
                   on_round=rounds.append)
    assert any(max(r.accepted) > min(r.accepted) for r in rounds)
    counts = {}
    for tokens in out.tokens:
        assert len(tokens) == 3
        counts[tuple(tokens)] = counts.get(tuple(tokens), 0) + 1
    exact = _exact_joint(model, prompt, 3, sampling)
    stat, critical = _chi2_ok(counts, rows, exact)
    assert stat < critical, (stat, critical, _tv(counts, rows, exact))
