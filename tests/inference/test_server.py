"""``megatron-visualchat serve`` with the real ``openai`` client against a live uvicorn server on 127.0.0.1 (the
tiny chat checkpoint, the server forked from the test harness's preloaded fork server): multi-round multi-image
conversations streamed and not equal the chat session on the same conversation and eval-replay, later rounds reuse
the cached prefix, a warm cache answers exactly as a cold one, bad input is an OpenAI-style 4xx error and the server
goes on, concurrent clients get their own answers with the cache within its budget, and TP=2 equals TP=1."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

from megatron_visualchat.testing.distributed import free_port, run_parallel

from .tiny import png_bytes, write_png

MAX_NEW_TOKENS = 6
CACHE_ENTRY_BYTES = 532_480  # the tiny model's KVCache: 4 layers x K,V x 512 positions x 32 x fp32 + token codes
BUDGET_GIB = 3.5 * CACHE_ENTRY_BYTES / 2**30  # room for three idle conversations
COLOURS = [(200, 30, 30), (20, 180, 40), (30, 40, 210), (220, 200, 20), (150, 40, 160), (20, 170, 170),
           (240, 140, 20), (90, 90, 90)]


# ---- a live server -------------------------------------------------------------------------------------------------
def _serve(argv: list[str], pid_file: str) -> int:
    """A server rank (forked by run_parallel, process groups set up): the console entry point, until SIGINT."""
    import torch.distributed as dist

    from megatron_visualchat.cli import main

    if dist.get_rank() == 0:
        Path(pid_file).write_text(str(os.getpid()))
    return main(["serve", *argv])


def _get(url: str) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            body = r.read().decode()
            return r.status, json.loads(body) if r.headers.get_content_type() == "application/json" else body
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post_raw(url: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/v1/chat/completions", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@contextmanager
def running_server(ckpt: str, tmp: Path, *options: str, tp: int = 1):
    """Yields the base URL of a server on a free port; stops it with SIGINT (as Ctrl-C) and checks it exited
    cleanly."""
    port = free_port()
    pid_file = tmp / f"server-{port}.pid"
    argv = ["--load", ckpt, "--tp", str(tp), "--port", str(port), *options]
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = run_parallel(_serve, tp=tp, args=(argv, str(pid_file)), timeout=900)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):  # the model builds in a second or two; bounded so a broken start cannot hang the suite
        if "error" in outcome:
            raise outcome["error"]
        try:
            if _get(url + "/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.2)
    else:
        pytest.fail("the server did not come up")
    try:
        yield url
    finally:
        os.kill(int(pid_file.read_text()), signal.SIGINT)
        thread.join(timeout=120)
        assert not thread.is_alive(), "the server did not stop on SIGINT"
        if "error" in outcome:
            raise outcome["error"]
        assert outcome["result"] == [0] * tp


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user(text: str, *urls: str) -> dict:
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                        {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """Images the server may read, a file outside it, a symlink pointing out, and one over the pixel cap."""
    base = tmp_path_factory.mktemp("serve")
    root = base / "images"
    root.mkdir()
    for name, colour, size in [("red", COLOURS[0], (40, 30)), ("green", COLOURS[1], (32, 32)),
                               ("blue", COLOURS[2], (24, 48))]:
        write_png(root / f"{name}.png", colour, size)
    write_png(root / "big.png", size=(200, 200))  # 40000 pixels > --max-image-pixels 10000
    write_png(base / "outside.png")
    (root / "escape.png").symlink_to(base / "outside.png")
    return root


@pytest.fixture(scope="module")
def server(chat_ckpt, image_root, tmp_path_factory):
    options = ["--image-root", str(image_root), "--max-new-tokens", str(MAX_NEW_TOKENS), "--max-images", "4",
               "--max-image-pixels", "10000", "--max-image-mib", "0.05", "--kv-cache-gib", f"{BUDGET_GIB:.12f}",
               "--model-name", "tiny-vchat"]
    with running_server(chat_ckpt, tmp_path_factory.mktemp("server"), *options) as url:
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


# ---- references: the chat session and eval-replay on the same conversations ------------------------------------
def _references(ckpt, conversations, eval_file=None, image_root=None, sampled=None):
    """``chat``: per conversation, per round, (answer, prompt positions) of a fresh ChatSession given the earlier
    rounds with the answers the client sent back; ``replay``: eval-replay's (answer, error) per round of
    ``eval_file``; ``sampled``: a sampled answer of a fresh session, for (question, images, sampling options)."""
    from megatron_visualchat.inference import (
        ChatSession,
        SamplingParams,
        build_chat_model,
        load_eval_file,
        replay,
    )

    def decoded(images):
        return [base64.b64decode(im) for im in images]

    model, tok, _ = build_chat_model(ckpt)
    greedy = SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
    out = dict(chat=[])
    for rounds in conversations:
        answers = []
        for r, (question, images, _) in enumerate(rounds):
            session = ChatSession(model, tok, sampling=greedy)
            for q, ims, a in rounds[:r]:
                session.add_exchange(q, a, decoded(ims))
            turn = session.ask(question, decoded(images))
            answers.append((turn.answer, turn.prompt_end + 1))
        out["chat"].append(answers)
    if eval_file:
        records = replay(ChatSession(model, tok, sampling=greedy), load_eval_file(eval_file, image_root))
        out["replay"] = [(r.answer, r.error) for r in records]
    if sampled:
        question, images, params = sampled
        session = ChatSession(model, tok, sampling=SamplingParams(max_new_tokens=MAX_NEW_TOKENS, **params))
        out["sampled"] = session.ask(question, decoded(images)).answer
    return out


def _b64(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def _converse(api, rounds, *, stream: bool):
    """Run ``rounds`` [(question, image urls)] as one conversation, sending back each answer; per round
    (answer, prompt_tokens, cached_tokens, finish_reason)."""
    messages, out = [], []
    for question, urls in rounds:
        messages.append(user(question, *urls))
        if stream:
            chunks = list(api.chat.completions.create(model="tiny-vchat", messages=messages, stream=True,
                                                      stream_options={"include_usage": True}))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            usage = chunks[-1].usage
        else:
            response = api.chat.completions.create(model="tiny-vchat", messages=messages)
            text, finish, usage = response.choices[0].message.content, response.choices[0].finish_reason, \
                response.usage
        messages.append({"role": "assistant", "content": text})
        out.append((text, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens, finish))
    return out


@pytest.fixture(scope="module")
def conversation(image_root):
    red, green, blue = (image_root / f"{c}.png" for c in ("red", "green", "blue"))
    # the same images as data: URLs, a plain path under --image-root and a file:// URL
    return [("What colour is the shape in image 1?", [data_url(red.read_bytes()), "green.png"]),
            ("And in image 3? Compare them.", [f"file://{blue}"]),
            ("Which one is bigger?", [])]


@pytest.fixture(scope="module")
def served(server, conversation):
    api = client(server)
    return dict(plain=_converse(api, conversation, stream=False), streamed=_converse(api, conversation, stream=True))


def test_models_health_and_the_page(server):
    assert [m.id for m in client(server).models.list().data] == ["tiny-vchat"]
    status, health = _get(server + "/health")
    assert status == 200 and health["status"] == "ok" and health["kv_cache"]["budget_bytes"] > 0
    status, page = _get(server + "/")
    assert status == 200 and "/static/chat.js" in page and "/static/chat.css" in page
    for path in ("/", "/static/chat.js", "/static/chat.css"):  # everything is served here: no CDN, no web fonts
        status, text = _get(server + path)
        assert status == 200 and "http://" not in text and "https://" not in text and "@import" not in text


def test_conversations_equal_the_chat_session_and_eval_replay(server, served, conversation, image_root, chat_ckpt,
                                                               tmp_path):
    plain, streamed = served["plain"], served["streamed"]
    assert [r[0] for r in streamed] == [r[0] for r in plain]  # streaming changes nothing
    assert {r[3] for r in plain} <= {"stop", "length"}
    # later rounds prefill only what is new: the whole previous prompt comes from the cache
    for before, now in zip(plain, plain[1:]):
        assert before[1] <= now[2] < now[1]
    assert all(r[2] >= r[1] - 1 for r in streamed)  # the same conversation again: all cached but the last position

    api = client(server)
    images = {name: _b64(image_root / f"{name}.png") for name in ("red", "green", "blue")}
    rounds = [(conversation[0][0], [images["red"], images["green"]], plain[0][0]),
              (conversation[1][0], [images["blue"]], plain[1][0]), (conversation[2][0], [], plain[2][0])]
    single = [("What colour is the shape in image 1?", ["red", "green"]), ("Describe image 1.", ["blue"]),
              ("Which one is bigger?", [])]
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(json.dumps({f"c{i}": [[q, " ".join(f"{n}.png" for n in ims)] if ims else [q]]
                                     for i, (q, ims) in enumerate(single)}))
    sampled = (single[0][0], [images["red"]], dict(temperature=1.0, top_p=0.9, seed=5))
    ref = run_parallel(_references, args=(chat_ckpt, [rounds], str(eval_file), str(image_root), sampled))[0]

    assert [(a, n) for a, n, _, _ in plain] == ref["chat"][0]
    served_single = [api.chat.completions.create(model="tiny-vchat", messages=[user(q, *(f"{n}.png" for n in ims))])
                     .choices[0].message.content for q, ims in single]
    assert [(a, "") for a in served_single] == ref["replay"]  # (answer, no error)
    # sampling is seeded per request: the same answer as a fresh chat session, warm cache or not
    for _ in range(2):
        answer = api.chat.completions.create(model="tiny-vchat", messages=[user(single[0][0], "red.png")],
                                             temperature=1.0, top_p=0.9, seed=5).choices[0].message.content
        assert answer == ref["sampled"]


def test_stop_strings_and_max_tokens(server, served, conversation):
    api = client(server)
    messages = [user(*conversation[0][:1], *conversation[0][1])]
    answer = served["plain"][0][0]
    assert len(answer) >= 2, "the tiny model's greedy answer should have text to cut"
    stop = answer[len(answer) // 2:]
    cut = api.chat.completions.create(model="tiny-vchat", messages=messages, stop=[stop, "never"])
    assert cut.choices[0].message.content == answer[:answer.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = [c.choices[0].delta.content or "" for c in api.chat.completions.create(
        model="tiny-vchat", messages=messages, stop=stop, stream=True)]
    assert "".join(streamed) == answer[:answer.find(stop)]
    short = api.chat.completions.create(model="tiny-vchat", messages=messages, max_tokens=2)
    assert short.usage.completion_tokens == 2 and short.choices[0].finish_reason == "length"


def _bad_requests(image_root: Path) -> dict[str, tuple[bytes, int, str]]:
    """name -> (body, status, expected code or param)."""
    ok = user("What colour is image 1?", "red.png")

    def body(**fields) -> bytes:
        return json.dumps({"model": "tiny-vchat", "messages": [ok], **fields}).encode()

    def with_url(url: str) -> bytes:
        return body(messages=[user("What colour is image 1?", url)])

    return {
        "malformed JSON": (b'{"messages": [', 400, None),
        "not an object": (b"[1, 2]", 400, None),
        "unknown role": (body(messages=[{"role": "robot", "content": "hi"}]), 400, "messages[0].role"),
        "no question last": (body(messages=[ok, {"role": "assistant", "content": "red"}]), 400, "messages"),
        "a part type": (body(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]), 400,
                        "messages[0].content[0]"),
        "too many images": (body(messages=[user("Compare them.", *["red.png"] * 5)]), 400, "too_many_images"),
        "undecodable image": (with_url(data_url(b"not a png at all")), 400, "corrupt_image"),
        "bad base64": (with_url("data:image/png;base64,@@@"), 400, "corrupt_image"),
        "over the pixel cap": (with_url("big.png"), 400, "image_too_large"),
        "over the byte cap": (with_url(data_url(b"x" * 60_000)), 400, "image_too_large"),
        "outside the root": (with_url("../outside.png"), 400, "image_outside_root"),
        "absolute path elsewhere": (with_url("/etc/passwd"), 400, "image_outside_root"),
        "symlink pointing out": (with_url("escape.png"), 400, "image_outside_root"),
        "missing file": (with_url("nope.png"), 400, "missing_image"),
        "network URL": (with_url("http://127.0.0.1:9/cat.png"), 400, "invalid_image_url"),
        "too long for the context": (body(messages=[user("colour " * 600)]), 400, "context_length_exceeded"),
        "n > 1": (body(n=2), 400, "unsupported_parameter"),
        "temperature out of range": (body(temperature=3), 400, "temperature"),
        "stop list too long": (body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
        "unknown model": (body(model="gpt-4"), 404, "model_not_found"),
    }


def test_bad_input_is_an_openai_error_and_the_server_goes_on(server, image_root):
    for name, (data, status, expected) in _bad_requests(image_root).items():
        got, body = post_raw(server, data)
        assert got == status, (name, body)
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], (name, body)
        assert expected is None or expected in (error["code"], error["param"]), (name, error)
        assert str(image_root.parent) not in error["message"], (name, error)  # the server's paths stay private
    status, error = _declare_body(server, 2 * 2**30)
    assert (status, error["code"]) == (413, "request_too_large"), error
    with pytest.raises(openai.BadRequestError, match="too many images"):
        client(server).chat.completions.create(model="tiny-vchat", messages=[user("Hi?", *["red.png"] * 5)],
                                                stream=True)
    assert _get(server + "/nowhere")[1]["error"]["code"] == "not_found"
    assert _get(server + "/v1/chat/completions") == (405, {"error": {
        "message": "Method Not Allowed", "type": "invalid_request_error", "param": None, "code": "method_not_allowed"}})
    status, good = post_raw(server, json.dumps({"messages": [user("What colour is image 1?", "red.png")]}).encode())
    assert status == 200 and good["choices"][0]["message"]["role"] == "assistant"


def _declare_body(url: str, length: int) -> tuple[int, dict]:
    """Sends only the headers of a body of ``length`` bytes and reads the answer: a body over the cap is refused
    from its Content-Length, before it is read (sending it would race the server's close with a broken pipe)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: " + str(length).encode() + b"\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)["error"]


def _slow_stream_request(url: str) -> socket.socket:
    """A client that asks for a stream and does not read it (yet)."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"messages": [user("Describe image 1.", "red.png")], "stream": True}).encode()
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def test_concurrent_clients_get_their_own_answers_within_the_cache_budget(server, chat_ckpt):
    clients, rounds = 8, 3
    images = [png_bytes(c, (28 + 4 * i, 30)) for i, c in enumerate(COLOURS[:clients])]
    questions = ["What colour is image 1?", "Is it bright?", "Describe it again."]
    plans = [[(f"{questions[r]} (client {i})", [data_url(images[i])] if r == 0 else []) for r in range(rounds)]
             for i in range(clients)]
    slow = _slow_stream_request(server)
    gone = client(server).chat.completions.create(model="tiny-vchat", stream=True,
                                                  messages=[user("Describe image 1.", "green.png")])
    next(iter(gone))
    gone.close()  # a client that leaves mid-stream
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda plan: _converse(client(server), plan, stream=plan is not plans[0]), plans))
    with slow:  # the slow client gets its whole stream once it reads
        data = b""
        while chunk := slow.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.rstrip().endswith(b"data: [DONE]")

    rounds_sent = [[(q, [u.split(",", 1)[1] for u in urls], answer) for (q, urls), (answer, *_) in zip(plan, res)]
                   for plan, res in zip(plans, results)]
    ref = run_parallel(_references, args=(chat_ckpt, rounds_sent))[0]
    assert [[(a, n) for a, n, _, _ in res] for res in results] == ref["chat"]
    health = _get(server + "/health")[1]
    kv = health["kv_cache"]
    assert health["queued"] == 0 and kv["conversations"] < clients  # the oldest were evicted
    assert kv["bytes"] <= kv["budget_bytes"] and kv["peak_bytes"] <= kv["budget_bytes"] + CACHE_ENTRY_BYTES


def test_tensor_parallel_server_equals_tp1_and_a_cold_cache(chat_ckpt, image_root, served, conversation, tmp_path):
    # --kv-cache-gib 0 keeps nothing between requests: every round is prefilled from scratch, on two ranks
    with running_server(chat_ckpt, tmp_path, "--image-root", str(image_root), "--max-new-tokens",
                        str(MAX_NEW_TOKENS), "--kv-cache-gib", "0", "--model-name", "tiny-vchat", tp=2) as url:
        cold = _converse(client(url), conversation, stream=True)
        kv = _get(url + "/health")[1]["kv_cache"]
    assert [r[0] for r in cold] == [r[0] for r in served["plain"]]
    assert [r[2] for r in cold] == [0, 0, 0] and kv["conversations"] == 0


def test_bad_options_are_one_line_and_status_2(chat_ckpt, tmp_path, capsys):
    from megatron_visualchat.inference.server import main

    for options, message in [(["--kv-cache-gib", "-1"], "--kv-cache-gib -1.0 must be >= 0"),
                             (["--image-root", str(tmp_path / "nope")], "is not a directory"),
                             (["--port", "70000"], "--port 70000 must be in 0..65535")]:
        assert main(["--load", chat_ckpt, *options]) == 2
        err = capsys.readouterr().err
        assert err.startswith("megatron-visualchat serve: error: ") and message in err and err.count("\n") == 1
