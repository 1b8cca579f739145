"""Megatron-style entry point: torchrun --nproc-per-node N pretrain_vchat.py [flags] (see --help).
``--dry-run`` checks a launch on one CPU process (WORLD_SIZE ranks) without training."""

from megatron_visualchat.config import ConfigError
from megatron_visualchat.training.pretrain import main

if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except ConfigError as e:  # a wrong flag, path or layout: the message says which, a traceback adds nothing
        raise SystemExit(f"pretrain_vchat: error: {e}") from None
