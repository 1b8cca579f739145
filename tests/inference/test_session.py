"""ChatSession: later rounds reuse the KV cache and still equal a full recomputation (new image in round 2,
text-only round 3), recompute-everything mode gives the same answers, bad input leaves the session usable, bad
limits are configuration errors, clear restarts reproducibly, streaming delivers the answer, and TP=2 equals
TP=1."""

import pytest
import torch

from megatron_visualchat.model.token_codes import NO_IMAGE
from megatron_visualchat.testing.distributed import run_parallel

from .tiny import build_model, full_logits, max_abs_diff, tiny_cfg

QUESTIONS = ["What colour is the shape in image 1?", "And in image 2? Compare them.", "Which one is bigger?"]


def _three_rounds(session, images, keep_logits=False):
    return [session.ask(QUESTIONS[0], [images[0]], keep_logits=keep_logits),
            session.ask(QUESTIONS[1], [images[1]], keep_logits=keep_logits),
            session.ask(QUESTIONS[2], keep_logits=keep_logits)]


def _rounds_vs_full(tok_dir, images):
    from megatron_visualchat.data import VisualChatTokenizer
    from megatron_visualchat.inference.sampling import SamplingParams, restrict_vocabulary
    from megatron_visualchat.inference.session import ChatSession

    tok = VisualChatTokenizer.load(tok_dir)
    out = {}
    for conf in [("mmca", "qkvo", "self", "sum"), ("mmca", "none", "image", "sum"), ("causal", "kv", "self", "sum")]:
        model = build_model(tiny_cfg(tok.vocab_size, *conf))
        params = SamplingParams(max_new_tokens=6, stop_on_eos=False)
        session = ChatSession(model, tok, sampling=params)
        turns = _three_rounds(session, images, keep_logits=True)
        full = restrict_vocabulary(full_logits(model, session.history), model.cfg.llm.vocab_size,
                                   (tok.image_id, tok.pad_id, tok.bos_id))
        diffs = [max_abs_diff(torch.cat(t.step_logits), full[t.prompt_end:t.prompt_end + len(t.token_ids)])
                 for t in turns]
        again = ChatSession(model, tok, sampling=params, reuse_cache=False)
        recomputed = _three_rounds(again, images)
        out[conf] = dict(
            tokens=[t.token_ids for t in turns], recomputed=[t.token_ids for t in recomputed],
            full_tokens=[full[t.prompt_end:t.prompt_end + len(t.token_ids)].argmax(-1).tolist() for t in turns],
            err=max(d[0] for d in diffs), scale=max(d[1] for d in diffs),
            new_images=[t.new_image_numbers for t in turns], image_ids=sorted(set(session.history.image_id)),
            prompt_positions=[t.prompt_positions for t in turns],
            recomputed_positions=[t.prompt_positions for t in recomputed],
            cache=session.cache.length, history=len(session.history), pending=session.pending)
    return out


@pytest.fixture(scope="module")
def rounds_vs_full(tok_dir, images):
    return run_parallel(_rounds_vs_full, args=(tok_dir, images))[0]


def test_later_rounds_reuse_the_cache_and_equal_full_recomputation(rounds_vs_full):
    for conf, r in rounds_vs_full.items():
        assert r["tokens"] == r["full_tokens"], conf
        assert r["err"] < 1e-4 * max(1.0, r["scale"]), (conf, r["err"])
        assert r["new_images"] == [[1], [2], []] and r["image_ids"] == [NO_IMAGE, 0, 1]
        assert r["cache"] == r["history"] and r["pending"][-1] == 2  # cut-off answer closed with EOS (id 2)


def test_recompute_mode_gives_the_same_answers_but_prefills_everything(rounds_vs_full):
    for conf, r in rounds_vs_full.items():
        assert r["recomputed"] == r["tokens"], conf
        reuse, full = r["prompt_positions"], r["recomputed_positions"]
        assert reuse[0] == full[0] and all(f > u for u, f in zip(reuse[1:], full[1:]))
        # round k prefills only round k (pending answer token + EOS + the new prompt)
        assert full[1] == reuse[0] + 6 + reuse[1] - 1


def _bad_inputs(tok_dir, images, tmp):
    from megatron_visualchat.config import ConfigError
    from megatron_visualchat.data import VisualChatTokenizer
    from megatron_visualchat.inference.sampling import SamplingParams
    from megatron_visualchat.inference.session import ChatInputError, ChatSession

    tok = VisualChatTokenizer.load(tok_dir)
    model = build_model(tiny_cfg(tok.vocab_size))
    params = SamplingParams(max_new_tokens=5, temperature=0.8, top_p=0.9, seed=3)
    reference = ChatSession(model, tok, sampling=params, max_images=2)
    expected = [reference.ask("Describe image 1.", [images[0]]).token_ids,
                reference.ask("Now image 2.", [images[1]]).token_ids]

    session = ChatSession(model, tok, sampling=params, max_images=2, max_length=260)
    errors, lengths = [], []

    def expect_error(*args):
        before = (session.length, session.cache.length, list(session.image_names), session.rounds)
        try:
            session.ask(*args)
        except ChatInputError as e:
            errors.append(str(e))
        else:
            errors.append(None)
        lengths.append(before == (session.length, session.cache.length, list(session.image_names), session.rounds))

    broken = tmp + "/broken.png"
    with open(broken, "wb") as f:
        f.write(b"not a png")
    expect_error("Describe image 1.", [tmp + "/missing.png"])
    expect_error("Describe image 1.", [broken])
    expect_error("   ", [images[0]])
    expect_error("Describe image 1.", [images[0], images[1], images[2]])
    expect_error("Describe image 1. " * 60, [images[0]])  # over the 260-position context
    first = session.ask("Describe image 1.", [images[0]]).token_ids
    expect_error("More.", [images[1], images[2]])  # 1 shown + 2 new > 2
    second = session.ask("Now image 2.", [images[1]]).token_ids
    expect_error("And a third?", [images[2]])
    session.clear()
    after_clear = session.ask("Describe image 1.", [images[0]]).token_ids
    refused = []
    for limits in (dict(max_length=0), dict(max_images=-1)):
        try:
            ChatSession(model, tok, **limits)
        except ConfigError as e:
            refused.append(str(e))
    return dict(errors=errors, unchanged=lengths, got=[first, second], expected=expected, after_clear=after_clear,
                refused=refused)


def test_bad_input_gets_a_clear_message_and_the_session_stays_usable(tok_dir, images, tmp_path):
    r = run_parallel(_bad_inputs, args=(tok_dir, images, str(tmp_path)))[0]
    missing, broken, empty, too_many, too_long, too_many_later, third = r["errors"]
    assert "missing.png" in missing and "not found" in missing
    assert "broken.png" in broken and "decode" in broken
    assert "empty" in empty
    assert "too many images" in too_many and "3 new > 2" in too_many
    assert "does not fit the context" in too_long and "260" in too_long
    assert "1 shown + 2 new > 2" in too_many_later and "clear" in third
    assert all(r["unchanged"]), r["unchanged"]
    # errors changed nothing: the same (sampled, seeded) answers as a session that never saw them
    assert r["got"] == r["expected"] and r["after_clear"] == r["expected"][0]
    # option values out of range are configuration errors (the CLI refuses them), 0 positions included
    assert r["refused"] == ["max_length=0 (--max-length) must be >= 1", "max_images=-1 (--max-images) must be >= 0"]


def _streaming(tok_dir, images):
    from megatron_visualchat.data import VisualChatTokenizer
    from megatron_visualchat.inference.sampling import SamplingParams
    from megatron_visualchat.inference.session import ChatSession

    tok = VisualChatTokenizer.load(tok_dir)
    session = ChatSession(build_model(tiny_cfg(tok.vocab_size)), tok, sampling=SamplingParams(max_new_tokens=12))
    pieces = []
    turn = session.ask("Describe image 1.", [images[0]], on_text=pieces.append)
    exchange_before = len(session.history) + len(session.pending)
    session.add_exchange("What colour is it?", "red", images[1])  # one image, no list
    return dict(pieces=pieces, answer=turn.answer, exchange_before=exchange_before, after=len(session.history),
                pending=session.pending, images=session.image_numbers, rounds=session.rounds)


def test_streamed_text_is_the_answer_and_known_exchanges_enter_the_history(tok_dir, images):
    r = run_parallel(_streaming, args=(tok_dir, images))[0]
    assert len(r["pieces"]) > 1 and "".join(r["pieces"]) == r["answer"]
    assert r["after"] > r["exchange_before"] and r["pending"] == []
    assert r["images"] == [1, 2] and r["rounds"] == 2


def _tp_session(ckpt, images):
    from megatron_visualchat.inference.checkpoint import build_chat_model
    from megatron_visualchat.inference.sampling import SamplingParams
    from megatron_visualchat.inference.session import ChatSession

    model, tok, _ = build_chat_model(ckpt)
    greedy = ChatSession(model, tok, sampling=SamplingParams(max_new_tokens=6, stop_on_eos=False))
    turns = _three_rounds(greedy, images, keep_logits=True)
    sampled = ChatSession(model, tok, sampling=SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.95, seed=9))
    return dict(tokens=[t.token_ids for t in turns], logits=[torch.cat(t.step_logits) for t in turns],
                sampled=[t.token_ids for t in _three_rounds(sampled, images)])


def test_tensor_parallel_2_equals_1(chat_ckpt, images):
    one = run_parallel(_tp_session, args=(chat_ckpt, images))[0]
    two = run_parallel(_tp_session, tp=2, args=(chat_ckpt, images))
    for rank in two:
        assert rank["tokens"] == one["tokens"]
        assert rank["sampled"] == two[0]["sampled"]  # every TP rank feeds the same sampled tokens
        for got, ref in zip(rank["logits"], one["logits"]):
            err, scale = max_abs_diff(got, ref)
            assert err < 1e-4 * max(1.0, scale)
