"""``megatron-visualchat chat-to-megatron``: a chat checkpoint's language model as a converted Megatron checkpoint.

A trained model becomes a ``fuse`` parent or another run's ``--llm-load``: the LLM is written in the
``hf-to-megatron`` layout at any TP/PP (through the same streamed writer, reading the chat file under HF LLaMA
names), and its ``VisualChatTokenizer``, image vocabulary included, goes to ``chat_tokenizer/`` (``tokenizer/``
gets only the sentencepiece model, as an HF tokenizer file). The vision encoder and projector are not written (they
are not part of a converted LLM). A language-model tensor the LLaMA layout has no place for (modality-split image
weights, modality norms, cross-attention layers) is refused by name rather than dropped. The LLaVA round trip
(``export-hf`` + ``import-hf``) cannot do this for a model that writes images: no transformers model decodes them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, Union

from megatron_visualchat.argtypes import int_list
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.config import DTYPES, ConfigError, ParallelConfig


class _ChatLLM:
    """The chat checkpoint's LLM as ``write_megatron`` reads a HF directory: ``dir``, ``config``, ``check`` and
    ``weights[hf_name]`` (each megatron tensor unfused once, for the HF names it makes)."""

    def __init__(self, load_dir: Path, cfg, tokenizer, dtype_name: str):
        from megatron_visualchat.checkpoint.chat import WEIGHTS_FILE
        from megatron_visualchat.checkpoint.hf_llama import stage_state_keys
        from megatron_visualchat.checkpoint.hf_llava import CHAT_PREFIXES
        from megatron_visualchat.checkpoint.hf_llava_export import text_config
        from megatron_visualchat.checkpoint.weight_files import HFWeights

        self.dir, self.llm, self.prefix = load_dir, cfg.llm, CHAT_PREFIXES["llm"]
        self.config = text_config(cfg, tokenizer, dtype_name)
        self.file = HFWeights(load_dir / WEIGHTS_FILE)
        self.source = {n: tmap for _, tmap in stage_state_keys(cfg.llm, ParallelConfig(), 0)
                       if tmap is not None and tmap.export for n in tmap.hf}
        self.weights, self._last = self, (None, {})

    def check(self, expected, *, tolerated=()) -> None:
        used = {self.prefix + t.megatron for t in self.source.values()}
        held = {k for k in self.file if k.startswith(self.prefix) and not k.endswith("._extra_state")}
        if used - held:
            raise CheckpointError(f"{self.dir}: language-model tensors missing: {sorted(used - held)[:8]}")
        if held - used:
            raise CheckpointError(f"{self.dir}: language-model tensors a LLaMA checkpoint cannot hold (they would be "
                                  f"dropped): {sorted(held - used)[:8]}")

    def __getitem__(self, name: str):
        from megatron_visualchat.checkpoint.hf_llama import hf_tensors

        tmap = self.source[name]
        if self._last[0] is not tmap:
            self._last = (tmap, hf_tensors(tmap, [self.file[self.prefix + tmap.megatron]], self.llm))
        return self._last[1][name]


def chat_to_megatron(load_dir: Union[str, Path], out_dir: Union[str, Path], *, tp: int = 1, pp: int = 1,
                     pp_layers: Optional[Sequence[int]] = None, dtype: Optional[str] = None,
                     force: bool = False) -> Path:
    """Write the chat checkpoint in ``load_dir`` as a converted checkpoint (module docstring); returns ``out_dir``."""
    from megatron_visualchat.checkpoint.chat import DAMAGED_FIX, WEIGHTS_FILE, read_chat_config
    from megatron_visualchat.checkpoint.checksums import read_checksums, verify
    from megatron_visualchat.checkpoint.convert import TOKENIZER_DIR, write_megatron
    from megatron_visualchat.checkpoint.hf_llava import TOKENIZER_OUT
    from megatron_visualchat.data import VisualChatTokenizer
    from megatron_visualchat.data.tokenizer import ADDED_TOKENS_FILE

    load_dir = Path(load_dir)
    cfg = read_chat_config(load_dir)
    verify(load_dir, WEIGHTS_FILE, read_checksums(load_dir, DAMAGED_FIX), DAMAGED_FIX)
    tokenizer = VisualChatTokenizer.load(str(load_dir))
    if dtype is None:
        from megatron_visualchat.checkpoint.weight_files import HFWeights

        weights = HFWeights(load_dir / WEIGHTS_FILE)
        stored = weights[next(iter(weights))].dtype
        dtype = next(name for name, d in DTYPES.items() if d == stored)

    def also(out: Path) -> None:
        # tokenizer/ holds HF tokenizer files: the chat's added_tokens.json is VisualChatTokenizer's, not HF's
        (out / TOKENIZER_DIR / ADDED_TOKENS_FILE).unlink(missing_ok=True)
        tokenizer.save(str(out / TOKENIZER_OUT))

    return write_megatron(_ChatLLM(load_dir, cfg, tokenizer, dtype), cfg.llm, out_dir, tp=tp, pp=pp,
                          pp_layers=pp_layers, dtype=dtype, force=force, also=also, also_outputs=(TOKENIZER_OUT,))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="megatron-visualchat chat-to-megatron", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="chat checkpoint directory (--export-dir)")
    p.add_argument("--out", required=True, help="output directory (must be absent or empty, unless --force)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--pp-layers", type=int_list, default=None, help="layers per stage, e.g. 18,22 (sum = layers)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the checkpoint's")
    p.add_argument("--force", action="store_true", help="replace a previous conversion in --out")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        out = chat_to_megatron(args.load, args.out, tp=args.tp, pp=args.pp, pp_layers=args.pp_layers,
                               dtype=args.dtype, force=args.force)
    except (CheckpointError, ConfigError) as e:
        print(f"chat-to-megatron: error: {e}", file=sys.stderr)
        return 2
    print(f"chat-to-megatron: wrote {out} in {time.perf_counter() - start:.1f}s; train from it with --model-preset "
          f"from-llm-load --llm-load {out} --tokenizer-dir {out}/chat_tokenizer, or fuse it")
    return 0
