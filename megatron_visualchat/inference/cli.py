"""``megatron-visualchat chat`` and ``megatron-visualchat eval-replay``.

One process per tensor-parallel rank: ``--tp 1`` runs as a plain command, ``--tp N`` under
``torchrun --nproc_per_node N``. Every rank builds its shard of the model from the chat checkpoint (``--load``,
see ``checkpoint/chat.py``); rank 0 talks to the user or writes the files.

Bad input (a wrong option value, a damaged checkpoint, a bad evaluation file, a path that does not exist) is
refused with one line, ``<command>: error: <what and how to fix it>``, and exit status 2, as the checkpoint
converter does; an operating-system failure on a path the user gave (a full disk, no permission) exits with 1.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional, Sequence, TextIO

import torch
import torch.distributed as dist

from megatron_visualchat.checkpoint.chat import read_chat_config
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.config import DTYPES, JAM_CROSS, ConfigError, ParallelConfig
from megatron_visualchat.data.errors import SampleError
from megatron_visualchat.data.files import FileRefused
from megatron_visualchat.data.templates import TEMPLATES
from megatron_visualchat.inference.checkpoint import build_chat_model, load_chat_image_tokenizer
from megatron_visualchat.inference.eval_replay import (
    load_eval_file,
    replay,
    summarize,
    summary_table,
    write_csv,
    write_jsonl,
)
from megatron_visualchat.inference.repl import ChatRepl
from megatron_visualchat.inference.sampling import SamplingParams
from megatron_visualchat.inference.session import DEFAULT_MAX_IMAGES, ChatInputError, ChatSession
from megatron_visualchat.model.image_tokenizer.registry import parse_image_tokenizer_spec


class InputRefused(ValueError):
    """Bad input reported as a plain ValueError by a check whose contract makes ValueError the input's fault."""


@contextmanager
def _checking_input():
    """Around a call whose ValueErrors all describe its input (sampling options, the evaluation file)."""
    try:
        yield
    except ValueError as e:
        raise InputRefused(str(e)) from e


# The input is wrong and the message says how: one line and exit status 2, never a traceback.
REFUSALS = (CheckpointError, ConfigError, SampleError, FileRefused, ChatInputError, InputRefused)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", required=True, help="chat checkpoint directory (model.safetensors, "
                                                      "visualchat_config.json, tokenizer files)")
    parser.add_argument("--adapters", default=None,
                        help="LoRA adapters written by pretrain_vchat.py --export-adapters, folded into the --load "
                             "weights at load time (docs/lora.md)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size = number of processes (torchrun)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default="dsvc",
                        help="chat format; must be the one the model was trained with")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="per round (DS-VisualChat: 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--cfg-scale", type=float, default=1.0,
                        help="classifier-free guidance on image codes, for a model that draws (1 = off; "
                             "docs/image_generation.md)")
    parser.add_argument("--image-tokenizer", default=None, metavar="NAME:DIR",
                        help="image tokenizer that draws the model's image codes (e.g. tiny_vqvae:runs/vq); default: "
                             "the one the chat checkpoint holds")
    parser.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES, help="per conversation")
    parser.add_argument("--max-length", type=int, default=None,
                        help="context window in positions, at most the model's max_position_embeddings (the "
                             "default)")
    parser.add_argument("--recompute", action="store_true",
                        help="re-encode the whole history and all images every round (DS-VisualChat's way) "
                             "instead of reusing the KV cache")


def init_inference_parallel(tp: int, seed: int):
    """Bring up TP=``tp`` process groups (or reuse ones already set up with that size); returns ParallelInfo."""
    # megatron-core is imported only once a model is to be run: `chat --help` and argument errors stay quick.
    from megatron.core import parallel_state as ps

    from megatron_visualchat.parallel import initialize_parallel, parallel_info

    if tp < 1:
        raise ConfigError(f"--tp {tp} must be >= 1")
    if dist.is_initialized() and ps.model_parallel_is_initialized():
        if ps.get_tensor_model_parallel_world_size() != tp or dist.get_world_size() != tp:
            raise ConfigError(f"--tp {tp} does not match the running process groups (world size "
                              f"{dist.get_world_size()}, TP {ps.get_tensor_model_parallel_world_size()})")
        return parallel_info()
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world != tp:
        raise ConfigError(f"--tp {tp} needs {tp} processes but WORLD_SIZE={world}: launch with "
                          f"`torchrun --nproc_per_node {tp} ...` (inference is tensor-parallel only)")
    return initialize_parallel(ParallelConfig(tp=tp), seed)


def _check_max_length(args) -> None:
    """The model has no positions past ``max_position_embeddings``; read from the config file, so a wrong
    ``--max-length`` is refused before the (slow) model build."""
    positions = read_chat_config(args.load).llm.max_position_embeddings
    if args.max_length is not None and not 1 <= args.max_length <= positions:
        raise ConfigError(f"--max-length {args.max_length} is outside the model's positions: {args.load} has "
                          f"max_position_embeddings {positions}; pass --max-length between 1 and {positions}, or "
                          f"leave it out to use all {positions}")


def build_session(args) -> tuple[ChatSession, object]:
    # megatron-core's and torch.distributed's internal notices (apex missing, deprecated collectives, CUDA env
    # hints) would interleave with the streamed answers and say nothing a chat user can act on.
    warnings.filterwarnings("ignore", module=r"(megatron\.core|torch\.distributed)(\.|$)")
    with _checking_input():
        sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, seed=args.seed, cfg_scale=args.cfg_scale)
        spec = None if args.image_tokenizer is None else parse_image_tokenizer_spec(args.image_tokenizer)
    _check_max_length(args)
    info = init_inference_parallel(args.tp, args.seed)
    model, tokenizer, _ = build_chat_model(args.load, dtype=DTYPES[args.dtype], device=info.device,
                                           adapters=args.adapters)
    session = ChatSession(model, tokenizer, template=args.template, sampling=sampling, max_images=args.max_images,
                          max_length=args.max_length, reuse_cache=not args.recompute,
                          image_tokenizer=load_chat_image_tokenizer(args.load, spec))
    return session, info


def _is_under(path: str, roots: Sequence[Optional[str]]) -> bool:
    real = Path(path).resolve()
    return any(real == root or root in real.parents for root in (Path(r).resolve() for r in roots if r))


def run_with_exit_status(prog: str, user_paths: Sequence[Optional[str]], command: Callable[[], int]) -> int:
    """``command()``'s status, or a one-line error on stderr: 2 for a refusal of bad input (a missing file the user
    named included), 1 for another OS error on a path the user gave. Other errors propagate (bugs)."""
    try:
        return command()
    except REFUSALS as e:
        status, message = 2, str(e)
    except OSError as e:
        if not isinstance(e.filename, (str, bytes, os.PathLike)) or not _is_under(os.fsdecode(e.filename), user_paths):
            raise
        status, message = (2 if isinstance(e, FileNotFoundError) else 1), f"{e.strerror or e}: {e.filename}"
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return status


def _describe(session: ChatSession, args) -> str:
    cfg = session.model.cfg
    model = (f"jam-cross towers, cross links every {cfg.fusion.cross_interval} layer(s), text only"
             if cfg.fusion.kind == JAM_CROSS else
             f"attention {cfg.attention.mode} (split {cfg.attention.modality_split})")
    return (f"megatron-visualchat chat · {args.load} · {model} · "
            f"TP={args.tp} · {args.dtype} · {'recompute every round' if args.recompute else 'KV cache reused'}")


def _chat(args, stdin: Optional[TextIO], stdout: Optional[TextIO]) -> int:
    session, info = build_session(args)
    repl = ChatRepl(session, is_main=info.rank == 0, stdin=stdin, stdout=stdout, image_dir=args.image_out_dir)
    repl.say(_describe(session, args))
    if info.rank == 0 and args.image:
        repl.attach(args.image)
    repl.run()
    return 0


def main(argv: Optional[Sequence[str]] = None, *, stdin: Optional[TextIO] = None,
         stdout: Optional[TextIO] = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-visualchat chat", description="multi-round, multi-image chat")
    add_model_arguments(parser)
    parser.add_argument("--image", action="append", default=[], help="image(s) attached to the first message")
    parser.add_argument("--image-out-dir", default="chat-images",
                        help="where the images a drawing model writes go, as PNG files named in the transcript")
    args = parser.parse_args(argv)
    return run_with_exit_status(parser.prog, [args.load, args.adapters, args.image_out_dir, *args.image],
                                lambda: _chat(args, stdin, stdout))


def _eval(args, out: TextIO) -> int:
    with _checking_input():
        conversations = load_eval_file(args.data, args.image_root)  # fail on a bad file before building the model
    session, info = build_session(args)
    main_rank = info.rank == 0
    out_dir = Path(args.out_dir)
    if main_rank:  # before the replay: an unusable --out-dir must not cost the whole run's results
        out_dir.mkdir(parents=True, exist_ok=True)

    def progress(rec):
        if main_rank:
            drawn = f", {len(rec.output_images)} image(s)" if rec.output_images else ""
            status = f"error: {rec.error}" if rec.error else f"{rec.new_tokens} tokens{drawn}, {rec.seconds:.2f} s"
            out.write(f"{rec.conversation} round {rec.round}: {status}\n")
            out.flush()

    records = replay(session, conversations, on_record=progress, image_dir=out_dir / "images" if main_rank else None)
    if main_rank:
        write_csv(records, out_dir / "results.csv")
        write_jsonl(records, out_dir / "results.jsonl")
        table = summary_table(summarize(records))
        (out_dir / "summary.md").write_text(f"# eval-replay {args.data}\n\n{table}")
        out.write(table)
        out.flush()
    return 0


def eval_main(argv: Optional[Sequence[str]] = None, *, stdout: Optional[TextIO] = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-visualchat eval-replay",
                                     description="replay scripted conversations into CSV/JSONL, score, summarise")
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="evaluation JSON (DS-VisualChat eval_data format)")
    parser.add_argument("--image-root", default=None, help="base for relative image paths (default: cwd)")
    parser.add_argument("--out-dir", required=True,
                        help="writes results.csv, results.jsonl, summary.md (and images/ for a drawing model)")
    args = parser.parse_args(argv)
    return run_with_exit_status(parser.prog, [args.load, args.adapters, args.data, args.image_root, args.out_dir],
                        lambda: _eval(args, stdout or sys.stdout))
