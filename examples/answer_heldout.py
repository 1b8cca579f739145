"""Answer one held-out multi-image conversation of the synthetic set with a chat checkpoint (quickstart's last
step): each round shows its images, asks its question, and prints the model's answer beside the expected one."""

from __future__ import annotations

import argparse
import json
import os
import re


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="chat checkpoint (pretrain_vchat --export-dir)")
    p.add_argument("--eval-file", required=True, help="held-out synthetic eval.jsonl")
    p.add_argument("--min-images", type=int, default=2)
    p.add_argument("--conversations", type=int, default=3, help="how many held-out conversations to answer")
    args = p.parse_args(argv)

    from megatron_visualchat.inference.checkpoint import build_chat_model
    from megatron_visualchat.inference.cli import init_inference_parallel
    from megatron_visualchat.inference.sampling import SamplingParams
    from megatron_visualchat.inference.session import ChatSession

    with open(args.eval_file) as f:
        conversations = [json.loads(line) for line in f]
    chosen = [c for c in conversations if sum(len(r["images"]) for r in c["rounds"]) >= args.min_images]
    info = init_inference_parallel(1, seed=0)
    model, tokenizer, _ = build_chat_model(args.load, device=info.device)
    root = os.path.dirname(os.path.abspath(args.eval_file))
    correct = total = 0
    for conv in chosen[: args.conversations]:
        session = ChatSession(model, tokenizer, sampling=SamplingParams(max_new_tokens=8))
        print(f"held-out conversation {conv['id']}:")
        for r in conv["rounds"]:
            question = re.sub(r"IMAGE#(\d+)", r"image \1", r["question"])  # images are numbered in order shown
            images = [os.path.join(root, path) for path in r["images"]]
            answer = session.ask(question, images).answer.strip()
            correct, total = correct + (answer == r["answer"]), total + 1
            shown = ", ".join(os.path.basename(i) for i in images) or "no new image"
            print(f"  [{shown}] {question}\n    model: {answer!r}   expected: {r['answer']!r}")
    print(f"{correct}/{total} answers correct")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
