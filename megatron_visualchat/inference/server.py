"""``megatron-visualchat serve``: an OpenAI-compatible chat server (FastAPI + uvicorn) and a web chat page.

    POST /v1/chat/completions   messages with text and image_url parts; stream, max_tokens, temperature, top_p,
                                stop, seed; n=1 (docs/serve.md)
    GET  /v1/models, GET /health, GET / (the chat page; static files under /static)

The protocol is stateless, so each request carries the whole conversation; the server finds the longest cached
prefix of it (same tokens, same images by content hash) and prefills only the rest (``serve_cache.py``). One model
worker runs requests in turn (``serve_worker.py``); under ``torchrun`` with ``--tp N`` rank 0 serves HTTP and
drives the other ranks. Bad input is an OpenAI-style error, ``{"error": {message, type, param, code}}``, with a 4xx
status, and the server goes on. A model that draws answers with image parts (PNG ``data:`` URLs) in the message
content; streamed, each image is a chunk of its own whose ``delta.content`` is a list holding that image part.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import time
import uuid
from pathlib import Path
from typing import AsyncIterator, Optional, Sequence

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from megatron_visualchat.config import ConfigError
from megatron_visualchat.inference.cli import add_model_arguments, build_session, run_with_exit_status
from megatron_visualchat.inference.serve_cache import ConversationPool
from megatron_visualchat.inference.serve_engine import Completion, ServeEngine
from megatron_visualchat.inference.serve_request import ImageLimits, RequestError, parse_body, parse_request
from megatron_visualchat.inference.serve_worker import ModelWorker, Ticket, follow

STATIC = Path(__file__).with_name("static")
# The page uses only its own files; uploaded and pasted images are shown from data: URLs.
PAGE_CSP = "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'"
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


def _usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": c.cached_tokens}}


def image_part(png: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}


def message_content(c: Completion):
    """The answer's text, or, when the model drew, its text and image parts in order."""
    if not c.images:
        return c.text
    parts, at = [], 0
    for offset, png in c.images:
        if offset > at:
            parts.append({"type": "text", "text": c.text[at:offset]})
        parts.append(image_part(png))
        at = offset
    if at < len(c.text):
        parts.append({"type": "text", "text": c.text[at:]})
    return parts


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _error_body(exc: Exception) -> dict:
    if isinstance(exc, RequestError):
        return exc.body()
    return RequestError(f"internal error: {exc}", type="server_error", code="internal_error").body()


async def _stream(ticket: Ticket, head: dict) -> AsyncIterator[str]:
    """OpenAI's chunk stream: the role, text deltas, the finish reason (then usage, if asked), ``[DONE]``."""
    usage = {"usage": None} if ticket.request.include_usage else {}

    def chunk(delta: dict, finish: Optional[str] = None) -> str:
        return _sse({**head, "object": "chat.completion.chunk", **usage,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await ticket.events.get()
            if kind == "text":
                yield chunk({"content": value})
                continue
            if kind == "image":
                yield chunk({"content": [image_part(value)]})
                continue
            if kind == "done":
                yield chunk({}, value.finish_reason)
                if usage:
                    yield _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(value)})
            else:
                yield _sse(_error_body(value))
            break
        yield "data: [DONE]\n\n"
    finally:
        ticket.cancelled.set()  # a client that left before its turn is skipped


async def _read_body(raw: Request, limit: int) -> bytes:
    """The request body, refused as soon as it is known to exceed ``limit`` bytes."""
    declared = raw.headers.get("content-length", "")
    too_large = RequestError(f"the request body is over {limit} bytes (--max-images x --max-image-mib, base64)",
                             status=413, code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    data = bytearray()
    async for chunk in raw.stream():
        data += chunk
        if len(data) > limit:
            raise too_large
    return bytes(data)


def create_app(engine: ServeEngine, worker: ModelWorker, *, model_name: str, limits: ImageLimits) -> FastAPI:
    # Room for every image at its byte cap in base64, plus the text.
    max_body = int(limits.max_images * limits.max_bytes * 4 / 3) + 2**20
    app = FastAPI(title="megatron-visualchat", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(RequestError)
    async def request_error(_, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(RequestError(str(exc.detail), code=code).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(_, exc: Exception):
        return JSONResponse(_error_body(exc), status_code=500)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "queued": worker.queued, "kv_cache": engine.pool.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "megatron-visualchat"}]}

    def prepare(data: bytes):
        body = parse_body(data)
        if body.model not in (None, model_name):
            raise RequestError(f"model {body.model!r} is not served here; GET /v1/models lists {model_name!r}",
                               param="model", code="model_not_found", status=404)
        request = parse_request(body, limits)
        return request, engine.prepare(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request):
        # JSON parsing and image decoding run off the event loop: other clients keep being served meanwhile
        request, prompt = await run_in_threadpool(prepare, await _read_body(raw, max_body))
        ticket = worker.submit(prompt, request, stream=request.stream)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if request.stream:
            return StreamingResponse(_stream(ticket, head), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            c = await ticket.result()
        finally:
            ticket.cancelled.set()
        return {**head, "object": "chat.completion", "usage": _usage(c),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": message_content(c)},
                             "finish_reason": c.finish_reason, "logprobs": None}]}

    return app


def _serve(args) -> int:
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} must be in 0..65535")
    if not args.kv_cache_gib >= 0:
        raise ConfigError(f"--kv-cache-gib {args.kv_cache_gib} must be >= 0 (0 keeps no conversation)")
    if args.max_image_pixels < 1 or not args.max_image_mib > 0:
        raise ConfigError("--max-image-pixels and --max-image-mib must be positive")
    if args.image_root is not None and not os.path.isdir(args.image_root):
        raise ConfigError(f"--image-root {args.image_root} is not a directory")
    session, info = build_session(args)  # model, tokenizer, template, context and sampling defaults as `chat` has them
    budget = 0 if args.recompute else int(args.kv_cache_gib * 2**30)
    engine = ServeEngine(session.model, session.tokenizer,
                         ConversationPool(session.max_length, info.device, budget), template=session.template,
                         defaults=session.sampling,
                         image_tokenizer=None if session.drawing is None else session.drawing.image_tokenizer)
    if info.rank != 0:
        follow(engine)
        return 0
    limits = ImageLimits(max_images=args.max_images, max_pixels=args.max_image_pixels,
                         max_bytes=int(args.max_image_mib * 2**20), root=args.image_root)
    worker = ModelWorker(engine)
    worker.start()
    name = args.model_name or Path(args.load).resolve().name
    print(f"megatron-visualchat serve · {args.load} as {name!r} · TP={args.tp} · {args.dtype} · context "
          f"{engine.max_length} · KV cache budget {budget / 2**30:g} GiB · http://{args.host}:{args.port}/",
          flush=True)
    try:
        uvicorn.run(create_app(engine, worker, model_name=name, limits=limits), host=args.host, port=args.port,
                    log_level="info")
    finally:
        worker.stop()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-visualchat serve",
                                     description="OpenAI-compatible multi-image chat server with a web chat page")
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--image-root", default=None,
                        help="allow image_url paths (plain or file://) to files inside this directory; without it "
                             "images must be data: URLs")
    parser.add_argument("--kv-cache-gib", type=float, default=4.0,
                        help="memory for idle conversations' KV caches (per GPU); the least recently used go first")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="larger images are refused (checked from the header, before decoding)")
    parser.add_argument("--max-image-mib", type=float, default=16.0, help="encoded size cap per image")
    parser.add_argument("--model-name", default=None, help="the model id clients use (default: --load's name)")
    args = parser.parse_args(argv)
    return run_with_exit_status(parser.prog, [args.load, args.adapters, args.image_root], lambda: _serve(args))
