"""A JAM-Cross fused model (two towers, cross links, joint head) exported as a chat checkpoint talks: two chat
rounds with the KV cache equal a full forward without a cache at every step, with the gates open and tower B's head
half non-zero (so both towers and both link directions matter), also at TP=2; the ``eval-replay`` and ``chat``
commands and the server's engine answer with it (a cached conversation's follow-up and branch as a cold cache does);
an image is refused by name."""

import io
import json
import os

import pytest
import torch

from megatron_visualchat.testing.distributed import run_parallel

from .tiny import full_logits, max_abs_diff

QUESTIONS = ["What colour is the shape?", "And how big is it? Compare them."]
NEW = 5


def _save_jam_cross_checkpoint(tok_dir: str, out_dir: str) -> None:
    """A tiny fused model with links after layers 2 and 4, gates open, B's head half random: what
    ``pretrain_vchat.py --export-dir`` writes for a trained fusion."""
    import dataclasses

    from megatron_visualchat.checkpoint.chat import save_chat_checkpoint
    from megatron_visualchat.config import LLM_PRESETS, FusionConfig, VisualChatConfig
    from megatron_visualchat.data import VisualChatTokenizer
    from megatron_visualchat.model.jam_cross import JamCrossModel
    from megatron_visualchat.testing.equivalence import current_parallel

    tok = VisualChatTokenizer.load(tok_dir)
    torch.manual_seed(11)
    cfg = VisualChatConfig(llm=dataclasses.replace(LLM_PRESETS["tiny"], vocab_size=tok.vocab_size),
                           fusion=FusionConfig(kind="jam-cross", cross_interval=2), parallel=current_parallel())
    model = JamCrossModel(cfg.validate())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("cross_attention.gate"):
                p.fill_(1.0)
            elif name == "tower_b_output_layer.weight":
                p.normal_(0.0, 0.02)
            if "output_layer" in name:
                p.mul_(40.0)  # decisive greedy choices
    save_chat_checkpoint(model, tok, out_dir)


@pytest.fixture(scope="module")
def jam_ckpt(tok_dir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("jam_cross_ckpt"))
    run_parallel(_save_jam_cross_checkpoint, args=(tok_dir, out))
    return out


def _chat(ckpt, image, data=None, out_dir=None):
    from megatron_visualchat.config import ConfigError
    from megatron_visualchat.inference.checkpoint import build_chat_model
    from megatron_visualchat.inference.sampling import SamplingParams, restrict_vocabulary
    from megatron_visualchat.inference.session import ChatInputError, ChatSession
    from megatron_visualchat.model.jam_cross import JamCrossModel

    model, tok, cfg = build_chat_model(ckpt)
    assert isinstance(model, JamCrossModel)
    params = SamplingParams(max_new_tokens=NEW, stop_on_eos=False)
    session = ChatSession(model, tok, sampling=params)
    turns = [session.ask(q, keep_logits=True) for q in QUESTIONS]
    out = dict(tokens=[t.token_ids for t in turns], logits=[torch.cat(t.step_logits) for t in turns])
    if cfg.parallel.tp > 1:
        return out
    banned = (tok.image_id, tok.pad_id, tok.bos_id)
    full = restrict_vocabulary(full_logits(model, session.history), cfg.llm.vocab_size, banned)
    steps = [full[t.prompt_end:t.prompt_end + len(t.token_ids)] for t in turns]
    diffs = [max_abs_diff(torch.cat(t.step_logits), s) for t, s in zip(turns, steps)]
    # what the open gates and B's head half change: the same forward with them closed
    with torch.no_grad():
        saved = {n: p.clone() for n, p in model.named_parameters() if n.endswith("gate") or n.startswith("tower_b_o")}
        for name, p in model.named_parameters():
            if name in saved:
                p.zero_()
        closed = restrict_vocabulary(full_logits(model, session.history), cfg.llm.vocab_size, banned)
        for name, p in model.named_parameters():
            if name in saved:
                p.copy_(saved[name])
    try:
        session.ask("What is in the picture?", [image])
        image_error = ""
    except ChatInputError as e:
        image_error = str(e)
    with pytest.raises(ConfigError, match="trains no LoRA adapters; drop --adapters"):
        build_chat_model(ckpt, adapters=ckpt)
    return dict(out, full_tokens=[s.argmax(-1).tolist() for s in steps],
                err=max(d[0] for d in diffs), scale=max(d[1] for d in diffs),
                link_effect=max_abs_diff(closed, full)[0], image_error=image_error, serve=_serve(model, tok, image),
                answers=[t.answer for t in turns], commands=_commands(ckpt, image, data, out_dir))


def _commands(ckpt, image, data, out_dir) -> dict:
    """``eval-replay`` and ``chat`` as a user runs them on the checkpoint."""
    from megatron_visualchat.inference.cli import eval_main, main as chat_main

    common = ["--load", ckpt, "--max-new-tokens", str(NEW)]
    eval_main([*common, "--data", data, "--image-root", os.path.dirname(image), "--out-dir", out_dir],
              stdout=io.StringIO())
    with open(os.path.join(out_dir, "results.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    shown = io.StringIO()
    chat_main(common, stdin=io.StringIO(QUESTIONS[0] + "\n"), stdout=shown)
    return dict(records=[(r["answer"], r["error"]) for r in records], chat=shown.getvalue())


def _serve(model, tok, image) -> dict:
    """The server's engine on the same model: a follow-up and a branch reuse a cached conversation (every stream's
    K/V travels with it) and answer as a cold cache does; an image is refused."""
    from megatron_visualchat.inference.sampling import SamplingParams
    from megatron_visualchat.inference.serve_cache import ConversationPool
    from megatron_visualchat.inference.serve_engine import ServeEngine
    from megatron_visualchat.inference.serve_request import ChatRequest, RequestError, RequestImage, RequestRound
    from megatron_visualchat.inference.session import load_chat_image

    def engine():
        return ServeEngine(model, tok, ConversationPool(256, torch.device("cpu"), 1 << 30),
                           defaults=SamplingParams(max_new_tokens=NEW, stop_on_eos=False))

    def ask(server, rounds):
        request = ChatRequest(tuple(RequestRound(q, ims, a) for q, ims, a in rounds),
                              None, None, None, None, None, (), False, False)
        done = server.run(server.plan(server.prepare(request), request))
        return done.text, done.cached_tokens

    warm = engine()
    first, _ = ask(warm, [(QUESTIONS[0], (), None)])
    follow_up = [(QUESTIONS[0], (), first), (QUESTIONS[1], (), None)]
    branch = [(QUESTIONS[0], (), first), ("Which one is bigger?", (), None)]  # forks the follow-up's cache
    answers = [ask(warm, follow_up), ask(warm, branch)]
    try:
        ask(warm, [(QUESTIONS[0], (RequestImage("0", load_chat_image(image).image),), None)])
        image_error = ""
    except RequestError as e:
        image_error = e.message
    return dict(first=first, answers=answers, cold=[ask(engine(), follow_up)[0], ask(engine(), branch)[0]],
                image_error=image_error)


@pytest.fixture(scope="module")
def chat(jam_ckpt, images, tmp_path_factory):
    root = tmp_path_factory.mktemp("jam_replay")
    data = root / "replay.json"
    data.write_text(json.dumps({"text": [[QUESTIONS[0]], [QUESTIONS[1]]],
                                "with image": [[QUESTIONS[0], os.path.basename(images[0])]]}))
    return run_parallel(_chat, args=(jam_ckpt, images[0], str(data), str(root / "out")))[0]


def test_cached_decode_equals_full_forward_and_eval_replay_answers(chat):
    r = chat
    assert r["tokens"] == r["full_tokens"]
    assert r["err"] < 1e-6 * max(1.0, r["scale"]), (r["err"], r["scale"])
    assert r["link_effect"] > 1e-2
    assert "text only" in r["image_error"]
    (a1, e1), (a2, e2), (a3, e3) = r["commands"]["records"]
    assert (e1, e2) == ("", "") and [a1, a2] == r["answers"]
    assert "text only" in e3 and a3 == ""
    assert "jam-cross towers, cross links every 2 layer(s), text only" in r["commands"]["chat"]
    assert r["answers"][0] in r["commands"]["chat"]
    serve = r["serve"]
    assert serve["first"] == r["answers"][0]  # rendered and decoded as chat does
    assert [a for a, _ in serve["answers"]] == serve["cold"]
    assert all(cached > 0 for _, cached in serve["answers"])
    assert "text only" in serve["image_error"]


def test_tensor_parallel_2_equals_1(jam_ckpt, images, chat):
    for rank in run_parallel(_chat, tp=2, args=(jam_ckpt, images[0])):
        assert rank["tokens"] == chat["tokens"]
        for got, ref in zip(rank["logits"], chat["logits"]):
            err, scale = max_abs_diff(got, ref)
            assert err < 1e-6 * max(1.0, scale), (err, scale)
