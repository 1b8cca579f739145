"""Opening the files that data and evaluation records name: inside their root, regular files only, bounded reads.

A record is input, not code we trust. ``../../etc/passwd``, an absolute path or a symlink must not reach outside the
image root, so the check is on ``realpath``. ``/dev/zero`` must not be read until memory runs out, and a FIFO must
not block a DataLoader worker forever. So a path is ``stat``-ed and must be a regular file before it is opened; it
is then opened non-blocking, checked again with ``fstat`` (it may have been swapped in between), and at most
``max_bytes + 1`` bytes are read, so a file that grew past the cap after the check is refused too.
"""

from __future__ import annotations

import os
import stat

FILE_PROBLEMS = ("missing", "outside_root", "not_regular", "too_large")


class FileRefused(ValueError):
    """A named file that cannot be used; ``problem`` is one of ``FILE_PROBLEMS`` (callers map it to their reason)."""

    def __init__(self, problem: str, message: str):
        if problem not in FILE_PROBLEMS:
            raise ValueError(f"unknown file problem {problem!r}; allowed: {FILE_PROBLEMS}")
        self.problem = problem
        super().__init__(message)


def confined(path: str, root: str) -> str:
    """``realpath(path)``, refused when it is not inside ``realpath(root)`` (``..``, an absolute path elsewhere, a
    symlink pointing out). Build ``path`` as ``os.path.join(root, name)``: an absolute ``name`` replaces the root
    and is then caught here."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real, real_root]) != real_root:
        raise FileRefused("outside_root", f"{path}: resolves to {real}, outside the root {real_root}; name "
                                          f"files relative to the root, inside it")
    return real


def _check(path: str, st: os.stat_result, max_bytes: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise FileRefused("not_regular", f"{path}: not a regular file (a directory, FIFO, device or socket)")
    if max_bytes is not None and st.st_size > max_bytes:
        raise FileRefused("too_large", f"{path}: {st.st_size} bytes > cap {max_bytes}")


def check_regular(path: str, max_bytes: int | None = None) -> None:
    """Refuse ``path`` unless it is a regular file (of at most ``max_bytes``), from ``stat`` alone: nothing is
    opened, so a FIFO or device is never touched."""
    try:
        _check(path, os.stat(path), max_bytes)
    except FileNotFoundError:
        raise FileRefused("missing", f"{path}: not found") from None
    except OSError as e:  # permission, a name that is too long, a loop of symlinks ...
        raise FileRefused("missing", f"{path}: cannot open ({e.strerror or e})") from None


def open_regular(path: str, max_bytes: int | None = None):
    """A binary file object for ``path``, which must be a regular file (of at most ``max_bytes``)."""
    check_regular(path, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:  # removed or changed since the check
        raise FileRefused("missing", f"{path}: cannot open ({e.strerror or e})") from None
    try:
        _check(path, os.fstat(fd), max_bytes)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(path: str, max_bytes: int | None = None) -> bytes:
    """The whole of ``path`` (a regular file), reading at most ``max_bytes + 1`` bytes."""
    with open_regular(path, max_bytes) as f:
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise FileRefused("too_large", f"{path}: grew past the cap of {max_bytes} bytes while being read")
    return data
