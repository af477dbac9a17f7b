"""The OpenAI API's requests as skiplm reads them, its errors, and the response objects.

A request body is checked field by field; a bad one is an :class:`APIError`: an HTTP status and OpenAI's error object
``{"error": {"message", "type", "param", "code"}}``, its message saying what was wrong and what is allowed. Fields
skiplm does not implement are refused when they ask for something (``n`` > 1, ``logprobs``, penalties, ``logit_bias``,
tools, ``echo``, ...), not silently ignored; fields that change nothing (``user``, ``stream_options`` without
``stream``, ...) are accepted. Extensions: ``top_k`` (as vLLM's), and ``return_token_ids`` (the prompt's and the
completion's token ids in a non-streaming response, as vLLM's).

Defaults are OpenAI's: ``temperature`` 1 (sampling; 0 is greedy), ``top_p`` 1; ``max_tokens`` defaults to the
server's ``--max-tokens``, cut to what the model's context leaves after the prompt.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from typing import Any

from ..speculative.sampling import Sampling

CHAT, COMPLETION = "chat.completion", "text_completion"
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 4  # stop strings per request, as OpenAI


class APIError(Exception):
    """An error response: ``status`` and OpenAI's error object."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def to_json(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Limits:
    """What a request is checked against: the served model's ``name``, its ``tokenizer`` (``lock`` held around it),
    ``context`` (tokens; None: unchecked) and the server's ``max_tokens`` per request."""

    name: str
    tokenizer: Any
    context: int | None
    max_tokens: int
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


@dataclasses.dataclass
class Parsed:
    """A checked request."""

    kind: str  # CHAT or COMPLETION
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


# -- fields ------------------------------------------------------------------------------------------------------------
_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
               dict: "an object"}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    for kind in (bool, int, float, str, list, dict):
        if isinstance(value, kind):
            return _TYPE_NAMES[kind]
    return type(value).__name__


def _field(body: dict, name: str, kinds: tuple, default: Any = None, *, required: bool = False) -> Any:
    """``body[name]`` if of one of ``kinds`` (bool is not a number; an int is a float), ``default`` when absent or
    null; a missing required field, or a value of another type, is an :class:`APIError`."""
    value = body.get(name)
    if value is None:
        if required:
            raise APIError(f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter")
        return default
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok and float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        expected = " or ".join(_TYPE_NAMES[k] for k in kinds)
        raise APIError(f"Invalid type for '{name}': expected {expected}, but got {_type_name(value)} instead.",
                       param=name, code="invalid_type")
    return float(value) if kinds == (float,) else value


def _range(name: str, value: float, low: float | None, high: float | None, *, low_open: bool = False) -> None:
    if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
        if low is not None and high is not None:
            bounds = f"{'greater than' if low_open else 'at least'} {low:g} and at most {high:g}"
        elif low is not None:
            bounds = f"{'greater than' if low_open else 'at least'} {low:g}"
        else:
            bounds = f"at most {high:g}"
        raise APIError(f"Invalid value for '{name}': {value!r}; it must be {bounds}.", param=name,
                       code="invalid_value")


_PENALTIES = "penalties would change the full model's distribution, which speculative decoding reproduces exactly"
# what skiplm does not do: a field whose value asks for it is refused (these values ask for nothing)
_UNSUPPORTED = {
    "n": ((None, 1), "one choice per request: send several requests (concurrent requests are batched)"),
    "best_of": ((None, 1), "one choice per request"),
    "logprobs": ((None, False, 0), "log probabilities are not returned"),
    "top_logprobs": ((None, 0), "log probabilities are not returned"),
    "echo": ((None, False), "the prompt is not echoed"),
    "suffix": ((None, ""), "insertion (a suffix) is not supported"),
    "presence_penalty": ((None, 0, 0.0), _PENALTIES),
    "frequency_penalty": ((None, 0, 0.0), _PENALTIES),
    "repetition_penalty": ((None, 1, 1.0), _PENALTIES),
    "logit_bias": ((None,), "logit biases are not supported"),
    "tools": ((None,), "tool calling is not supported"),
    "functions": ((None,), "function calling is not supported"),
}


def _check_unsupported(body: dict) -> None:
    for name, (allowed, why) in _UNSUPPORTED.items():
        value = body.get(name)
        if value is None or (isinstance(value, (dict, list)) and not value):
            continue
        # (True == 1, but n=true is not n=1)
        if not any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed if a is not None):
            raise APIError(f"'{name}' = {json.dumps(value)} is not supported by skiplm serve: {why}.", param=name,
                           code="unsupported_value")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise APIError("'response_format' other than {\"type\": \"text\"} is not supported by skiplm serve "
                       "(no constrained decoding).", param="response_format", code="unsupported_value")


def check_model(body: dict, limits: Limits) -> None:
    model = _field(body, "model", (str,))
    if model is not None and model != limits.name:
        raise APIError(f"The model '{model}' does not exist: this server serves '{limits.name}' (GET /v1/models).",
                       status=404, param="model", code="model_not_found")


def _sampling(body: dict) -> Sampling:
    temperature = _field(body, "temperature", (float,), 1.0)
    _range("temperature", temperature, 0.0, 2.0)
    top_p = _field(body, "top_p", (float,), 1.0)
    _range("top_p", top_p, 0.0, 1.0, low_open=True)
    top_k = _field(body, "top_k", (int,), 0)
    if top_k == -1:  # (vLLM's "off")
        top_k = 0
    _range("top_k", top_k, 0, None)
    seed = _field(body, "seed", (int,))
    if temperature == 0:
        return Sampling()
    return Sampling(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)


def _stop(body: dict) -> tuple[str, ...]:
    stop = _field(body, "stop", (str, list), ())
    if isinstance(stop, str):
        stop = [stop]
    if len(stop) > MAX_STOP or not all(isinstance(s, str) for s in stop):
        raise APIError(f"Invalid value for 'stop': expected a string or an array of at most {MAX_STOP} strings.",
                       param="stop", code="invalid_value")
    return tuple(s for s in stop if s)


def _max_tokens(body: dict, names: tuple[str, ...], prompt_tokens: int, limits: Limits, what: str) -> int:
    name = next((n for n in names if body.get(n) is not None), names[0])
    asked = _field(body, name, (int,))
    if asked is not None:
        _range(name, asked, 1, None)
        if asked > limits.max_tokens:
            raise APIError(f"'{name}' is {asked}, but this server allows at most {limits.max_tokens} new tokens per "
                           "request (skiplm serve --max-tokens).", param=name, code="invalid_value")
    if limits.context is not None:
        room = limits.context - prompt_tokens
        if room < 1 or (asked is not None and asked > room):
            completion = asked if asked is not None else 1
            raise APIError(
                f"This model's maximum context length is {limits.context} tokens. However, you requested "
                f"{prompt_tokens + completion} tokens ({prompt_tokens} in the {what}, {completion} in the completion). "
                f"Please reduce the length of the {what} or completion.", param="messages" if what == "messages"
                else "prompt", code="context_length_exceeded")
        return asked if asked is not None else min(limits.max_tokens, room)
    return asked if asked is not None else limits.max_tokens


def _common(body: dict, kind: str, prompt: list[int], limits: Limits, what: str, names: tuple[str, ...]) -> Parsed:
    stream = _field(body, "stream", (bool,), False)
    options = _field(body, "stream_options", (dict,), {})
    include_usage = _field(options, "include_usage", (bool,), False) if stream else False
    return Parsed(kind, prompt, _max_tokens(body, names, len(prompt), limits, what), _sampling(body), _stop(body),
                  stream, include_usage, _field(body, "return_token_ids", (bool,), False))


def _body(body: Any) -> dict:
    if not isinstance(body, dict):
        raise APIError(f"The request body must be a JSON object, got {_type_name(body)}.", code="invalid_type")
    return body


def _text_content(content: Any, index: int) -> str:
    where = f"messages[{index}].content"
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(f"Invalid '{where}': only text parts ({{\"type\": \"text\", \"text\": \"...\"}}) are "
                               "supported by this text model.", param=where, code="invalid_value")
            texts.append(part["text"])
        return "".join(texts)
    raise APIError(f"Invalid type for '{where}': expected a string or an array of text parts, but got "
                   f"{_type_name(content)} instead.", param=where, code="invalid_type")


def parse_chat(body: Any, limits: Limits) -> Parsed:
    """A ``/v1/chat/completions`` body: the messages through the model's chat template (with the generation prompt)."""
    body = _body(body)
    check_model(body, limits)
    messages = _field(body, "messages", (list,), required=True)
    if not messages:
        raise APIError("'messages' must hold at least one message.", param="messages", code="invalid_value")
    conversation = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(f"Invalid type for 'messages[{i}]': expected an object, but got {_type_name(message)} "
                           "instead.", param=f"messages[{i}]", code="invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise APIError(f"Invalid value for 'messages[{i}].role': {json.dumps(role)}; it must be one of "
                           f"{', '.join(ROLES)}.", param=f"messages[{i}].role", code="invalid_value")
        if message.get("tool_calls"):
            raise APIError("tool calls are not supported by skiplm serve.", param=f"messages[{i}].tool_calls",
                           code="unsupported_value")
        conversation.append({"role": "system" if role == "developer" else role,
                             "content": _text_content(message.get("content"), i)})
    _check_unsupported(body)
    tokenizer = limits.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(f"'{limits.name}' has no chat template: use /v1/completions with a prompt.", param="messages",
                       code="unsupported_value")
    try:
        with limits.lock:
            prompt = list(tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                                        return_dict=True)["input_ids"])
    except Exception as exc:  # noqa: BLE001 (a template that refuses these messages, e.g. roles out of order)
        raise APIError(f"The model's chat template refused these messages: {exc}", param="messages",
                       code="invalid_value") from exc
    return _common(body, CHAT, prompt, limits, "messages", ("max_completion_tokens", "max_tokens"))


def parse_completion(body: Any, limits: Limits) -> Parsed:
    """A ``/v1/completions`` body: one prompt, a string or token ids (or an array holding one of them)."""
    body = _body(body)
    check_model(body, limits)
    prompt = _field(body, "prompt", (str, list), required=True)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list):
        if prompt and all(isinstance(p, (str, list)) for p in prompt):
            raise APIError("skiplm serve takes one prompt per request: send several requests (concurrent requests "
                           "are batched).", param="prompt", code="unsupported_value")
        vocab = len(limits.tokenizer)
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt):
            raise APIError(f"Invalid value for 'prompt': an array prompt must be token ids (integers from 0 to "
                           f"{vocab - 1}).", param="prompt", code="invalid_value")
        ids = list(prompt)
    else:
        with limits.lock:
            ids = list(limits.tokenizer(prompt).input_ids)
    if not ids:
        raise APIError("'prompt' is empty: it must hold at least one token.", param="prompt", code="invalid_value")
    _check_unsupported(body)
    return _common(body, COMPLETION, ids, limits, "prompt", ("max_tokens",))


# -- responses ---------------------------------------------------------------------------------------------------------
def _prefix(request: Parsed) -> str:
    return ("chatcmpl-" if request.kind == CHAT else "cmpl-") + request.id


def usage(request: Parsed, completion_tokens: int) -> dict[str, int]:
    prompt = len(request.prompt)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def response(request: Parsed, name: str, text: str, tokens: list[int], finish_reason: str) -> dict[str, Any]:
    """The whole response of a non-streaming request."""
    if request.kind == CHAT:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    out = {"id": _prefix(request), "object": request.kind, "created": request.created, "model": name,
           "choices": [choice], "usage": usage(request, len(tokens))}
    if request.return_token_ids:
        choice["token_ids"] = list(tokens)
        out["prompt_token_ids"] = list(request.prompt)
    return out


def chunk(request: Parsed, name: str, text: str | None = None, finish_reason: str | None = None, *,
          first: bool = False, usage_of: int | None = None) -> dict[str, Any]:
    """One streamed chunk: a piece of text, the finish reason (``text`` None), or (``usage_of`` tokens) the usage
    chunk that ``stream_options.include_usage`` asks for (no choices)."""
    if request.kind == CHAT:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        kind = COMPLETION
    out = {"id": _prefix(request), "object": kind, "created": request.created, "model": name,
           "choices": [] if usage_of is not None else [choice]}
    if request.include_usage:
        out["usage"] = usage(request, usage_of) if usage_of is not None else None
    return out


__all__ = ["APIError", "CHAT", "COMPLETION", "Limits", "Parsed", "chunk", "parse_chat", "parse_completion",
           "response", "usage"]
