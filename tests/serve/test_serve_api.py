"""`skiplm serve` over HTTP on loopback, with a tiny seeded model: greedy output is plain greedy decoding's token for
token (speculative and plain servers), streaming says what a whole response says, concurrent requests are batched
and each exact, bad requests get OpenAI-style 4xx errors, and a client leaving mid-stream disturbs no one."""

from __future__ import annotations

import copy
import http.client
import json
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from skiplm import SkipPlan
from skiplm.serve import build
from skiplm.serve.app import create_app
from skiplm.speculative import plain_generate

from conftest import run_cli

NAME = "tiny"
CONTEXT = 512  # the tiny folder's max_position_embeddings
MAX_TOKENS = 480  # the servers' --max-tokens
EOS = 2
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,",
           "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    """The tiny folder's tokenizer and a 4-layer Llama with weights large enough to keep the logits clear of ties,
    and an untouched copy to compute the expected outputs with (the server's draft plan is applied to the model it
    serves, from another thread)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    model = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.1)
    return model, tokenizer, copy.deepcopy(model)


class Server:
    """A served model behind uvicorn on a free loopback port, in a background thread."""

    def __init__(self, served):
        self.served = served
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(create_app(served), log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.served.close()

    def request(self, method, path, body=None, timeout=60):
        """(status, parsed JSON) of one request; ``body``: a dict (sent as JSON) or raw bytes."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read()
        connection.close()
        return response.status, json.loads(raw) if raw else None

    def post(self, path, body):
        return self.request("POST", path, body)

    def stream(self, path, body):
        """The ``data:`` payloads of a streaming request, in order (JSON parsed, except ``[DONE]``)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        connection.request("POST", path, body=json.dumps({**body, "stream": True}).encode(),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
        events = []
        for line in response.read().decode().split("\n"):
            if line.startswith("data: "):
                payload = line[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
            else:
                assert line == "", line
        connection.close()
        return events

    def stats(self):
        return self.request("GET", "/v1/skiplm/stats")[1]


@pytest.fixture(scope="module")
def spec(tiny):
    model, tokenizer, _ = tiny
    plan = SkipPlan.from_layers(4, mlp=[3]).for_model(model)  # accepts about half its drafts on this model
    server = Server(build(model, tokenizer, name=NAME, plan=plan, max_batch=4, batch_wait=0.15,
                          max_tokens=MAX_TOKENS, max_draft=4))
    yield server
    server.close()
    assert getattr(model, "_skiplm_handle", None) is None  # the draft plan is removed when the server closes


@pytest.fixture(scope="module")
def plain(tiny):
    _, tokenizer, reference = tiny
    model = copy.deepcopy(reference)  # (plain decoding runs the model as it is: not the one the draft plan is on)
    server = Server(build(model, tokenizer, name=NAME, speculative=False, max_batch=4, batch_wait=0.15,
                          max_tokens=MAX_TOKENS, warmup=False))
    yield server
    server.close()


def expected(tiny, prompt_ids, max_tokens):
    """Plain greedy decoding of one prompt alone, by the untouched copy of the model."""
    return plain_generate(tiny[2], torch.tensor([prompt_ids]), max_new_tokens=max_tokens, eos_token_id=[EOS])[0]


def chat_ids(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def check_exact(tiny, out, prompt_ids, max_tokens):
    tokenizer = tiny[1]
    want = expected(tiny, prompt_ids, max_tokens)
    choice = out["choices"][0]
    assert out["prompt_token_ids"] == prompt_ids
    assert choice["token_ids"] == want
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    assert text == tokenizer.decode(want, skip_special_tokens=True)
    assert choice["finish_reason"] == ("stop" if want[-1] == EOS else "length")
    assert out["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": len(want),
                            "total_tokens": len(prompt_ids) + len(want)}
    return text


# -- greedy over HTTP is plain greedy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["spec", "plain"])
def test_greedy_completions_and_chat_equal_plain_greedy(kind, tiny, request):
    server = request.getfixturevalue(kind)
    tokenizer = tiny[1]
    before = server.stats()["decoder"]
    status, out = server.post("/v1/completions", {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 40,
                                                  "temperature": 0, "return_token_ids": True})
    assert status == 200 and out["object"] == "text_completion" and out["model"] == NAME
    check_exact(tiny, out, tokenizer(PROMPTS[0]).input_ids, 40)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7 times 8?"}]
    status, out = server.post("/v1/chat/completions", {"model": NAME, "messages": messages, "max_tokens": 24,
                                                       "temperature": 0, "return_token_ids": True})
    assert status == 200 and out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["role"] == "assistant"
    check_exact(tiny, out, chat_ids(tokenizer, messages), 24)
    # a prompt given as token ids; max_completion_tokens (the newer name) on chat; no max_tokens: the server's
    ids = tokenizer(PROMPTS[1]).input_ids
    status, out = server.post("/v1/completions", {"prompt": ids, "max_tokens": 8, "temperature": 0,
                                                  "return_token_ids": True})
    assert status == 200
    check_exact(tiny, out, ids, 8)
    after = server.stats()["decoder"]
    if kind == "spec":  # the draft drafted and the full model verified (not only plain steps)
        assert after["rounds"] > before["rounds"] and after["drafted"] > before["drafted"]
        assert 0 < after["acceptance_rate"] < 1 and after["verify_seconds"] > 0
    else:
        assert after["rounds"] == 0 and after["plain_steps"] > before["plain_steps"]


def test_streaming_says_what_the_whole_response_says(spec, tiny):
    body = {"model": NAME, "prompt": PROMPTS[2], "max_tokens": 30, "temperature": 0}
    whole = spec.post("/v1/completions", body)[1]
    events = spec.stream("/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks, usage = events[:-2], events[-2]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert len(chunks) > 2  # text arrived piece by piece
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]

    messages = [{"role": "user", "content": "Tell me a story."}]
    whole = spec.post("/v1/chat/completions", {"messages": messages, "max_tokens": 20, "temperature": 0})[1]
    events = spec.stream("/v1/chat/completions", {"messages": messages, "max_tokens": 20, "temperature": 0})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"] and text
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_stop_string_ends_the_text_in_both_modes(spec, tiny):
    full = spec.post("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 30, "temperature": 0})[1]
    text = full["choices"][0]["text"]
    stop = text[len(text) // 2:len(text) // 2 + 3]  # some text in the middle of the greedy continuation
    cut = text[:text.index(stop)]
    out = spec.post("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 30, "temperature": 0, "stop": [stop]})[1]
    assert out["choices"][0]["text"] == cut and out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] < 30  # its row stopped there
    events = spec.stream("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 30, "temperature": 0, "stop": stop})
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == cut


# -- concurrency ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["spec", "plain"])
def test_concurrent_requests_are_batched_and_each_exact(kind, tiny, request):
    server = request.getfixturevalue(kind)
    tokenizer = tiny[1]
    before = server.stats()["batches"]["sizes"]
    lengths = [12, 30, 20, 6]  # each row has its own limit; the short ones finish first
    results = [None] * len(PROMPTS)

    def send(i):
        results[i] = server.post("/v1/completions", {"prompt": PROMPTS[i], "max_tokens": lengths[i],
                                                     "temperature": 0, "return_token_ids": True})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for i, (status, out) in enumerate(results):
        assert status == 200, out
        check_exact(tiny, out, tokenizer(PROMPTS[i]).input_ids, lengths[i])
    sizes = server.stats()["batches"]["sizes"]
    grown = {int(k): v - before.get(k, 0) for k, v in sizes.items() if v > before.get(k, 0)}
    assert sum(size * n for size, n in grown.items()) == len(PROMPTS)  # every request decoded once
    assert max(grown) > 1, grown  # and some were decoded together
    recent = server.stats()["recent_batches"][-1]
    if recent["size"] > 1:  # a batch of rows with different limits decodes until its longest is done
        assert recent["steps_tokens"] == max(r["max_tokens"] for r in recent["rows"])


def test_sampling_is_served_and_a_seed_reproduces_plain_sampling(spec, plain):
    body = {"prompt": PROMPTS[3], "max_tokens": 12, "temperature": 0.8, "top_p": 0.9, "top_k": 50}
    status, out = spec.post("/v1/completions", body)
    assert status == 200 and 1 <= out["usage"]["completion_tokens"] <= 12
    seeded = {**body, "seed": 1234}
    first, second = plain.post("/v1/completions", seeded)[1], plain.post("/v1/completions", seeded)[1]
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    third = plain.post("/v1/completions", {**seeded, "seed": 99})[1]
    greedy = plain.post("/v1/completions", {**body, "temperature": 0})[1]
    texts = {first["choices"][0]["text"], third["choices"][0]["text"], greedy["choices"][0]["text"]}
    assert len(texts) > 1  # sampling samples


# -- bad requests ----------------------------------------------------------------------------------------------------
BAD = [
    ("/v1/chat/completions", b"{not json", 400, None, "invalid_json", "could not parse the JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, None, "invalid_type", "must be a JSON object"),
    ("/v1/chat/completions", {"model": NAME}, 400, "messages", "missing_required_parameter", "'messages'"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "invalid_type", "expected an array"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "invalid_value", "at least one message"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role",
     "invalid_value", "must be one of"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content", "invalid_value", "only text parts"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, 404, "model",
     "model_not_found", "'gpt-4o' does not exist"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "invalid_type",
     "expected an integer, but got a string"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_value", "at least 1"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, 400, "max_tokens", "invalid_type", "boolean"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_TOKENS + 1}, 400, "max_tokens", "invalid_value",
     f"at most {MAX_TOKENS} new tokens per request"),
    ("/v1/completions", {"prompt": "word " * 400, "max_tokens": 200}, 400, "prompt", "context_length_exceeded",
     f"maximum context length is {CONTEXT} tokens"),
    ("/v1/completions", {"prompt": "word " * 600}, 400, "prompt", "context_length_exceeded", "maximum context length"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt", "missing_required_parameter", "'prompt'"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "invalid_value", "empty"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", "unsupported_value", "one prompt per request"),
    ("/v1/completions", {"prompt": [1, 10 ** 9]}, 400, "prompt", "invalid_value", "token ids"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature", "invalid_value", "at least 0"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature", "invalid_type", "a number"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", "invalid_value", "greater than 0"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream", "invalid_type", "a boolean"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", 1]}, 400, "stop", "invalid_value", "array of at most 4"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n", "unsupported_value", "one choice per request"),
    ("/v1/completions", {"prompt": "x", "logprobs": 3}, 400, "logprobs", "unsupported_value", "log probabilities"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "frequency_penalty": 0.5}, 400,
     "frequency_penalty", "unsupported_value", "penalties"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400,
     "tools", "unsupported_value", "tool calling"),
]


def test_bad_requests_get_openai_style_errors(spec):
    done_before = spec.stats()["requests"]["total"]
    for path, body, status, param, code, message in BAD:
        got, out = spec.post(path, body)
        assert got == status, (body, out)
        error = out["error"]
        assert set(error) == {"message", "type", "param", "code"}, out
        assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == code, out
        assert message in error["message"], (message, error["message"])
    assert spec.stats()["requests"]["total"] == done_before  # none of them reached the decoder
    got, out = spec.request("GET", "/v1/nothing")
    assert got == 404 and "Unknown path GET /v1/nothing" in out["error"]["message"]
    got, out = spec.request("GET", "/v1/completions")
    assert got == 405 and out["error"]["message"]
    # fields that ask for nothing are accepted
    got, out = spec.post("/v1/completions", {"prompt": "x", "max_tokens": 2, "n": 1, "logprobs": None, "echo": False,
                                             "user": "me", "presence_penalty": 0, "temperature": 0})
    assert got == 200, out


def test_models_health_and_stats(spec):
    status, out = spec.request("GET", "/v1/models")
    assert status == 200 and out["object"] == "list" and [m["id"] for m in out["data"]] == [NAME]
    assert spec.request("GET", f"/v1/models/{NAME}")[1]["id"] == NAME
    assert spec.request("GET", "/v1/models/other")[0] == 404
    status, out = spec.request("GET", "/health")
    assert status == 200 and out["status"] == "ok" and out["speculative"] is True
    stats = spec.stats()
    assert stats["speculative"] is True and stats["draft"]["plan"] and stats["context"] == CONTEXT
    assert set(stats["setup_seconds"]) == {"decoder", "warmup"} and stats["max_batch"] == 4
    for key in ("drafted", "accepted", "acceptance_rate", "draft_seconds", "verify_seconds", "prefill_seconds",
                "plain_seconds", "total_seconds", "tokens_per_round"):
        assert key in stats["decoder"]


# -- a client that leaves --------------------------------------------------------------------------------------------
def test_a_client_leaving_mid_stream_disturbs_no_one(spec, tiny):
    tokenizer = tiny[1]
    cancelled_before = spec.stats()["requests"].get("cancelled", 0)
    result = {}

    def other():  # decoded in the same batch as the stream that is dropped
        result["out"] = spec.post("/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 16, "temperature": 0,
                                                      "return_token_ids": True})

    client = socket.create_connection(("127.0.0.1", spec.port), timeout=30)
    body = json.dumps({"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}).encode()
    client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(body) + body)
    thread = threading.Thread(target=other)
    thread.start()
    received = b""
    while received.count(b"data: ") < 3:  # a few chunks in, the client goes away
        received += client.recv(4096)
    client.close()
    thread.join(60)
    status, out = result["out"]
    assert status == 200
    check_exact(tiny, out, tokenizer(PROMPTS[1]).input_ids, 16)
    deadline = time.time() + 20
    while spec.stats()["requests"].get("cancelled", 0) == cancelled_before:
        assert time.time() < deadline, "the dropped stream was not cancelled"
        time.sleep(0.05)
    batch = next(b for b in reversed(spec.stats()["recent_batches"])
                 if any(r["finish_reason"] == "cancelled" for r in b["rows"]))
    dropped = next(r for r in batch["rows"] if r["finish_reason"] == "cancelled")
    assert dropped["new_tokens"] < MAX_TOKENS and batch["steps_tokens"] < MAX_TOKENS  # its row stopped early
    # the server goes on
    assert spec.request("GET", "/health")[0] == 200
    status, out = spec.post("/v1/completions", {"prompt": PROMPTS[3], "max_tokens": 10, "temperature": 0,
                                                "return_token_ids": True})
    assert status == 200
    check_exact(tiny, out, tokenizer(PROMPTS[3]).input_ids, 10)


# -- the command -------------------------------------------------------------------------------------------------------
def test_cli_serve_builds_the_server_it_is_asked_for(tiny_folder, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from skiplm.serve import app as serve_app

    plan_file = SkipPlan.from_layers(4, blocks=[1]).for_model(
        AutoModelForCausalLM.from_pretrained(tiny_folder)).save(tmp_path / "draft.json")
    started = {}

    def fake_run(served, host, port, **options):
        started.update(served=served, host=host, port=port)
        served.close()

    monkeypatch.setattr(serve_app, "run_server", fake_run)
    result = run_cli("serve", tiny_folder, "--plan", plan_file, "--port", 8123, "--max-batch", 3, "--no-warmup",
                     "--prompt-lookup", 0, "--name", "tiny-model")
    assert result.exception is None, result.output
    served = started["served"]
    assert started["host"] == "127.0.0.1" and started["port"] == 8123 and served.name == "tiny-model"
    assert served.speculative and served.batcher.max_batch == 3 and "skip blocks 1" in served.settings["draft"]["plan"]
    result = run_cli("serve", tiny_folder, "--no-speculative", "--no-warmup")
    assert result.exception is None and not started["served"].speculative
    # refused before the model loads
    result = run_cli("serve", tiny_folder, "--no-speculative", "--draft-dtype", "int8")
    assert "do not combine with --no-speculative" in str(result.exception)
    result = run_cli("serve", tiny_folder, "--heal", tmp_path)
    assert "does not take a heal folder as the draft" in str(result.exception)


def test_cli_serve_without_fastapi_says_what_to_install(tiny_folder, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "fastapi", None)  # (import fastapi now raises ImportError)
    result = run_cli("serve", tiny_folder)
    assert "pip install 'skiplm[serve]'" in str(result.exception)
