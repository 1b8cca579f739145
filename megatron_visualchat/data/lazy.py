"""Lazy, fork-friendly record access.

Multi-GB annotation and base64 image files must not be parsed into millions of Python objects: that costs RAM per
DataLoader worker (refcount writes defeat copy-on-write) and minutes at start-up. Instead we keep byte offsets in
numpy arrays / small dicts and read one record from disk when it is asked for.

Text must be UTF-8. A ``.json`` file is one document, so a byte that is not UTF-8 (like a syntax error) stops the
setup with the file, byte offset and line; a ``.jsonl`` line is one record, so such a line is skipped and counted as
``malformed_json`` like any line that does not parse.
"""

from __future__ import annotations

import json
import mmap
import os

import numpy as np

from .errors import SampleError
from .files import open_regular, read_regular_file


def read_range(path: str, offset: int, length: int) -> bytes:
    """Read ``length`` bytes at ``offset`` (opens per call, so it is safe in forked workers)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise OSError(f"{path}: expected {length} bytes at offset {offset}, got {len(data)} (file changed?)")
    return data


def _mapped(path: str):
    """An mmap of ``path`` or None for an empty file (mmap refuses length 0)."""
    f = open(path, "rb")
    try:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    finally:
        f.close()


class JsonlRecords:
    """One JSON object per non-blank line; only line offsets are held in memory."""

    def __init__(self, path: str):
        self.path = path
        starts, lengths, line_numbers = [], [], []
        with open_regular(path) as f:
            offset = 0
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    starts.append(offset)
                    lengths.append(len(line))
                    line_numbers.append(line_no)
                offset += len(line)
        self._starts = np.asarray(starts, dtype=np.int64)
        self._lengths = np.asarray(lengths, dtype=np.int64)
        self._line_numbers = np.asarray(line_numbers, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._starts)

    def where(self, index: int) -> str:
        return f"{self.path}:line {int(self._line_numbers[index])}"

    def get(self, index: int) -> dict:
        raw = read_range(self.path, int(self._starts[index]), int(self._lengths[index]))
        try:
            record = json.loads(raw)
        except UnicodeDecodeError as e:
            raise SampleError("malformed_json", f"line is not UTF-8 at its byte {e.start} ({e.reason}); re-encode "
                                                f"the file as UTF-8", self.where(index)) from None
        except json.JSONDecodeError as e:
            raise SampleError("malformed_json", f"line does not parse as JSON ({e})", self.where(index)) from None
        if not isinstance(record, dict):
            raise SampleError("malformed_json", f"expected an object, got {type(record).__name__}", self.where(index))
        return record


class PackedRecords:
    """Records serialised into one bytes buffer + an offsets array: one Python object in total, however many records.

    Used for annotation files that are a single JSON document (LLaVA ``.json`` arrays, MIMIC-IT instruction maps).
    """

    def __init__(self, records, path: str, labels: list[str] | None = None):
        chunks, offsets = [], [0]
        for record in records:
            chunk = json.dumps(record, ensure_ascii=False).encode("utf-8")
            chunks.append(chunk)
            offsets.append(offsets[-1] + len(chunk))
        self.path = path
        self._buffer = b"".join(chunks)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._labels = labels

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def where(self, index: int) -> str:
        return f"{self.path}:{self._labels[index]}" if self._labels else f"{self.path}[{index}]"

    def get(self, index: int) -> dict:
        record = json.loads(self._buffer[self._offsets[index] : self._offsets[index + 1]])
        if not isinstance(record, dict):
            raise SampleError("malformed_json", f"expected an object, got {type(record).__name__}", self.where(index))
        return record


def _not_utf8(path: str, data: bytes, error: UnicodeDecodeError) -> ValueError:
    line = data.count(b"\n", 0, error.start) + 1
    return ValueError(f"{path}: not UTF-8 at byte {error.start} (line {line}: {error.reason}, byte "
                      f"{data[error.start:error.start + 1]!r}); re-encode the file as UTF-8 (e.g. iconv -f "
                      f"<its encoding> -t utf-8)")


def load_json(path: str):
    """Parse a whole JSON document (a regular file), failing with the file name and place: a broken annotation or
    evaluation file is a setup error."""
    data = read_regular_file(path)
    try:
        return json.loads(data)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, data, e) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def open_records(path: str) -> JsonlRecords | PackedRecords:
    """``.jsonl`` files are indexed lazily; ``.json`` files must hold a JSON array of records."""
    if path.endswith(".jsonl"):
        return JsonlRecords(path)
    data = load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of records (or use a .jsonl file), got {type(data).__name__}")
    return PackedRecords(data, path)


def index_base64_tsv(path: str) -> dict[str, tuple[int, int]]:
    """``id<TAB>base64`` lines -> {id: (offset, length)} of the base64 field (ids only are read into RAM)."""
    index: dict[str, tuple[int, int]] = {}
    mm = _mapped(path)
    if mm is None:
        return index
    with mm:
        pos, size, line_no = 0, len(mm), 0
        while pos < size:
            line_no += 1
            end = mm.find(b"\n", pos)
            end = size if end < 0 else end
            tab = mm.find(b"\t", pos, end)
            if tab < 0:
                if mm[pos:end].strip():
                    raise ValueError(f"{path}:line {line_no}: expected 'id<TAB>base64', found no tab")
            else:
                value_end = end - 1 if end > tab + 1 and mm[end - 1 : end] == b"\r" else end
                try:
                    key = mm[pos:tab].decode("utf-8").strip()
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:line {line_no}: the id is not UTF-8 (byte {pos + e.start}: "
                                     f"{e.reason}); re-encode the file as UTF-8") from None
                index[key] = (tab + 1, value_end - tab - 1)
            pos = end + 1
    return index


def _string_end(mm, start: int, path: str) -> int:
    """Index of the closing quote of a JSON string whose body starts at ``start`` (skips escaped quotes)."""
    pos = start
    while True:
        quote = mm.find(b'"', pos)
        if quote < 0:
            raise ValueError(f"{path}: unterminated string starting at byte {start}")
        backslashes = 0
        while quote - 1 - backslashes >= start and mm[quote - 1 - backslashes] == 0x5C:
            backslashes += 1
        if backslashes % 2 == 0:
            return quote
        pos = quote + 1


def _skip_ws(mm, pos: int) -> int:
    while pos < len(mm) and mm[pos] in b" \t\r\n":
        pos += 1
    return pos


def index_json_string_map(path: str) -> dict[str, tuple[int, int]]:
    """A flat JSON object ``{"id": "<base64>", ...}`` -> {id: (offset, length)} of each raw string body.

    This is MIMIC-IT's image file layout (SD.json, SN.json, ...). Scanning uses mmap.find, so multi-GB files index
    in seconds and no base64 payload is ever held in memory.
    """
    index: dict[str, tuple[int, int]] = {}
    mm = _mapped(path)
    if mm is None:
        raise ValueError(f"{path}: empty file, expected a JSON object of base64 strings")
    with mm:
        pos = _skip_ws(mm, 0)
        if mm[pos : pos + 1] != b"{":
            raise ValueError(f"{path}: expected a JSON object of id -> base64 string")
        pos = _skip_ws(mm, pos + 1)
        if mm[pos : pos + 1] == b"}":
            return index
        while True:
            if mm[pos : pos + 1] != b'"':
                raise ValueError(f"{path}: expected a string key at byte {pos}")
            key_end = _string_end(mm, pos + 1, path)
            try:
                key = json.loads(mm[pos : key_end + 1])
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: the key at byte {pos} is not UTF-8 (byte {pos + e.start}: {e.reason}); "
                                 f"re-encode the file as UTF-8") from None
            pos = _skip_ws(mm, key_end + 1)
            if mm[pos : pos + 1] != b":":
                raise ValueError(f"{path}: expected ':' after key {key!r} at byte {pos}")
            pos = _skip_ws(mm, pos + 1)
            if mm[pos : pos + 1] != b'"':
                raise ValueError(f"{path}: value of {key!r} at byte {pos} is not a string")
            value_end = _string_end(mm, pos + 1, path)
            index[key] = (pos + 1, value_end - pos - 1)
            pos = _skip_ws(mm, value_end + 1)
            sep = mm[pos : pos + 1]
            if sep == b"}":
                return index
            if sep != b",":
                raise ValueError(f"{path}: expected ',' or '}}' at byte {pos}")
            pos = _skip_ws(mm, pos + 1)
