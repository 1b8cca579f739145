"""The chat REPL end to end through ``megatron-visualchat chat`` (cli.main) with a scripted terminal: images are
checked when attached and numbered, answers stream, clear/quit work, a refused message keeps its images attached,
and at TP=2 rank 0's input drives both ranks (same answers as TP=1, only rank 0 prints)."""

import io
import re

from megatron_visualchat.testing.distributed import run_parallel


def _chat(ckpt, script, extra=()):
    from megatron_visualchat.inference.cli import main

    out = io.StringIO()
    main(["--load", ckpt, "--max-new-tokens", "5", "--max-images", "2", *extra], stdin=io.StringIO(script),
         stdout=out)
    return out.getvalue()


def _script(images, missing):
    red, green, blue = images
    return "\n".join([
        "/help",
        f"/image {missing}",
        f"/image {red} {green} {blue}",  # only two fit (--max-images 2)
        "/images",
        "What colour is image 1?",
        "",
        "And image 2?",
        "clear",
        "/images",
        "What colour is image 1?",
        "quit",
        "never read",
    ]) + "\n"


def _answers(output):
    return re.findall(r"assistant> (.*?)\n  \[round", output, flags=re.S)


def test_scripted_chat_session(chat_ckpt, images, tmp_path):
    script = _script(images, tmp_path / "missing.png")
    out = run_parallel(_chat, args=(chat_ckpt, script))[0]
    assert "KV cache reused" in out and "/image PATH" in out
    assert "! not attached" in out and "missing.png" in out
    assert "attached " + images[0] + " as image 1" in out and "as image 2" in out
    assert f"not attached {images[2]}: at most 2 images" in out
    assert "image 2: " + images[1] + "  (attached, not sent yet)" in out
    assert "[images: none | +1 +2] you> " in out and "[images: 1 2] you> " in out
    assert "[round 1 · 5 tokens" in out and "[round 2 · " in out and "conversation cleared" in out
    assert "no images yet" in out and "never read" not in out
    answers = _answers(out)
    assert len(answers) == 3 and answers[2] != answers[1]


def test_rank0_drives_tensor_parallel_ranks(chat_ckpt, images, tmp_path):
    script = _script(images, tmp_path / "missing.png")
    one = run_parallel(_chat, args=(chat_ckpt, script))[0]
    two = run_parallel(_chat, tp=2, args=(chat_ckpt, script, ["--tp", "2"]))
    assert _answers(two[0]) == _answers(one) and two[1] == ""


def test_images_on_the_command_line_and_end_of_input(chat_ckpt, images):
    out = run_parallel(_chat, args=(chat_ckpt, "Describe image 1.\n", ["--image", images[0], "--recompute"]))[0]
    assert "as image 1" in out and "recompute every round" in out and "[round 1 · " in out


def test_a_refused_message_keeps_its_images_attached(chat_ckpt, images):
    script = "\n".join([
        f"/image {images[0]}",
        "Describe image 1. " * 60,  # over the 260-position context: refused
        "/images",
        "What colour is image 1?",  # the retry carries image 1
        f"/image {images[1]}",
        "/detach",
        "And now?",
        "quit",
    ]) + "\n"
    out = run_parallel(_chat, args=(chat_ckpt, script, ["--max-length", "260"]))[0]
    refused, retried = out.split("does not fit the context", 1)
    assert "still attached: +1 (sent with your next message; /detach drops them)" in retried
    assert "image 1: " + images[0] + "  (attached, not sent yet)" in retried
    assert "[round 1 · " in retried and "[round 1 · " not in refused
    assert "detached 1 image(s)" in retried and "[images: 1 | +2] you> " in retried
    assert retried.count("[images: 1] you> ") == 3  # after round 1, after /detach, after round 2 (no new image)
