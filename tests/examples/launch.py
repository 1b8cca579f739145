"""Launch an example script unmodified with ``TORCHRUN=examples/torchrun_dry_run.py`` (each torchrun becomes one
``pretrain_vchat.py --dry-run``, SLURM commands come from shims), and read the reports it prints."""

import os
import re
import subprocess
import sys
from pathlib import Path

from megatron_visualchat.checkpoint.layout import write_tracker
from megatron_visualchat.checkpoint.legacy_format import ConversionRecord, rank_file
from megatron_visualchat.config import LLM_PRESETS

REPO = Path(__file__).resolve().parents[2]
DRY_TORCHRUN = REPO / "examples" / "torchrun_dry_run.py"

SLURM_SHIMS = {
    # sbatch: run the batch script now, as a job on the nodes its "#SBATCH --nodes=N" line asks for
    "sbatch": """#!/usr/bin/env bash
nodes=$(sed -n 's/^#SBATCH --nodes=\\([0-9]*\\)$/\\1/p' "$1")
SLURM_JOB_ID=4242 SLURM_NNODES=$nodes SLURM_JOB_NODELIST="node[0-$((nodes - 1))]" exec bash "$@"
""",
    "scontrol": """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] || { echo "scontrol shim: unexpected $*" >&2; exit 2; }
for ((i = 0; i < SLURM_NNODES; i++)); do echo "node$i"; done
""",
    # srun: the task of node 0 only (every node's dry run prints the same report)
    "srun": """#!/usr/bin/env bash
while [[ $1 == -* ]]; do shift; done
SLURM_NODEID=0 SLURM_PROCID=0 exec "$@"
""",
}


def write_slurm_shims(bin_dir: Path) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in SLURM_SHIMS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def converted_stand_in(path: Path, preset: str, tp: int, pp: int, pp_layers=None) -> Path:
    """What hf-to-megatron leaves for ``preset`` at this layout, with empty rank files (the dry run reads none)."""
    path.mkdir(parents=True, exist_ok=True)
    ConversionRecord(llm=LLM_PRESETS[preset], tp=tp, pp=pp, pp_layers=pp_layers, dtype="bf16").save(path)
    write_tracker(path, 0)
    for t in range(tp):
        for s in range(pp):
            f = rank_file(path, 0, t, s, pp)
            f.parent.mkdir(parents=True, exist_ok=True)
            f.touch()
    return path


def run_launch(command, env: dict, *, path_dirs=(), timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``command`` (a script and its arguments, or a bash snippet) from the repository root with the dry-run
    torchrun; ``path_dirs`` go ahead of this venv's bin on PATH."""
    path = os.pathsep.join([*map(str, path_dirs), str(Path(sys.executable).parent), os.environ["PATH"]])
    full_env = {**os.environ, "PATH": path, "TORCHRUN": str(DRY_TORCHRUN), "PYTHONWARNINGS": "ignore", **env}
    argv = ["bash", "-c", command] if isinstance(command, str) else ["bash", *map(str, command)]
    return subprocess.run(argv, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


_ROW = re.compile(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\S+)\s+([\d,]+)\s+([\d,]+)$")
_TOTAL = re.compile(r"^model total: ([\d,]+) parameters, ([\d,]+) trainable")


def parse_reports(stdout: str) -> list[dict]:
    """Every dry-run report in ``stdout``: {"ranks": {rank: (dp, pp, tp, layers, parameters, trainable)},
    "total": n, "trainable": n, "notes": [...], "ok": bool, "sequence_parallel": bool}."""
    reports, current = [], None
    for line in stdout.splitlines():
        if line.startswith("dry run: "):
            current = {"ranks": {}, "notes": [], "ok": False, "sequence_parallel": "sequence parallel" in line}
            reports.append(current)
        elif current is None:
            continue
        elif m := _ROW.match(line):
            rank, dp, pp, tp, layers, params, trainable = m.groups()
            current["ranks"][int(rank)] = (int(dp), int(pp), int(tp), layers, _int(params), _int(trainable))
        elif m := _TOTAL.match(line):
            current["total"], current["trainable"] = _int(m.group(1)), _int(m.group(2))
        elif line.startswith("note: "):
            current["notes"].append(line)
        elif line == "dry run ok":
            current["ok"] = True
    return reports


def _int(text: str) -> int:
    return int(text.replace(",", ""))
