#!/usr/bin/env python
"""HF LLaMA <-> Megatron checkpoint conversion (same as `megatron-visualchat hf-to-megatron|megatron-to-hf`).

    python tools/convert_checkpoint.py hf-to-megatron --hf-dir Llama-2-7b-hf --out ckpt/7b-tp2-pp2 --tp 2 --pp 2
    python tools/convert_checkpoint.py megatron-to-hf --load ckpt/7b-tp2-pp2 --out Llama-2-7b-roundtrip
"""

import sys

from megatron_visualchat.checkpoint.convert import main

if __name__ == "__main__":
    sys.exit(main())
