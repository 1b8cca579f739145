"""SHA-256 checksums of a checkpoint's files, so a truncated or corrupted file is named instead of failing deep in
``torch.load`` / ``safe_open`` (or, worse, loading flipped bits).

    <dir>/SHA256SUMS    "<hex digest>  <path relative to dir>" per line: ``cd <dir> && sha256sum -c SHA256SUMS``

Writers compute the digests from the files as written, and write ``SHA256SUMS`` last, inside the temp directory
that is then renamed into place. Checkpoints written before checksums existed have no ``SHA256SUMS``: they load
unverified, with a warning.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Mapping, Optional, Union

from megatron_visualchat.checkpoint.errors import CheckpointError

logger = logging.getLogger(__name__)

CHECKSUM_FILE = "SHA256SUMS"
_CHUNK = 1 << 22


def sha256(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(directory: Union[str, Path], digests: Mapping[str, str]) -> None:
    """``digests``: relative path -> hex digest."""
    lines = "".join(f"{digest}  {name}\n" for name, digest in sorted(digests.items()))
    (Path(directory) / CHECKSUM_FILE).write_text(lines)


def read_checksums(directory: Union[str, Path], fix: str, *, warn: bool = True) -> Optional[dict[str, str]]:
    """Relative path -> digest; None for a checkpoint written before checksums (a warning when ``warn``: one rank
    says it). ``fix``: what to do when the file itself is damaged."""
    path = Path(directory) / CHECKSUM_FILE
    if not path.is_file():
        if warn:
            logger.warning("%s has no %s (written before checksums were recorded): loading it without verification",
                           directory, CHECKSUM_FILE)
        return None
    digests = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise CheckpointError(f"{path} is corrupt (line {number} is not '<sha256>  <file>': {line!r}): {fix}")
        digests[name] = digest
    return digests


def verify(directory: Union[str, Path], name: str, digests: Optional[Mapping[str, str]], fix: str) -> None:
    """Refuse ``directory/name`` when its digest differs from the recorded one; ``fix`` says what to do instead.
    No-op when ``digests`` is None (an old checkpoint)."""
    if digests is None:
        return
    path = Path(directory) / name
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {fix}")
    if name not in digests:
        raise CheckpointError(f"{path} is not listed in {Path(directory) / CHECKSUM_FILE}: {fix}")
    if sha256(path) != digests[name]:
        raise CheckpointError(f"{path} is corrupt (checksum mismatch): {fix}")
