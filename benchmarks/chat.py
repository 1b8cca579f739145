"""Chat round latency as the conversation grows: KV-cache reuse (ours) vs re-encoding the whole history and all
images every round (DS-VisualChat's chat demo), on a randomly initialised model.

    python benchmarks/chat.py                                   # tiny model, CPU, float32 (seconds)
    python benchmarks/chat.py --preset llama2-7b --encoder clip-vit-l-14-224 --dtype bf16   # on a GPU

Round k shows one new image, asks one question and generates exactly --new-tokens tokens (EOS ignored, greedy).
With reuse, round k prefills only its own positions, so its latency should stay flat as k grows; re-encoding
prefills everything so far (and runs the vision encoder on all k images). Prints one markdown table of medians
over --repeats conversations (after one untimed warm-up conversation).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile

import torch
from PIL import Image

from megatron_visualchat.config import (
    ATTENTION_MODES, DTYPES, LLM_PRESETS, MODALITY_SPLITS, AttentionConfig, ParallelConfig, VisionConfig, VisualChatConfig,
)
from megatron_visualchat.data import train_tiny_sentencepiece
from megatron_visualchat.data.synthetic import synthetic_corpus_lines
from megatron_visualchat.data.templates import DSVC_SYSTEM
from megatron_visualchat.model.vision import ENCODERS

QUESTIONS = ["What is in image {k}?", "How does image {k} differ from the ones before?",
             "Describe the colours of image {k}."]
COLOURS = [(200, 30, 30), (30, 160, 40), (40, 60, 210), (230, 200, 30), (120, 40, 160), (20, 180, 180),
           (240, 120, 20), (90, 90, 90)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(LLM_PRESETS), default="tiny")
    parser.add_argument("--encoder", choices=sorted(ENCODERS), default="tiny")
    parser.add_argument("--mode", choices=ATTENTION_MODES, default="mmca")
    parser.add_argument("--modality-split", choices=MODALITY_SPLITS, default="none")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=None,
                        help="KV cache positions (default: max(model's max_position_embeddings, 2048))")
    parser.add_argument("--tokenizer", default=None, help="a saved VisualChatTokenizer directory (default: a tiny "
                                                          "sentencepiece model trained on the fly)")
    return parser.parse_args()


def build(args):
    from megatron_visualchat.data import VisualChatTokenizer
    from megatron_visualchat.model.visualchat import VisualChatModel
    from megatron_visualchat.parallel import initialize_parallel
    from megatron_visualchat.testing.distributed import free_port

    info = initialize_parallel(ParallelConfig(), seed=0, rank=0, world_size=1,
                               init_method=f"tcp://127.0.0.1:{free_port()}")
    if args.tokenizer:
        tok = VisualChatTokenizer.load(args.tokenizer)
    else:
        lines = synthetic_corpus_lines(num_samples=50) + [DSVC_SYSTEM] + [q.format(k=1) for q in QUESTIONS]
        tok = train_tiny_sentencepiece(tempfile.mkdtemp(), lines, vocab_size=400)
    llm = LLM_PRESETS[args.preset]
    llm = dataclasses.replace(llm, vocab_size=max(llm.vocab_size, tok.vocab_size))
    cfg = VisualChatConfig(llm=llm, attention=AttentionConfig(mode=args.mode, modality_split=args.modality_split),
                           vision=VisionConfig(encoder=args.encoder, projector="linear"))
    dtype = DTYPES[args.dtype]
    model = VisualChatModel(cfg, params_dtype=dtype).to(info.device).eval()
    return model, tok, info.device


def conversation(session, rounds: int) -> list:
    session.clear()
    turns = []
    for k in range(1, rounds + 1):
        image = Image.new("RGB", (64, 48), COLOURS[(k - 1) % len(COLOURS)])
        turns.append(session.ask(QUESTIONS[(k - 1) % len(QUESTIONS)].format(k=k), [image]))
    return turns


def measure(model, tok, args, reuse: bool) -> list[dict]:
    from megatron_visualchat.inference.sampling import SamplingParams
    from megatron_visualchat.inference.session import ChatSession

    session = ChatSession(model, tok, sampling=SamplingParams(max_new_tokens=args.new_tokens, stop_on_eos=False),
                          max_images=args.rounds, reuse_cache=reuse,
                          max_length=args.max_length or max(model.cfg.llm.max_position_embeddings, 2048))
    conversation(session, args.rounds)  # warm-up
    runs = [conversation(session, args.rounds) for _ in range(args.repeats)]
    return [dict(prefilled=runs[0][k].prompt_positions,
                 first=1e3 * statistics.median(r[k].seconds_to_first_token for r in runs),
                 total=1e3 * statistics.median(r[k].seconds for r in runs)) for k in range(args.rounds)]


def main() -> int:
    args = parse_args()
    model, tok, device = build(args)
    reuse, recompute = measure(model, tok, args, True), measure(model, tok, args, False)
    att = model.cfg.attention
    command = " ".join(["python benchmarks/chat.py", *sys.argv[1:]])
    print(f"`{command}` · {args.preset} + {args.encoder} "
          f"({model.vision.num_output_tokens} tokens/image) · {att.mode}/{att.modality_split} · {args.dtype} on "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'} · {args.new_tokens} new tokens/round "
          f"· median of {args.repeats}\n")
    print("| round | KV reuse: prefilled | first token (ms) | round (ms) "
          "| re-encode all: prefilled | first token (ms) | round (ms) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for k, (a, b) in enumerate(zip(reuse, recompute), start=1):
        print(f"| {k} | {a['prefilled']} | {a['first']:.1f} | {a['total']:.1f} "
              f"| {b['prefilled']} | {b['first']:.1f} | {b['total']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
