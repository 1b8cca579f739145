#!/usr/bin/env python3
"""A stand-in for torchrun that checks a launch instead of starting it:

    TORCHRUN=examples/torchrun_dry_run.py LLM_CKPT=... examples/pretrain_vchat_70b.sh

runs the script's ``pretrain_vchat.py <flags> --dry-run`` once, on this CPU process, as all nnodes x nproc-per-node
ranks (WORLD_SIZE): flags, paths, data blend and per-rank parameter counts in seconds, before the job queues.
torchrun's own options are read in their ``--option value`` / ``--option=value`` forms; only the sizes matter.
"""

import os
import sys


def main(argv: list[str]) -> None:
    options, args = {}, list(argv)
    while args and args[0].startswith("-"):
        name, eq, value = args.pop(0).lstrip("-").partition("=")
        options[name.replace("_", "-")] = value if eq else args.pop(0)
    sizes = [options.get("nnodes", "1"), options.get("nproc-per-node", "1")]
    if not args or not all(s.isdigit() for s in sizes):
        sys.exit(f"torchrun_dry_run: expected [--nnodes N] --nproc-per-node M ... SCRIPT [ARGS], got {argv}")
    os.environ["WORLD_SIZE"] = str(int(sizes[0]) * int(sizes[1]))
    print(f"torchrun_dry_run: {sizes[0]} node(s) x {sizes[1]} process(es); torchrun options {options}", file=sys.stderr)
    os.execv(sys.executable, [sys.executable, args[0], *args[1:], "--dry-run"])


if __name__ == "__main__":
    main(sys.argv[1:])
