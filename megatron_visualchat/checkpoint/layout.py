"""Megatron's directory conventions, shared by converted and training checkpoints.

    <root>/latest_checkpointed_iteration.txt    the iteration to load ("200"; "release" in some Megatron-LM dirs)
    <root>/iter_0000200/mp_rank_TT[_PPP]/...     one directory per saved iteration, one per TP/PP rank inside
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional, Union

from megatron_visualchat.checkpoint.checksums import sha256, write_checksums
from megatron_visualchat.checkpoint.errors import CheckpointError

TRACKER_FILE = "latest_checkpointed_iteration.txt"
Iteration = Union[int, str]  # an iteration number, or "release"


def iteration_dir(root: Union[str, Path], iteration: Iteration) -> Path:
    name = "release" if iteration == "release" else f"iter_{int(iteration):07d}"
    return Path(root) / name


def rank_dir(directory: Union[str, Path], tp_rank: int, pp_rank: int, *, pp_suffix: bool) -> Path:
    """``mp_rank_TT`` or ``mp_rank_TT_PPP``: Megatron-LM adds the pipeline rank only when PP > 1, the training
    checkpoints always do."""
    return Path(directory) / (f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp_suffix else ""))


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the complete directory ``tmp`` in the place of ``final`` (which may exist): renames only, so a crash
    leaves either the old or the new directory (in the worst case as ``.old_<name>`` beside it), never a mix."""
    old = final.with_name(f".old_{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def checksummed_dir(out_dir: Union[str, Path]) -> Iterator[Path]:
    """Fill the yielded temp directory beside ``out_dir``; on success its files (in subdirectories too) are
    checksummed and it replaces
    ``out_dir`` whole (``replace_dir``), on failure it is removed and ``out_dir`` is untouched."""
    final = Path(os.path.abspath(out_dir))
    tmp = final.with_name(f".tmp_{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        write_checksums(tmp, {f.relative_to(tmp).as_posix(): sha256(f) for f in tmp.rglob("*") if f.is_file()})
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_replaceable_dir(out_dir: Union[str, Path], marker: str, what: str) -> None:
    """An export replaces its whole directory: refuse a path that is a file, or a non-empty directory without
    ``marker`` (the file every earlier export of this kind holds), so nothing else is ever deleted."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{what} {out} exists and is not a directory: choose another path")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise CheckpointError(f"{what} {out} is not empty and holds no earlier export ({marker} not found); an "
                              "export replaces the whole directory: choose a new or empty one")


def write_tracker(root: Union[str, Path], iteration: int) -> None:
    """Through a temp file + rename, so a crash never leaves a half-written tracker."""
    path = Path(root) / TRACKER_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(iteration))
    os.replace(tmp, path)


def read_tracker(root: Union[str, Path]) -> Iteration:
    path = Path(root) / TRACKER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {root} is not a checkpoint directory, or its conversion or first "
                              "save did not finish")
    text = path.read_text().strip()
    if text == "release":
        return text
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number or 'release', found {text!r}") from None


def saved_iterations(root: Union[str, Path]) -> list[int]:
    """The numbered ``iter_*`` directories under ``root``, ascending (temp directories are not among them)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(d.name[5:]) for d in root.iterdir() if d.name.startswith("iter_") and d.name[5:].isdigit())


def available(root: Union[str, Path]) -> str:
    """The "available: 2, 4" part of an error message: the iterations ``--load-iteration`` may pick."""
    its = saved_iterations(root)
    return f"available: {', '.join(map(str, its))}" if its else "no iteration is saved"


def latest_iteration(root: Optional[Union[str, Path]]) -> Optional[int]:
    """The iteration a training run resumes from; None when ``root`` holds no checkpoint yet."""
    if not root or not (Path(root) / TRACKER_FILE).is_file():
        return None
    iteration = read_tracker(root)
    if iteration == "release" or not iteration_dir(root, iteration).is_dir():
        raise CheckpointError(f"{Path(root) / TRACKER_FILE} names iteration {iteration!r}, but {root} has no such "
                              f"checkpoint directory: pick one with --load-iteration N ({available(root)})")
    return iteration
