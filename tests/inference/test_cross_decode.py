"""Cross mode (CrA) under the KV cache: a chat checkpoint loads, and two rounds with images in both equal a full
forward without a cache at every step (a position sees exactly the images shown so far, as in training); each
image is encoded and its cross K/V projected once; the server's follow-up and branched requests reuse a cached
conversation's image K/V and answer as a cold cache does; TP=2 gives the TP=1 answers."""

import pytest
import torch

from megatron_visualchat.testing.distributed import run_parallel

from .tiny import build_model, full_logits, max_abs_diff, tiny_cfg

QUESTIONS = ["What colour is the shape in image 1?", "And in image 3? Compare them.", "Which one is bigger?"]
NEW = 6
GATE = 1.0  # open gates: the cross layers change the logits (they add nothing at their initial 0)


def _save_cross_checkpoint(tok_dir: str, out_dir: str) -> None:
    from megatron_visualchat.checkpoint.chat import save_chat_checkpoint
    from megatron_visualchat.data import VisualChatTokenizer

    tok = VisualChatTokenizer.load(tok_dir)
    model = build_model(tiny_cfg(tok.vocab_size, "cross"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("cross_attention.gate"):
                p.fill_(GATE)
    save_chat_checkpoint(model, tok, out_dir)


@pytest.fixture(scope="module")
def cross_ckpt(tok_dir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("cross_ckpt"))
    run_parallel(_save_cross_checkpoint, args=(tok_dir, out))
    return out


def _count_projections(model) -> dict:
    """Images through the vision tower, and per cross layer images whose K/V were projected (rows / T)."""
    t = model.vision.num_output_tokens
    counts = {"encoded": 0, "projected": {}}

    def encoded(module, args, output):
        counts["encoded"] += args[0].shape[0]

    def projected(number, module, args, output):
        counts["projected"][number] = counts["projected"].get(number, 0) + args[0].shape[0] * args[0].shape[1] // t

    model.vision.register_forward_hook(encoded)
    for layer in model.language_model.decoder.layers:
        if hasattr(layer.cross_attention, "gate"):
            layer.cross_attention.linear_kv.register_forward_hook(
                lambda *a, n=layer.layer_number: projected(n, *a))
    return counts


def _two_rounds(session, images, keep_logits=False):
    return [session.ask(QUESTIONS[0], images[:2], keep_logits=keep_logits),
            session.ask(QUESTIONS[1], images[2:], keep_logits=keep_logits)]


def _chat(ckpt, images):
    from megatron_visualchat.inference.checkpoint import build_chat_model
    from megatron_visualchat.inference.sampling import SamplingParams, restrict_vocabulary
    from megatron_visualchat.inference.session import ChatSession

    model, tok, cfg = build_chat_model(ckpt)
    counts = _count_projections(model)
    params = SamplingParams(max_new_tokens=NEW, stop_on_eos=False)
    session = ChatSession(model, tok, sampling=params)
    turns = _two_rounds(session, images, keep_logits=True)
    out = dict(mode=cfg.attention.mode, tokens=[t.token_ids for t in turns],
               logits=[torch.cat(t.step_logits) for t in turns],
               counts=dict(encoded=counts["encoded"], projected=dict(counts["projected"])))
    if cfg.parallel.tp > 1:
        return out
    banned = (tok.image_id, tok.pad_id, tok.bos_id)
    full = restrict_vocabulary(full_logits(model, session.history), cfg.llm.vocab_size, banned)
    steps = [full[t.prompt_end:t.prompt_end + len(t.token_ids)] for t in turns]
    diffs = [max_abs_diff(torch.cat(t.step_logits), s) for t, s in zip(turns, steps)]
    recomputed = _two_rounds(ChatSession(model, tok, sampling=params, reuse_cache=False), images)
    with torch.no_grad():  # the same forward with closed gates: the images must matter for the test to mean much
        for name, p in model.named_parameters():
            if name.endswith("cross_attention.gate"):
                p.zero_()
    closed = restrict_vocabulary(full_logits(model, session.history), cfg.llm.vocab_size, banned)
    return dict(out, full_tokens=[s.argmax(-1).tolist() for s in steps], err=max(d[0] for d in diffs),
                scale=max(d[1] for d in diffs), gate_effect=max_abs_diff(closed, full)[0],
                markers=[m for m in session.history.modality if m == 2], layers=cfg.llm.num_layers,
                prompt_positions=[t.prompt_positions for t in turns], history=len(session.history),
                recomputed_positions=[t.prompt_positions for t in recomputed],
                recomputed_tokens=[t.token_ids for t in recomputed])


@pytest.fixture(scope="module")
def chat(cross_ckpt, images):
    return run_parallel(_chat, args=(cross_ckpt, images))[0]


def test_cached_decode_equals_full_forward_and_projects_each_image_once(chat):
    assert chat["mode"] == "cross"
    assert chat["tokens"] == chat["full_tokens"]
    # Measured: 7.6e-6 on logits of scale 23 (3.3e-7 relative, float32, CPU); closed gates move them by 17.
    assert chat["err"] < 1e-6 * max(1.0, chat["scale"]), chat["err"]
    assert chat["gate_effect"] > 1e-2
    assert len(chat["markers"]) == 3  # one position per image
    # round 2 prefilled only its own positions, and re-encoded nothing; recomputing everything agrees
    assert chat["prompt_positions"][1] < chat["recomputed_positions"][1] == chat["history"] - NEW + 1
    assert chat["recomputed_tokens"] == chat["tokens"]
    assert chat["counts"]["encoded"] == 3
    assert len(chat["counts"]["projected"]) == chat["layers"]  # interval 1: every layer has cross attention
    assert set(chat["counts"]["projected"].values()) == {3}


def test_tensor_parallel_2_equals_1(cross_ckpt, images, chat):
    for rank in run_parallel(_chat, tp=2, args=(cross_ckpt, images)):
        assert rank["tokens"] == chat["tokens"]
        for got, ref in zip(rank["logits"], chat["logits"]):
            err, scale = max_abs_diff(got, ref)
            assert err < 1e-6 * max(1.0, scale), err  # measured: 5.7e-6 at scale 23
        assert rank["counts"]["encoded"] == 3 and set(rank["counts"]["projected"].values()) == {3}


def _serve(ckpt, images):
    from megatron_visualchat.inference.checkpoint import build_chat_model
    from megatron_visualchat.inference.sampling import SamplingParams
    from megatron_visualchat.inference.serve_cache import ConversationPool
    from megatron_visualchat.inference.serve_engine import ServeEngine
    from megatron_visualchat.inference.serve_request import ChatRequest, RequestImage, RequestRound
    from megatron_visualchat.inference.session import load_chat_image

    model, tok, _ = build_chat_model(ckpt)
    counts = _count_projections(model)
    pictures = [RequestImage(str(i), load_chat_image(path).image) for i, path in enumerate(images)]

    def engine():
        return ServeEngine(model, tok, ConversationPool(256, torch.device("cpu"), 1 << 30),
                           defaults=SamplingParams(max_new_tokens=NEW, stop_on_eos=False))

    def ask(server, rounds):
        request = ChatRequest(tuple(RequestRound(q, tuple(pictures[i] for i in ims), a) for q, ims, a in rounds),
                              None, None, None, None, None, (), False, False)
        done = server.run(server.plan(server.prepare(request), request))
        return done.text, done.cached_tokens

    warm = engine()
    first, _ = ask(warm, [(QUESTIONS[0], [0], None)])
    follow_up = [(QUESTIONS[0], [0], first), (QUESTIONS[1], [1], None)]
    branch = [(QUESTIONS[0], [0], first), (QUESTIONS[2], [2], None)]  # forks the cache of the follow-up
    answers = [ask(warm, follow_up), ask(warm, branch)]
    encoded = counts["encoded"]
    cold = [ask(engine(), follow_up)[0], ask(engine(), branch)[0]]
    return dict(answers=answers, cold=cold, encoded=encoded)


def test_server_reuses_cached_image_key_values(cross_ckpt, images):
    r = run_parallel(_serve, args=(cross_ckpt, images))[0]
    assert [a for a, _ in r["answers"]] == r["cold"]
    assert all(cached > 0 for _, cached in r["answers"])
    assert r["encoded"] == 3  # image 0 once, for the first request; the follow-up and the branch reuse its K/V
