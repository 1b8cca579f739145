"""``megatron-visualchat <command>``: one console script, subcommands registered in COMMANDS."""

from __future__ import annotations

import importlib
import sys

# subcommand -> "module:function" taking argv (lazy, so `--help` does not import torch/megatron)
COMMANDS: dict[str, str] = {
    "train": "megatron_visualchat.training.pretrain:main",
    "recipe": "megatron_visualchat.training.recipe_run:main",
    "hf-to-megatron": "megatron_visualchat.checkpoint.convert:hf_to_megatron_main",
    "megatron-to-hf": "megatron_visualchat.checkpoint.convert:megatron_to_hf_main",
    "import-hf": "megatron_visualchat.checkpoint.hf_llava:main",
    "export-hf": "megatron_visualchat.checkpoint.hf_llava_export:main",
    "fuse": "megatron_visualchat.checkpoint.fuse:main",
    "chat-to-megatron": "megatron_visualchat.checkpoint.chat_to_megatron:main",
    "chat": "megatron_visualchat.inference.cli:main",
    "eval-replay": "megatron_visualchat.inference.cli:eval_main",
    "serve": "megatron_visualchat.inference.server:main",
    "validate-data": "megatron_visualchat.data.validate:main",
    "plan": "megatron_visualchat.planner.cli:main",
    "train-image-tokenizer": "megatron_visualchat.model.image_tokenizer.train:main",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = ", ".join(sorted(COMMANDS)) or "(none yet)"
        print(f"usage: megatron-visualchat <command> [args]\ncommands: {names}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module, func = COMMANDS[argv[0]].split(":")
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
