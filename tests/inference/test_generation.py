"""generate() on megatron-core's static KV cache (+ our token codes) equals a full recomputation without a cache,
for every attention mode / modality split / image-row rule; batched prompts of different lengths equal the
prompts alone; EOS, max-new-tokens and a full context stop generation as documented."""

import pytest
import torch

from megatron_visualchat.testing.distributed import run_parallel

from .tiny import build_model, full_logits, max_abs_diff, tiny_cfg

# (mode, modality_split, image_rows, combine)
CONFIGS = [
    ("mmca", "none", "self", "sum"),
    ("mmca", "qkvo", "self", "sum"),
    ("mmca", "kv", "image", "mean"),
    ("mmca", "qkv", "self+text", "sum"),
    ("causal", "none", "self", "sum"),
    ("causal", "qkvo", "self", "sum"),
    ("causal", "kv", "self", "sum", "modality-norms"),  # mPLUG-Owl2
]
NEW = 8


def _prompt(tok, model, questions_images, seed=0):
    """One row: DS-VisualChat rounds (system prompt, then images, then the question) with random pixels."""
    from megatron_visualchat.data.templates import TEMPLATES
    from megatron_visualchat.inference.prompt import Segment, round_segment

    g = torch.Generator().manual_seed(seed)
    seg, shown = Segment(), 0
    for index, (question, n_images) in enumerate(questions_images):
        pixels = [torch.randn(3, 32, 32, generator=g) for _ in range(n_images)]
        seg = seg + round_segment(tok, TEMPLATES["dsvc"], index, question, pixels, images_before=shown,
                                  num_image_tokens=model.vision.num_output_tokens)
        shown += n_images
    return seg


def _generate(model, tok, segments, params, max_length=512, eos_id=None):
    from megatron_visualchat.inference.generation import generate
    from megatron_visualchat.inference.kv_cache import KVCache
    from megatron_visualchat.inference.prompt import Chunk

    cache = KVCache(len(segments), max_length)
    gen = generate(model, cache, Chunk.from_segments(segments, tok.pad_id), params,
                   eos_id=tok.eos_id if eos_id is None else eos_id, vocab_size=model.cfg.llm.vocab_size,
                   pad_id=tok.pad_id, banned_ids=(tok.image_id, tok.pad_id, tok.bos_id), keep_logits=True)
    return gen, cache


def _cached_vs_full(tok_dir):
    from megatron_visualchat.data import VisualChatTokenizer
    from megatron_visualchat.inference.prompt import Segment
    from megatron_visualchat.inference.sampling import SamplingParams, restrict_vocabulary

    tok = VisualChatTokenizer.load(tok_dir)
    out = {}
    for conf in CONFIGS:
        model = build_model(tiny_cfg(tok.vocab_size, *conf))
        # two rounds in one prompt: text before the first image, two images, then a third in round 2
        prompt = _prompt(tok, model, [("What is in image 1 and image 2?", 2), ("And now?", 1)])
        gen, cache = _generate(model, tok, [prompt], SamplingParams(max_new_tokens=NEW, stop_on_eos=False))
        tokens = gen.tokens[0]
        full = restrict_vocabulary(full_logits(model, prompt + Segment.text(tokens[:-1])), model.cfg.llm.vocab_size,
                                   (tok.image_id, tok.pad_id, tok.bos_id))
        steps = full[len(prompt) - 1:]
        err, scale = max_abs_diff(torch.cat(gen.step_logits), steps)
        out[conf] = dict(tokens=tokens, full_tokens=steps.argmax(-1).tolist(), err=err, scale=scale,
                         cache_length=cache.length, prompt=len(prompt), pending=gen.pending[0], finish=gen.finish[0])
    return out


@pytest.fixture(scope="module")
def cached_vs_full(tok_dir):
    return run_parallel(_cached_vs_full, args=(tok_dir,))[0]


@pytest.mark.parametrize("conf", CONFIGS, ids=["-".join(c) for c in CONFIGS])
def test_cached_generation_equals_full_recomputation(cached_vs_full, conf):
    r = cached_vs_full[conf]
    assert r["tokens"] == r["full_tokens"]
    assert r["err"] < 1e-4 * max(1.0, r["scale"]), r
    assert len(r["tokens"]) == NEW and r["finish"] == "length"
    # the prompt and every sampled token but the last were written to the cache; the last is pending
    assert r["cache_length"] == r["prompt"] + NEW - 1 and r["pending"] == r["tokens"][-1:]


def _batched(tok_dir):
    from megatron_visualchat.data import VisualChatTokenizer
    from megatron_visualchat.inference.sampling import SamplingParams

    tok = VisualChatTokenizer.load(tok_dir)
    model = build_model(tiny_cfg(tok.vocab_size, "mmca", "qkvo"))
    prompts = [_prompt(tok, model, [("Hello there, what do you see?", 0)], seed=1),
               _prompt(tok, model, [("What is in image 1?", 1)], seed=2),
               _prompt(tok, model, [("Compare.", 2), ("Which one is red?", 1)], seed=3)]
    params = SamplingParams(max_new_tokens=NEW, stop_on_eos=False)
    batch, _ = _generate(model, tok, prompts, params)
    alone = [_generate(model, tok, [p], params)[0] for p in prompts]
    diffs = [max_abs_diff(torch.stack(batch.step_logits)[:, r], torch.stack(a.step_logits)[:, 0])
             for r, a in enumerate(alone)]
    return dict(lengths=[len(p) for p in prompts], batch=batch.tokens, alone=[a.tokens[0] for a in alone],
                errs=[d[0] for d in diffs], scale=max(d[1] for d in diffs))


def test_batched_prompts_of_different_lengths_match_each_alone(tok_dir):
    r = run_parallel(_batched, args=(tok_dir,))[0]
    assert len(set(r["lengths"])) == 3  # left padding really happened
    assert r["batch"] == r["alone"]
    assert max(r["errs"]) < 1e-4 * max(1.0, r["scale"]), r["errs"]


def _stopping(tok_dir):
    from megatron_visualchat.data import VisualChatTokenizer
    from megatron_visualchat.inference.sampling import SamplingParams

    tok = VisualChatTokenizer.load(tok_dir)
    model = build_model(tiny_cfg(tok.vocab_size))
    prompts = [_prompt(tok, model, [("What is in image 1?", 1)], seed=4),
               _prompt(tok, model, [("Say something.", 0)], seed=5)]
    free, _ = _generate(model, tok, prompts, SamplingParams(max_new_tokens=NEW, stop_on_eos=False))
    row0 = free.tokens[0]
    k = next(i for i in range(1, NEW) if row0[i] not in row0[:i])  # a token whose first appearance is step k
    stopped, cache = _generate(model, tok, prompts, SamplingParams(max_new_tokens=NEW), eos_id=row0[k])
    prompt_len = max(len(p) for p in prompts)
    tight, tight_cache = _generate(model, tok, prompts[:1], SamplingParams(max_new_tokens=NEW, stop_on_eos=False),
                                   max_length=len(prompts[0]) + 3)
    errors = []
    for max_length in (len(prompts[0]) - 1, 512):  # a prompt over the context; a model left in training mode
        model.train(max_length == 512)
        try:
            _generate(model, tok, prompts[:1], SamplingParams(max_new_tokens=2), max_length=max_length)
        except ValueError as e:
            errors.append(str(e))
    return dict(free=free.tokens, k=k, stopped=stopped.tokens, finish=stopped.finish, pending=stopped.pending,
                cache_length=cache.length, prompt_len=prompt_len, tight=tight.tokens[0], tight_finish=tight.finish[0],
                tight_length=tight_cache.length, tight_max=tight_cache.max_length, errors=errors)


def test_eos_max_tokens_and_full_context_stop_generation(tok_dir):
    r = run_parallel(_stopping, args=(tok_dir,))[0]
    k, free = r["k"], r["free"]
    eos = free[0][k]
    assert r["stopped"][0] == free[0][: k + 1] and r["finish"][0] == "eos"
    # row 1 kept going (finished row 0 fed its EOS, then pads nobody attends to): unchanged up to its own stop
    stop1 = free[1].index(eos) + 1 if eos in free[1] else len(free[1])
    assert r["stopped"][1] == free[1][:stop1]
    assert r["finish"][1] == ("eos" if eos in free[1] else "length")
    assert r["pending"][0] == ([] if stop1 > k + 1 else [eos])
    assert r["cache_length"] == r["prompt_len"] + max(k + 1, stop1) - 1
    # a context with room for 3 more positions: 3 tokens fed, a 4th sampled, then "context_full"
    assert r["tight"] == free[0][:4] and r["tight_finish"] == "context_full"
    assert r["tight_length"] == r["tight_max"]
    over, training = r["errors"]
    assert "new positions do not fit" in over and "eval mode" in training
