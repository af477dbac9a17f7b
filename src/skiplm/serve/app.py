"""The HTTP API (FastAPI): OpenAI's ``POST /v1/chat/completions`` and ``POST /v1/completions`` (``stream: true``:
server-sent events, ``data: {chunk}`` lines ending with ``data: [DONE]``, as OpenAI sends them), ``GET /v1/models``,
``GET /health``, and ``GET /v1/skiplm/stats`` (requests, batches, and the decoder's speculative stats: acceptance,
draft / verify / plain seconds, setup apart from decoding).

Every error is OpenAI's error object with a 4xx status for a bad request (:class:`~skiplm.serve.protocol.APIError`)
and 500 for a bug. A client that goes away — mid-stream, or while waiting for a whole response — has its row
finished at the next decoding step; the other rows of its batch are unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import SkipLMError
from .batcher import Job
from .engine import ServedModel
from .protocol import CHAT, APIError, Parsed, chunk, parse_chat, parse_completion, response
from .text import TextStream

log = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.5  # a non-streaming request checks this often whether its client is still there


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.to_json(), status_code=exc.status)


def _sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(served: ServedModel) -> FastAPI:
    """The API for ``served`` (which the caller closes: :func:`run_server` does, when the server stops)."""
    app = FastAPI(title="skiplm serve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = (f"Unknown path {request.method} {request.url.path}: this server answers POST "
                       "/v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health and GET "
                       "/v1/skiplm/stats.")
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
        else:
            message = str(exc.detail)
        return _error(APIError(message, status=exc.status_code, code=None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _error(APIError(f"Invalid request: {exc.errors()}"))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("internal error")
        return _error(APIError(f"internal error in skiplm serve: {type(exc).__name__}: {exc}", status=500,
                               type="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name, "speculative": served.speculative}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != served.name:
            raise APIError(f"The model '{model_id}' does not exist: this server serves '{served.name}'.", status=404,
                           param="model", code="model_not_found")
        return _model_card(served)

    @app.get("/v1/skiplm/stats")
    async def stats():
        return served.stats()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(request, served, parse_chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(request, served, parse_completion)

    return app


def _model_card(served: ServedModel) -> dict[str, Any]:
    return {"id": served.name, "object": "model", "created": int(served.batcher.stats.started), "owned_by": "skiplm",
            "max_model_len": served.limits.context}


async def _body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(f"We could not parse the JSON body of your request ({exc}). The body must be a JSON object, "
                       "sent with Content-Type: application/json.", code="invalid_json") from None


async def _complete(request: Request, served: ServedModel, parse) -> Any:
    parsed: Parsed = parse(await _body(request), served.limits)
    loop = asyncio.get_running_loop()
    job = Job(parsed.prompt, parsed.max_tokens, parsed.sampling,
              TextStream(served.limits.tokenizer, parsed.stop, served.limits.lock), loop)
    try:
        served.batcher.submit(job)
    except SkipLMError as exc:
        raise APIError(str(exc), status=503, type="server_error") from None
    if parsed.stream:
        return StreamingResponse(_stream(job, parsed, served.name), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text = []
    try:
        while True:
            try:
                event = await asyncio.wait_for(job.queue.get(), DISCONNECT_POLL_SECONDS)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return JSONResponse({}, status_code=499)  # (nobody reads it)
                continue
            if event.kind == "text":
                text.append(event.text)
            elif event.kind == "error":
                raise APIError(event.text, status=event.status,
                               type="invalid_request_error" if event.status < 500 else "server_error")
            else:
                return response(parsed, served.name, "".join(text), job.tokens, event.finish_reason)
    finally:
        job.cancel()  # (a no-op once it finished)


async def _stream(job: Job, parsed: Parsed, name: str):
    """The server-sent events of a streaming request; a client that leaves closes this generator, which cancels the
    job (its row stops at the next decoding step)."""
    try:
        if parsed.kind == CHAT:  # (the assistant's role first, as OpenAI's streams do)
            yield _sse(chunk(parsed, name, "", first=True))
        while True:
            event = await job.queue.get()
            if event.kind == "text":
                if event.text:
                    yield _sse(chunk(parsed, name, event.text))
            elif event.kind == "error":
                yield _sse(APIError(event.text, status=event.status,
                                    type="invalid_request_error" if event.status < 500 else "server_error").to_json())
                yield _sse("[DONE]")
                return
            else:
                yield _sse(chunk(parsed, name, None, event.finish_reason))
                if parsed.include_usage:
                    yield _sse(chunk(parsed, name, usage_of=len(job.tokens)))
                yield _sse("[DONE]")
                return
    finally:
        job.cancel()


def run_server(served: ServedModel, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info") -> None:
    """Serve ``served`` with uvicorn until interrupted (Ctrl-C), then close it."""
    import uvicorn

    app = create_app(served)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        served.close()


__all__ = ["create_app", "run_server"]
