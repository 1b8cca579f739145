"""Megatron-style entry point: torchrun --nproc-per-node N pretrain_vchat.py [flags] (see --help)."""

from megatron_visualchat.training.pretrain import main

if __name__ == "__main__":
    raise SystemExit(main())
