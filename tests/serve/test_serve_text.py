"""A row's text piece by piece (skiplm.serve.text), and the scheduler without HTTP (skiplm.serve.batcher)."""

from __future__ import annotations

import time

import pytest
import torch

from skiplm.serve.batcher import Batcher, Job
from skiplm.serve.plain import PlainDecoder
from skiplm.serve.text import TextStream
from skiplm.speculative import Sampling, plain_generate

from conftest import cached_tiny_model


@pytest.fixture(scope="module")
def tokenizer(tiny_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_folder)


def pieces(tokenizer, text, stop=()):
    stream = TextStream(tokenizer, stop)
    out = [stream.feed([token]) for token in tokenizer(text).input_ids]
    return out + [stream.finish()], stream


def test_pieces_concatenate_to_the_text_and_never_split_a_character(tokenizer):
    text = "Hello 😀 wörld — naïve café 日本語"
    out, stream = pieces(tokenizer, text)
    assert "".join(out) == tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == stream.text
    assert not any("\ufffd" in piece for piece in out)
    assert sum(1 for piece in out if piece) > 5  # text came out as it was decoded, not all at the end


def test_a_stop_string_ends_the_text_even_across_tokens(tokenizer):
    text = "one two three STOP four five"
    out, stream = pieces(tokenizer, text, stop=["STOP"])
    assert "".join(out) == "one two three " and stream.stopped
    out, stream = pieces(tokenizer, text, stop=["hree ST", "never"])  # a stop string that spans tokens
    assert "".join(out) == "one two t" and stream.stopped
    out, stream = pieces(tokenizer, "a b c d", stop=["b c d e"])  # a prefix of a stop string held back, then sent
    assert "".join(out) == "a b c d" and not stream.stopped


def test_the_batcher_batches_waiting_jobs_and_keeps_each_rows_limit():
    model = cached_tiny_model("llama")
    decoder = PlainDecoder(model)
    batcher = Batcher(decoder, eos=[], pad=0, max_batch=2, batch_wait=0.2)

    class Tokens:  # a tokenizer that writes token ids as text
        def decode(self, ids, skip_special_tokens=True):
            return "".join(f"<{i}>" for i in ids)

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 9, 7)]
    limits = [6, 10, 4]
    try:
        jobs = [Job(p, n, Sampling(), TextStream(Tokens())) for p, n in zip(prompts, limits)]
        for job in jobs:
            batcher.submit(job)
        deadline = time.time() + 20
        while not all(job.finished for job in jobs):  # (without an event loop, jobs post to their queues directly)
            assert time.time() < deadline, "the batcher did not finish its jobs"
            time.sleep(0.02)
        assert [job.finish_reason for job in jobs] == ["length"] * 3
        for job, prompt, n in zip(jobs, prompts, limits):
            assert job.tokens == plain_generate(model, torch.tensor([prompt]), max_new_tokens=n, eos_token_id=[])[0]
            assert job.stream.text == "".join(f"<{i}>" for i in job.tokens)
        assert [job.batch_size for job in jobs] == [2, 2, 1]  # at most max_batch rows, the rest in the next batch
        assert batcher.stats.to_json()["batches"]["sizes"] == {"1": 1, "2": 1}
    finally:
        batcher.close()


def test_stop_rows_finishes_a_row_and_leaves_the_others_exact():
    from skiplm.models.generation import left_pad
    from skiplm.speculative import SpeculativeDecoder

    from conftest import plan_for

    model = cached_tiny_model("llama")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (6, 11, 8)]
    ids, mask = left_pad(prompts, 0)
    want = [plain_generate(model, torch.tensor([p]), max_new_tokens=24, eos_token_id=[])[0] for p in prompts]
    seen = [[] for _ in prompts]

    def stream(rows):
        for row, tokens in enumerate(rows):
            seen[row].extend(tokens)

    with SpeculativeDecoder(model, plan_for(model, blocks=[1, 3])) as decoder:
        out = decoder.generate(ids, mask, max_new_tokens=24, max_draft=4, fallback=False, eos_token_id=[],
                               streamer=stream, stop_rows=lambda: [1] if len(seen[1]) >= 3 else [])
    assert out.tokens[0] == want[0] and out.tokens[2] == want[2]
    assert 3 <= len(out.tokens[1]) < 24 and out.tokens[1] == want[1][:len(out.tokens[1])]
    # once every row is finished the generation ends
    with SpeculativeDecoder(model, plan_for(model, blocks=[1, 3])) as decoder:
        out = decoder.generate(ids, mask, max_new_tokens=24, max_draft=4, eos_token_id=[], stop_rows=lambda: [0, 1, 2])
    assert out.stats.new_tokens == 1 and all(len(t) == 1 for t in out.tokens)
