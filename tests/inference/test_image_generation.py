"""Drawing images as codes (inference/image_generation.py): after <boi> exactly num_codes code tokens, then <eoi>
forced, never an image token in text, even where the model's own argmax says otherwise; classifier-free guidance
equals uncond + scale * (cond - uncond) recomputed without a cache; TP=2 draws what TP=1 draws; the chat
checkpoint carries the image tokenizer, chat / eval-replay write PNGs equal to its decode(codes), and the server
returns them as image parts.

The tiny random model is steered by its output layer: the <boi> row is set to twice the row of the token it would
say first, so it opens an image at once (and, in the second variant, a code row to three times, so an unmasked
code would win in text)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import openai
import pytest
import torch
from PIL import Image

from megatron_visualchat.testing.distributed import run_parallel

from .test_server import running_server
from .tiny import build_model, full_logits, max_abs_diff, tiny_cfg

CODEBOOK, VQ_SIZE = 16, 8  # tiny_vqvae: (8 / 4)^2 = 4 codes per image
NUM_CODES = (VQ_SIZE // 4) ** 2
CFG = 3.0
QUESTION = "Draw a red circle."


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory) -> str:
    from megatron_visualchat.model.image_tokenizer.tiny_vqvae import TinyVQVAE, TinyVQVAEConfig, TinyVQVAETokenizer

    torch.manual_seed(0)
    out = str(tmp_path_factory.mktemp("vq"))
    TinyVQVAETokenizer.save(TinyVQVAE(TinyVQVAEConfig(image_size=VQ_SIZE, codebook_size=CODEBOOK, embed_dim=4,
                                                      channels=4)), out)
    return out


@pytest.fixture(scope="module")
def draw_tok_dir(tok_dir, tmp_path_factory) -> str:
    """The test tokenizer with an image vocabulary of CODEBOOK codes."""
    from megatron_visualchat.data import VisualChatTokenizer

    out = str(tmp_path_factory.mktemp("draw_tok"))
    VisualChatTokenizer.from_model_file(f"{tok_dir}/tokenizer.model", CODEBOOK).save(out)
    return out


# ---- helpers run inside the ranks ----------------------------------------------------------------------------------
def _prompt(tok, model, n_images=1):
    from megatron_visualchat.data.templates import TEMPLATES
    from megatron_visualchat.inference.prompt import round_segment

    pixels = [torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(n_images)]
    return round_segment(tok, TEMPLATES["dsvc"], 0, QUESTION, pixels, images_before=0,
                         num_image_tokens=model.vision.num_output_tokens)


def _banned(tok):
    return (tok.image_id, tok.pad_id, tok.bos_id)


def _steer(model, tok, prompt, code_in_text=False) -> None:
    """<boi> (and optionally code 5) made to win the first step of ``prompt`` (TP=1 weights)."""
    from megatron_visualchat.inference.sampling import restrict_vocabulary

    vocab = tok.image_vocab
    first = restrict_vocabulary(full_logits(model, prompt)[-1:], tok.vocab_size,
                                _banned(tok) + tuple(range(vocab.base_id, tok.vocab_size))).argmax().item()
    weight = dict(model.named_parameters())[next(n for n, _ in model.named_parameters() if "output_layer" in n)]
    with torch.no_grad():
        weight[vocab.boi_id] = 2 * weight[first]
        if code_in_text:
            weight[vocab.first_code_id + 5] = 3 * weight[first]


def _generate(model, tok, prompt, rule, max_new_tokens=12, **sampling):
    from megatron_visualchat.inference.generation import generate
    from megatron_visualchat.inference.kv_cache import KVCache
    from megatron_visualchat.inference.prompt import Chunk
    from megatron_visualchat.inference.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, stop_on_eos=False, **sampling)
    return generate(model, KVCache(1, 256), Chunk.from_segments([prompt], tok.pad_id), params, eos_id=tok.eos_id,
                    vocab_size=tok.vocab_size, pad_id=tok.pad_id, banned_ids=_banned(tok),
                    generator=torch.Generator().manual_seed(3), keep_logits=True, images=rule)


def _models(draw_tok_dir, vq_dir):
    from megatron_visualchat.data import VisualChatTokenizer
    from megatron_visualchat.inference.image_generation import ImageAnswers
    from megatron_visualchat.model.image_tokenizer import load_image_tokenizer

    tok = VisualChatTokenizer.load(draw_tok_dir)
    rule = ImageAnswers(tok, load_image_tokenizer("tiny_vqvae", vq_dir)).rule
    model = build_model(tiny_cfg(tok.vocab_size, "mmca", "qkvo"))
    return tok, rule, model


def _restriction(draw_tok_dir, vq_dir):
    from megatron_visualchat.inference.prompt import Segment

    tok, rule, model = _models(draw_tok_dir, vq_dir)
    prompt = _prompt(tok, model)
    out = {}
    for variant, code_in_text in (("boi", False), ("code_in_text", True)):
        _steer(model, tok, prompt, code_in_text)
        gen = _generate(model, tok, prompt, rule)
        tokens = gen.tokens[0]
        raw = full_logits(model, prompt + Segment.text(tokens[:-1]))[len(prompt) - 1:, :tok.vocab_size]
        out[variant] = dict(tokens=tokens, raw_argmax=raw.argmax(-1).tolist(),
                            sampled=_generate(model, tok, prompt, rule, temperature=1.0).tokens[0])
    out["no_room"] = _generate(model, tok, prompt, rule, max_new_tokens=NUM_CODES + 1).tokens[0]
    return dict(out, vocab=tok.image_vocab)


def _images_in(tokens, vocab):
    """The code runs of ``tokens``, checking the layout: text with no image tokens but <boi>, which is followed by
    exactly NUM_CODES codes and <eoi>."""
    runs, i = [], 0
    image_tokens = range(vocab.base_id, vocab.base_id + vocab.num_tokens)
    while i < len(tokens):
        if tokens[i] == vocab.boi_id:
            run = tokens[i + 1: i + 1 + NUM_CODES]
            assert len(run) == NUM_CODES and all(vocab.is_code(t) for t in run), tokens
            assert tokens[i + 1 + NUM_CODES] == vocab.eoi_id, tokens
            runs.append(run)
            i += NUM_CODES + 2
        else:
            assert tokens[i] not in image_tokens, tokens
            i += 1
    return runs


def test_images_are_exactly_num_codes_codes_between_breaks(draw_tok_dir, vq_dir):
    r = run_parallel(_restriction, args=(draw_tok_dir, vq_dir))[0]
    vocab = r["vocab"]
    for variant in ("boi", "code_in_text"):
        tokens, raw = r[variant]["tokens"], r[variant]["raw_argmax"]
        assert tokens[0] == vocab.boi_id and len(_images_in(tokens, vocab)) >= 1
        assert _images_in(r[variant]["sampled"], vocab) is not None  # sampled (temperature 1): the same layout
        code_steps = range(1, 1 + NUM_CODES)
        if variant == "boi":  # unrestricted, the model would have written text inside the image
            assert any(not vocab.is_code(raw[s]) for s in code_steps), raw
        else:  # ... and an image code as its first answer token
            assert raw[0] == vocab.first_code_id + 5
    # an image that could not be finished within max_new_tokens is never started
    assert r["no_room"][0] != vocab.boi_id and _images_in(r["no_room"], vocab) == []


def _guidance(draw_tok_dir, vq_dir):
    from megatron_visualchat.inference.prompt import Segment

    tok, rule, model = _models(draw_tok_dir, vq_dir)
    prompt = _prompt(tok, model)
    _steer(model, tok, prompt)
    plain, off = _generate(model, tok, prompt, rule), _generate(model, tok, prompt, rule, cfg_scale=1.0)
    gen = _generate(model, tok, prompt, rule, cfg_scale=CFG)
    tokens = gen.tokens[0]
    cond = full_logits(model, prompt + Segment.text(tokens[:-1]))[len(prompt) - 1:, :tok.vocab_size]
    vocab = tok.image_vocab
    start = tokens.index(vocab.boi_id)
    codes = tokens[start + 1: start + 1 + NUM_CODES]
    uncond = full_logits(model, Segment.text([*rule.unconditional, vocab.boi_id, *codes[:-1]]))[2:, :tok.vocab_size]
    expected = cond.clone()
    expected[start + 1: start + 1 + NUM_CODES] = uncond + CFG * (cond[start + 1: start + 1 + NUM_CODES] - uncond)
    got = torch.cat(gen.step_logits)
    is_code = torch.tensor([vocab.is_code(t) for t in range(tok.vocab_size)])
    err, scale = max_abs_diff(got.masked_fill(~torch.isfinite(got), 0), expected.masked_fill(~torch.isfinite(got), 0))
    return dict(tokens=tokens, start=start, err=err, scale=scale,
                code_steps_finite=[torch.equal(torch.isfinite(got[s]), is_code)
                                   for s in range(start + 1, start + 1 + NUM_CODES)],
                plain=plain.tokens, off=off.tokens,
                plain_logits_equal=all(torch.equal(a, b) for a, b in zip(plain.step_logits, off.step_logits)),
                unguided=[t for t in plain.tokens[0]])


def test_classifier_free_guidance_is_the_formula(draw_tok_dir, vq_dir):
    r = run_parallel(_guidance, args=(draw_tok_dir, vq_dir))[0]
    assert r["err"] < 5e-6 * max(1.0, r["scale"]), (r["err"], r["scale"])  # measured 4e-7 relative
    assert all(r["code_steps_finite"])  # code steps choose among the codes only
    assert r["plain"] == r["off"] and r["plain_logits_equal"]  # cfg_scale 1 is no guidance, bit for bit
    assert r["tokens"][r["start"] + 1: r["start"] + 1 + NUM_CODES] != r["unguided"][1: 1 + NUM_CODES]


# ---- checkpoint, chat, eval-replay, server -------------------------------------------------------------------------
def _guided_chat(out):
    """A guided answer of the drawing checkpoint at the current TP size (the CLI's way to build it)."""
    from megatron_visualchat.inference.checkpoint import build_chat_model, load_chat_image_tokenizer
    from megatron_visualchat.inference.sampling import SamplingParams
    from megatron_visualchat.inference.session import ChatSession

    model, tok, _ = build_chat_model(out)
    session = ChatSession(model, tok, sampling=SamplingParams(max_new_tokens=10, cfg_scale=CFG),
                          image_tokenizer=load_chat_image_tokenizer(out))
    return session.ask(QUESTION).token_ids


def _drawing_checkpoint(draw_tok_dir, vq_dir, out, tok_dir):
    """Save a steered model with its image tokenizer; draw with eval-replay and chat (the commands), and a session."""
    from megatron_visualchat.checkpoint.chat import save_chat_checkpoint
    from megatron_visualchat.data import VisualChatTokenizer
    from megatron_visualchat.inference import cli
    from megatron_visualchat.inference.checkpoint import build_chat_model, load_chat_image_tokenizer
    from megatron_visualchat.inference.image_generation import ImageAnswers
    from megatron_visualchat.inference.sampling import SamplingParams
    from megatron_visualchat.inference.session import ChatSession

    tok = VisualChatTokenizer.load(draw_tok_dir)
    model = build_model(tiny_cfg(tok.vocab_size, "mmca", "qkvo"))
    _steer(model, tok, _prompt(tok, model, n_images=0))
    save_chat_checkpoint(model, tok, out, image_tokenizer=("tiny_vqvae", vq_dir))
    with open(f"{out}-eval.json", "w") as f:
        json.dump({"draw it/1": [[QUESTION]]}, f)
    progress, transcript = io.StringIO(), io.StringIO()
    common = ["--load", out, "--max-new-tokens", "10"]
    cli.eval_main([*common, "--data", f"{out}-eval.json", "--out-dir", f"{out}-eval"], stdout=progress)
    cli.main([*common, "--cfg-scale", str(CFG), "--image-out-dir", f"{out}-chat"], stdin=io.StringIO(QUESTION + "\n"),
             stdout=transcript)
    model, tok, _ = build_chat_model(out)
    vq = load_chat_image_tokenizer(out)
    sampling = SamplingParams(max_new_tokens=10)
    turn = ChatSession(model, tok, sampling=sampling, image_tokenizer=vq).ask(QUESTION)
    text_only = ChatSession(model, tok, sampling=sampling).ask(QUESTION)  # no image tokenizer: text only
    errors = []
    for bad in (lambda: ChatSession(model, tok, sampling=SamplingParams(cfg_scale=2.0)),
                lambda: ChatSession(model, VisualChatTokenizer.load(tok_dir), image_tokenizer=vq)):
        try:
            bad()
        except ValueError as e:
            errors.append(str(e))
    guided = _guided_chat(out)
    return dict(codes=turn.image_codes, answer=turn.answer, guided=guided, text_only=text_only.token_ids,
                errors=errors, vocab=tok.image_vocab, decoded=vq.decode(torch.tensor(turn.image_codes)),
                guided_decoded=vq.decode(torch.tensor(ImageAnswers(tok, vq).codes(guided))),
                progress=progress.getvalue(), transcript=transcript.getvalue())


@pytest.fixture(scope="module")
def drawing_ckpt(draw_tok_dir, vq_dir, tok_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("draw") / "chat")
    return out, run_parallel(_drawing_checkpoint, args=(draw_tok_dir, vq_dir, out, tok_dir))[0]


def _pixels(png: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(png)).convert("RGB"))).permute(2, 0, 1)


def _expected_pixels(decoded: torch.Tensor) -> torch.Tensor:
    return (decoded.clamp(0, 1) * 255).round().to(torch.uint8)


def test_chat_and_eval_replay_write_the_decoded_codes_as_png(drawing_ckpt):
    from megatron_visualchat.checkpoint.checksums import read_checksums

    out, r = drawing_ckpt
    assert "image_tokenizer/model.safetensors" in read_checksums(out, "")
    assert json.loads(open(f"{out}/image_tokenizer.json").read())["num_codes"] == NUM_CODES
    rec = json.loads(open(f"{out}-eval/results.jsonl").read())
    assert rec["answer"].startswith("OUTPUT#1") and rec["answer"] == r["answer"] and len(r["codes"]) >= 1
    assert rec["output_images"] == [f"{out}-eval/images/001-draw_it_1-r1-1.png"]
    with open(rec["output_images"][0], "rb") as f:
        assert torch.equal(_pixels(f.read()), _expected_pixels(r["decoded"][0]))
    assert "draw it/1 round 1: 10 tokens, 1 image(s)" in r["progress"]
    assert open(f"{out}-eval/summary.md").read().splitlines()[-1].endswith(" | 1 |")  # the images column
    # chat, guided: the answer streams with its marker, then the PNG is named
    chat_png = next(line for line in r["transcript"].splitlines() if line.startswith("  OUTPUT#1: "))[12:]
    assert chat_png.startswith(f"{out}-chat/") and chat_png.endswith("-r1-1.png")
    with open(chat_png, "rb") as f:
        assert torch.equal(_pixels(f.read()), _expected_pixels(r["guided_decoded"][0]))
    vocab = r["vocab"]
    assert not any(vocab.base_id <= t < vocab.base_id + vocab.num_tokens for t in r["text_only"])
    cfg_refused, no_vocab_refused = r["errors"]
    assert "cfg_scale=2.0" in cfg_refused and "draws no images" in cfg_refused
    assert "no image vocabulary" in no_vocab_refused


def test_guided_drawing_at_tp2_equals_tp1(drawing_ckpt):
    out, r = drawing_ckpt
    assert _images_in(r["guided"], r["vocab"])
    assert run_parallel(_guided_chat, tp=2, args=(out,)) == [r["guided"]] * 2


def test_server_returns_drawn_images_as_image_parts(drawing_ckpt, tmp_path):
    out, r = drawing_ckpt
    expected = _expected_pixels(r["decoded"][0])
    with running_server(out, tmp_path, "--max-new-tokens", "10") as url:
        api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": QUESTION}]
        content = api.chat.completions.create(model="chat", messages=messages).choices[0].message.content
        streamed = [c.choices[0].delta.content for c in api.chat.completions.create(model="chat", messages=messages,
                                                                                     stream=True) if c.choices]
    assert isinstance(content, list) and content[0]["type"] == "image_url"
    url = content[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert torch.equal(_pixels(base64.b64decode(url.split(",", 1)[1])), expected)
    assert [c for c in streamed if isinstance(c, list)] == [[content[0]]]
    assert "".join(c for c in streamed if isinstance(c, str)) == "".join(p["text"] for p in content[1:])


def test_drawing_options_are_checked_before_the_model_is_built(chat_ckpt, capsys):
    from megatron_visualchat.cli import main as console

    for argv, message in ((["--image-tokenizer", "nope:dir"], "image tokenizer 'nope' is not one of"),
                          (["--image-tokenizer", "tiny_vqvae"], "expected NAME:DIR"),
                          (["--cfg-scale", "-1"], "cfg_scale=-1.0 must be >= 0")):
        assert console(["chat", "--load", chat_ckpt, *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("megatron-visualchat chat: error: ") and message in err, err
