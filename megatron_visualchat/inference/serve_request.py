"""OpenAI chat-completion requests -> checked conversations, before anything reaches the model.

A request is refused with a ``RequestError`` (an OpenAI-style 4xx error naming the offending parameter) when its
roles are out of order, a part is neither text nor an image, it asks for something this server does not do
(``n > 1``), or an image cannot be used. Images come only from the request itself (``data:`` URLs, base64) or,
when the server has an image root, from files inside it (symlinks resolved, regular files, bounded reads; see
``data/files.py``). The server never fetches a URL: a client must not be able to make it reach the network.

Message layout: an optional ``system`` (or ``developer``) message first, then ``user`` and ``assistant`` messages
alternating, ending with ``user``. Consecutive user messages form one round (texts joined by newlines, images in
order). A round's images are shown before its question, as the chat template lays them out.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import unquote, urlparse

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from megatron_visualchat.data.errors import SampleError
from megatron_visualchat.data.images import FileImage, InlineImage, decode_image

MAX_STOP_STRINGS = 4  # as OpenAI's API
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*),(?P<payload>.*)", re.S)
_URL_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")
_FILE_PROBLEMS = {"missing_image": "is not a readable file under the image root",
                  "image_outside_root": "is outside the image root (paths are relative to it; symlinks are resolved)",
                  "image_not_a_file": "is not a regular file", "image_too_large": "is over the cap of {cap} bytes"}


class RequestError(Exception):
    """The client's request cannot be served; becomes ``{"error": {message, type, param, code}}``."""

    def __init__(self, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 status: int = 400, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ChatCompletionBody(BaseModel):
    """The fields this server reads; other OpenAI fields are accepted and ignored. ``messages`` and ``stop`` are
    checked by hand (``parse_request``) for messages that name the exact message and part."""

    model_config = ConfigDict(extra="ignore")

    messages: list[Any] = Field(min_length=1)
    model: Optional[str] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    n: Optional[int] = None
    stop: Any = None
    seed: Optional[int] = None
    cfg_scale: Optional[float] = Field(None, ge=0.0)  # not OpenAI's: classifier-free guidance for drawn images


@dataclass(frozen=True)
class ImageLimits:
    max_images: int  # per conversation
    max_pixels: int
    max_bytes: int
    root: Optional[str] = None  # local paths are allowed only inside it


@dataclass(frozen=True)
class RequestImage:
    sha256: str  # of the encoded bytes: the same image in a later request reuses its cached positions
    image: Image.Image  # decoded RGB


@dataclass(frozen=True)
class RequestRound:
    question: str
    images: tuple[RequestImage, ...]
    answer: Optional[str]  # None for the round to answer (the last)


@dataclass(frozen=True)
class ChatRequest:
    rounds: tuple[RequestRound, ...]
    system: Optional[str]  # replaces the template's system prompt
    max_tokens: Optional[int]
    temperature: Optional[float]
    top_p: Optional[float]
    seed: Optional[int]
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    cfg_scale: Optional[float] = None


def _read_image_url(url: str, where: str, limits: ImageLimits) -> bytes:
    """Encoded bytes of a ``data:`` URL or of a local file under ``limits.root``; never from the network."""
    if url.startswith("data:"):
        data_url = _DATA_URL.fullmatch(url)
        if data_url is None or ";base64" not in data_url.group("params"):
            raise RequestError(f"{where}: a data: URL must be base64 (data:image/png;base64,...)", param=where,
                               code="invalid_image_url")
        return InlineImage(data_url.group("payload"), where).read_bytes(limits.max_bytes)
    if url.startswith("file:"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise RequestError(f"{where}: file URLs name a local file (file:///path), got host {parsed.netloc!r}",
                               param=where, code="invalid_image_url")
        path = unquote(parsed.path)
    elif _URL_SCHEME.match(url):
        raise RequestError(f"{where}: {url.split(':', 1)[0]} URLs are refused: the server never fetches from the "
                           "network; send the image as a data: URL (base64)", param=where, code="invalid_image_url")
    else:
        path = url
    if limits.root is None:
        raise RequestError(f"{where}: local image paths are refused: the server was started without --image-root; "
                           "send the image as a data: URL (base64)", param=where, code="invalid_image_url")
    try:
        return FileImage(os.path.join(limits.root, path), root=limits.root).read_bytes(limits.max_bytes)
    except SampleError as e:  # said without the server's own paths
        raise RequestError(f"{where}: {path!r} {_FILE_PROBLEMS[e.reason].format(cap=limits.max_bytes)}",
                           param=where, code=e.reason) from None


def _load_image(url: Any, where: str, limits: ImageLimits) -> RequestImage:
    if not isinstance(url, str) or not url:
        raise RequestError(f"{where}: image_url.url must be a non-empty string", param=where)
    try:
        data = _read_image_url(url, where, limits)
        return RequestImage(hashlib.sha256(data).hexdigest(), decode_image(data, where, limits.max_pixels))
    except SampleError as e:
        raise RequestError(f"{where}: {e.detail}", param=where, code=e.reason) from None


def _parts(content: Any, where: str) -> list[dict]:
    """The message's content as a list of parts (a string is one text part)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise RequestError(f"{where}: content must be a string or a list of parts ({{'type': 'text', ...}} or "
                           "{'type': 'image_url', ...})", param=where)
    return content


def _texts_and_image_urls(content: Any, where: str) -> tuple[list[str], list[tuple[str, Any]]]:
    texts, urls = [], []
    for j, part in enumerate(_parts(content, where)):
        at = f"{where}[{j}]" if isinstance(content, list) else where
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict):
            urls.append((f"{at}.image_url.url", part["image_url"].get("url")))
        elif kind in ("text", "image_url"):
            raise RequestError(f"{at}: a {kind} part needs a {'string text' if kind == 'text' else 'image_url object'}",
                               param=at)
        else:
            raise RequestError(f"{at}: unsupported content part type {kind!r}; use 'text' or 'image_url'", param=at)
    return texts, urls


def _stop_strings(stop: Any) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them",
                           param="stop")
    return tuple(stops)


def parse_body(data: bytes) -> ChatCompletionBody:
    """The JSON body, its fields typed and in range; raises RequestError naming the first problem."""
    try:
        return ChatCompletionBody.model_validate_json(data)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            raise RequestError(f"the request body is not valid JSON: {first.get('ctx', {}).get('error')}") from None
        param = ".".join(str(x) for x in first["loc"]) or None
        raise RequestError(f"{param or 'request body'}: {first['msg']}", param=param) from None


def parse_request(body: ChatCompletionBody, limits: ImageLimits) -> ChatRequest:
    """Check ``body`` and load its images; raises RequestError."""
    if body.n not in (None, 1):
        raise RequestError(f"n={body.n}: this server returns one choice per request; use n=1", param="n",
                           code="unsupported_parameter")
    stop = _stop_strings(body.stop)
    system, rounds = None, []
    question: list[str] = []
    image_urls: list[tuple[str, Any]] = []
    start = ""  # the round's first user message
    for i, message in enumerate(body.messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with role and content", param=where)
        role, content = message.get("role"), message.get("content")
        if role in ("system", "developer"):
            if i != 0:
                raise RequestError(f"{where}: a {role} message may only come first", param=f"{where}.role")
            texts, urls = _texts_and_image_urls(content, f"{where}.content")
            if urls:
                raise RequestError(f"{where}: a {role} message cannot carry images", param=f"{where}.content")
            system = "\n".join(texts)
        elif role == "user":
            texts, urls = _texts_and_image_urls(content, f"{where}.content")
            start = start or where
            question += texts
            image_urls += urls
        elif role == "assistant":
            if not start:
                raise RequestError(f"{where}: an assistant message must answer a user message", param=f"{where}.role")
            texts, urls = _texts_and_image_urls(content, f"{where}.content")
            if urls:
                raise RequestError(f"{where}: an assistant message cannot carry images (images a model drew are "
                                   "not read back): send its text parts only", param=f"{where}.content")
            rounds.append((question, image_urls, "\n".join(texts), start))
            question, image_urls, start = [], [], ""
        else:
            raise RequestError(f"{where}: unknown role {role!r}; use system, user or assistant",
                               param=f"{where}.role")
    if not start:
        raise RequestError("the last message must be a user message (the question to answer)", param="messages")
    rounds.append((question, image_urls, None, start))
    count = sum(len(urls) for _, urls, _, _ in rounds)
    if count > limits.max_images:
        raise RequestError(f"too many images: {count} > {limits.max_images} per conversation", param="messages",
                           code="too_many_images")
    loaded = []
    for texts, urls, answer, where in rounds:
        text = "\n".join(texts).strip()
        if not text:
            raise RequestError(f"{where}: the user message has no text; ask a question with the images",
                               param=f"{where}.content")
        loaded.append(RequestRound(text, tuple(_load_image(url, at, limits) for at, url in urls), answer))
    options = body.stream_options
    return ChatRequest(
        rounds=tuple(loaded), system=system, max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stop, stream=body.stream,
        include_usage=bool(body.stream and options and options.include_usage), cfg_scale=body.cfg_scale)
