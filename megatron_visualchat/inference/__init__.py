"""Inference: generation with a KV cache that keeps token codes, multi-round multi-image chat sessions,
tensor-parallel chat/eval CLIs, evaluation replay and scoring.

    model, tokenizer, cfg = build_chat_model("ckpt/", dtype=torch.bfloat16, device=device)
    chat = ChatSession(model, tokenizer, sampling=SamplingParams(max_new_tokens=256))
    chat.ask("Describe the image.", ["cat.jpg"], on_text=print)
    chat.ask("How does it differ from this one?", ["dog.jpg"])   # image 2; round 1 is not recomputed
"""

from megatron_visualchat.checkpoint.chat import load_chat_checkpoint, save_chat_checkpoint

from .checkpoint import build_chat_model, load_chat_image_tokenizer
from .eval_replay import load_eval_file, replay, summarize, summary_table, write_csv, write_jsonl
from .generation import Generation, generate, run_chunk
from .image_generation import ImageAnswers, ImageRule
from .kv_cache import ContextFullError, KVCache
from .prompt import Chunk, Segment, answer_segment, round_segment
from .sampling import SamplingParams, sample_tokens
from .scoring import SCORERS, Score, ScoreContext, get_scorer, normalize_answer, parse_box
from .session import ChatInputError, ChatSession, ChatTurn, load_chat_image

__all__ = [
    "SCORERS", "ChatInputError", "ChatSession", "ChatTurn", "Chunk", "ContextFullError", "Generation", "ImageAnswers",
    "ImageRule", "KVCache", "SamplingParams", "Score", "ScoreContext", "Segment", "answer_segment",
    "build_chat_model", "generate", "get_scorer", "load_chat_checkpoint", "load_chat_image",
    "load_chat_image_tokenizer", "load_eval_file", "normalize_answer", "parse_box",
    "replay", "round_segment", "run_chunk", "sample_tokens", "save_chat_checkpoint", "summarize", "summary_table",
    "write_csv", "write_jsonl",
]
