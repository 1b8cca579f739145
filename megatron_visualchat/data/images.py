"""Image references, image stores and robust decoding to RGB.

A conversation only holds *references*; pixels are decoded in the DataLoader worker that needs them. Decoding
policy (documented choices):

* Every mode becomes 8-bit RGB. Transparent images (RGBA, LA, PA, P/L/RGB with a transparency key) are composited
  over white, so transparent areas do not turn black. 16-bit integer images ('I;16*') are scaled by 255/65535;
  32-bit 'I' images are treated as 16-bit when any value exceeds 255 (PNG 16-bit may load as 'I'), else as 8-bit;
  float 'F' images are taken as 0..1 when their maximum is <= 1, else as 0..255. CMYK/YCbCr/palette use PIL's
  conversion. EXIF orientation is applied.
* Huge images are **refused**, not downscaled: anything over ``max_pixels`` (default: PIL's own
  ``Image.MAX_IMAGE_PIXELS``, ~89 MP) is rejected from the header alone, before decoding, as ``image_too_large``.
  Downscaling would still decode the full bitmap (a decompression bomb is exactly that), so refusing is the only
  memory-safe choice.
* Encoded bytes are capped too (``max_bytes``, default 64 MiB), before they are read: a file is ``stat``-ed first
  and read for at most cap + 1 bytes, a base64 entry's length is known from the store's index. Files named by
  records stay inside their image directory and must be regular files (``files.py``).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import warnings
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import SampleError
from .files import FileRefused, confined, read_regular_file
from .lazy import index_base64_tsv, index_json_string_map, read_range

DEFAULT_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
DEFAULT_MAX_IMAGE_BYTES = 64 * 2**20
# files.FileRefused.problem -> skip reason
FILE_SKIP_REASONS = {"missing": "missing_image", "outside_root": "image_outside_root",
                     "not_regular": "image_not_a_file", "too_large": "image_too_large"}


class ImageRef(Protocol):
    """Where one image's encoded bytes live."""

    @property
    def name(self) -> str:
        """A short stable name (file name or id), used to match images across datasets and in messages."""

    def read_bytes(self, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
        """The encoded image (at most ``max_bytes``); raises SampleError with a reason of ``errors.SKIP_REASONS``."""


@dataclass(frozen=True)
class FileImage:
    """An image file; with ``root`` (an image directory's) the path must resolve inside it."""

    path: str
    root: str | None = None

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def read_bytes(self, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
        try:
            path = self.path if self.root is None else confined(self.path, self.root)
            return read_regular_file(path, max_bytes)
        except FileRefused as e:
            raise SampleError(FILE_SKIP_REASONS[e.problem], str(e)) from None


def _check_encoded_size(length: int, max_bytes: int, label: str) -> None:
    """Refuse base64 text that cannot decode to at most ``max_bytes`` (4 characters per 3 bytes, plus slack for line
    breaks and JSON escapes), before it is read or decoded."""
    if length > 2 * max_bytes + 16:
        raise SampleError("image_too_large", f"image {label}: {length} base64 characters, over the cap of "
                                             f"{max_bytes} bytes")


def _b64decode(text: str | bytes, label: str, max_bytes: int) -> bytes:
    try:
        data = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as e:
        raise SampleError("corrupt_image", f"bad base64 for image {label}: {e}") from None
    if len(data) > max_bytes:
        raise SampleError("image_too_large", f"image {label} is {len(data)} bytes > cap {max_bytes}")
    return data


@dataclass(frozen=True)
class InlineImage:
    """Base64 data embedded in the (lazily read) annotation record itself."""

    data: str
    label: str

    @property
    def name(self) -> str:
        return self.label

    def read_bytes(self, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
        _check_encoded_size(len(self.data), max_bytes, self.label)
        return _b64decode(self.data, self.label, max_bytes)


@dataclass(frozen=True)
class StoredImage:
    store: "Base64ImageStore"
    key: str

    @property
    def name(self) -> str:
        return self.key

    def read_bytes(self, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
        return self.store.read(self.key, max_bytes)


class ImageDirectory:
    """Images as files ``root/filename_format.format(id=..., id_suffix=...)``, confined to ``root``.

    ``id_suffix`` is the id after its last '_' (MIMIC-IT CGD: ``CGD_IMG_000000000139`` -> COCO
    ``000000000139.jpg`` with ``filename_format="{id_suffix}.jpg"``).
    """

    def __init__(self, root: str, filename_format: str = "{id}"):
        if not os.path.isdir(root):
            raise ValueError(f"image directory not found: {root}")
        self.root = root
        self.filename_format = filename_format

    def ref(self, key: str) -> FileImage:
        key = str(key)
        name = self.filename_format.format(id=key, id_suffix=key.rsplit("_", 1)[-1])
        return FileImage(os.path.join(self.root, name), root=self.root)


class Base64ImageStore:
    """A file of base64 images indexed by id; only {id: (offset, length)} is kept in memory."""

    def __init__(self, path: str, index: dict[str, tuple[int, int]]):
        self.path = path
        self._index = index

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return str(key) in self._index

    def ref(self, key: str) -> StoredImage:
        return StoredImage(self, str(key))

    def read(self, key: str, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
        try:
            offset, length = self._index[key]
        except KeyError:
            raise SampleError("missing_image", f"image id {key!r} not in {self.path}") from None
        _check_encoded_size(length, max_bytes, f"{key} in {self.path}")
        raw = read_range(self.path, offset, length)
        if b"\\" in raw:  # JSON string escapes (e.g. "\/" or "\n"), only possible in the JSON layout
            try:
                raw = json.loads(b'"' + raw + b'"').encode("ascii", "ignore")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SampleError("corrupt_image", f"bad JSON string for image {key} in {self.path}: {e}") from None
        return _b64decode(raw, f"{key} in {self.path}", max_bytes)


def _tsv_store(path: str, filename_format: str) -> Base64ImageStore:
    return Base64ImageStore(path, index_base64_tsv(path))


def _json_store(path: str, filename_format: str) -> Base64ImageStore:
    return Base64ImageStore(path, index_json_string_map(path))


IMAGE_STORES = {".tsv": _tsv_store, ".json": _json_store}


def open_image_store(path: str, filename_format: str = "{id}") -> ImageDirectory | Base64ImageStore:
    """A directory of files, a base64 TSV (``id<TAB>b64`` per line) or a base64 JSON map (MIMIC-IT layout)."""
    if os.path.isdir(path):
        return ImageDirectory(path, filename_format)
    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_STORES:
        raise ValueError(f"image store {path!r}: expected a directory or one of {sorted(IMAGE_STORES)}")
    if not os.path.isfile(path):
        raise ValueError(f"image store not found: {path}")
    return IMAGE_STORES[ext](path, filename_format)


def _to_uint8(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")


def _has_transparency(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB with the policy in the module docstring."""
    if im.mode.startswith("I;16"):
        im = _to_uint8(np.asarray(im).astype(np.float64) * (255.0 / 65535.0))
    elif im.mode == "I":
        array = np.asarray(im).astype(np.float64)
        im = _to_uint8(array * (255.0 / 65535.0) if array.size and array.max() > 255 else array)
    elif im.mode == "F":
        array = np.asarray(im).astype(np.float64)
        im = _to_uint8(array * 255.0 if array.size and array.max() <= 1.0 else array)
    if im.mode == "RGB":
        return im
    if _has_transparency(im):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def decode_image(data: bytes, label: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode encoded image bytes into an RGB PIL image, or raise SampleError with a reason."""
    with warnings.catch_warnings():
        # Our own cap decides; PIL's warning would otherwise fire for images between its two limits.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise SampleError("image_too_large", f"{label}: {e}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
            raise SampleError("corrupt_image", f"cannot decode {label}: {e}") from None
        width, height = im.size
        if width * height > max_pixels:
            raise SampleError(
                "image_too_large", f"{label} is {width}x{height} = {width * height} pixels > cap {max_pixels}"
            )
        try:
            im.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise SampleError("corrupt_image", f"cannot decode {label}: {e}") from None
    try:
        return to_rgb(ImageOps.exif_transpose(im))
    except (ValueError, OSError, TypeError) as e:
        raise SampleError("corrupt_image", f"cannot convert {label} (mode {im.mode}) to RGB: {e}") from None


def load_image(
    ref: ImageRef, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
) -> Image.Image:
    return decode_image(ref.read_bytes(max_bytes), ref.name, max_pixels)
