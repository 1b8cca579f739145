import base64
import io
import json
import os
import threading

import numpy as np
import pytest
from PIL import Image

from megatron_visualchat.data import SampleError, decode_image, load_image, open_image_store
from megatron_visualchat.data.images import FileImage, ImageDirectory, InlineImage
from megatron_visualchat.data.files import FileRefused, read_regular_file


def encode(im: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb_of(data: bytes) -> np.ndarray:
    out = decode_image(data, "test")
    assert out.mode == "RGB"
    return np.asarray(out)


def reason(fn) -> str:
    with pytest.raises(SampleError) as e:
        fn()
    return e.value.reason


def test_grayscale_palette_cmyk_and_bilevel_become_rgb():
    assert (rgb_of(encode(Image.new("L", (4, 4), 77))) == 77).all()
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([10, 20, 30] + [0] * 765)
    assert (rgb_of(encode(pal)) == [10, 20, 30]).all()
    cmyk = rgb_of(encode(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG", quality=100))
    assert cmyk[..., 0].min() > 200 and cmyk[..., 1:].max() < 60  # red
    assert (rgb_of(encode(Image.new("1", (4, 4), 1))) == 255).all()


def test_transparency_is_composited_over_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    out = rgb_of(encode(rgba))
    assert (out[0, 0] == [0, 0, 255]).all() and (out[1, 1] == [255, 255, 255]).all()
    assert (rgb_of(encode(Image.new("LA", (4, 4), (0, 0)))) == 255).all()
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 0, 0] + [0] * 762)
    assert (rgb_of(encode(pal, transparency=1)) == 255).all()


def test_sixteen_bit_and_float_images_are_scaled():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    out = rgb_of(encode(Image.fromarray(values)))  # PNG 16-bit grayscale, opens as 'I;16'
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    as_i = Image.fromarray(values.astype(np.int32))
    assert as_i.mode == "I"
    assert np.asarray(decode_image(encode(as_i, "TIFF"), "i"))[0, :, 0].tolist() == [0, 1, 128, 255]
    small_i = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32))
    assert np.asarray(decode_image(encode(small_i, "TIFF"), "i8"))[0, :, 0].tolist() == [0, 100, 255]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(decode_image(encode(f, "TIFF"), "f"))[0, :, 0].tolist() == [0, 128, 255]


def test_corrupt_truncated_and_missing_images(tmp_path, png_bytes):
    assert reason(lambda: decode_image(b"not an image at all", "x")) == "corrupt_image"
    jpeg = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    assert reason(lambda: decode_image(jpeg[: len(jpeg) // 2], "half.jpg")) == "corrupt_image"
    png = encode(Image.effect_noise((64, 64), 50))
    assert reason(lambda: decode_image(png[: len(png) - 100], "cut.png")) == "corrupt_image"
    assert reason(lambda: load_image(FileImage(str(tmp_path / "nope.png")))) == "missing_image"
    assert reason(lambda: load_image(InlineImage("!!!notbase64", "inline"))) == "corrupt_image"


def test_huge_images_are_refused_from_the_header(png_bytes):
    data = png_bytes((0, 0, 0), size=(300, 200))
    with pytest.raises(SampleError, match="300x200 = 60000 pixels > cap 50000") as e:
        decode_image(data, "big.png", max_pixels=50_000)
    assert e.value.reason == "image_too_large"
    assert decode_image(data, "big.png", max_pixels=60_000).size == (300, 200)


def test_pil_decompression_bomb_error_is_counted_as_too_large(png_bytes, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL raises above 2x this, before our own check
    assert reason(lambda: decode_image(png_bytes(size=(50, 50)), "bomb.png", max_pixels=10**9)) == "image_too_large"


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (4, 2), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    assert decode_image(encode(im, "JPEG", exif=exif.tobytes()), "rot.jpg").size == (2, 4)


def test_directory_store_with_id_suffix(tmp_path, png_bytes):
    (tmp_path / "000000000139.jpg").write_bytes(png_bytes((1, 2, 3)))
    store = open_image_store(str(tmp_path), "{id_suffix}.jpg")
    assert isinstance(store, ImageDirectory)
    ref = store.ref("CGD_IMG_000000000139")
    assert ref.name == "000000000139.jpg"
    assert (np.asarray(load_image(ref)) == [1, 2, 3]).all()


def test_base64_tsv_store_reads_lazily(tmp_path, png_bytes):
    path = tmp_path / "images.tsv"
    rows = {"a": (255, 0, 0), "b": (0, 255, 0)}
    path.write_bytes(b"".join(k.encode() + b"\t" + base64.b64encode(png_bytes(c)) + b"\r\n" for k, c in rows.items()))
    store = open_image_store(str(path))
    assert len(store) == 2 and "a" in store and "zz" not in store
    assert (np.asarray(load_image(store.ref("b"))) == [0, 255, 0]).all()
    assert reason(lambda: load_image(store.ref("zz"))) == "missing_image"
    # the payload is read on access, not held: rewrite "a" in place with same-length data of another colour
    new = path.read_bytes().replace(base64.b64encode(png_bytes((255, 0, 0))), base64.b64encode(png_bytes((0, 0, 255))))
    path.write_bytes(new)
    assert (np.asarray(load_image(store.ref("a"))) == [0, 0, 255]).all()


def test_base64_json_map_store_handles_escapes(tmp_path, png_bytes):
    b64 = base64.b64encode(png_bytes((9, 8, 7), size=(40, 40))).decode()
    text = json.dumps({"SD_IMG_1": b64, "SD_IMG_2": b64[:30] + "\n" + b64[30:]}).replace("/", "\\/")
    (tmp_path / "SD.json").write_text(text)
    store = open_image_store(str(tmp_path / "SD.json"))
    for key in ("SD_IMG_1", "SD_IMG_2"):
        assert (np.asarray(load_image(store.ref(key))) == [9, 8, 7]).all()


def test_open_image_store_rejects_unknown_kinds(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.tsv"):
        open_image_store(str(tmp_path / "x.zip"))
    with pytest.raises(ValueError, match="not found"):
        open_image_store(str(tmp_path / "missing.tsv"))


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    stop = threading.Event()

    def writer():  # opens the write end once someone reads, so that a reader that blocks gets EOF, not a hang
        while not stop.is_set():
            try:
                return os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # ENXIO: no reader yet
                stop.wait(0.01)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        assert reason(lambda: FileImage(str(fifo)).read_bytes()) == "image_not_a_file"
    finally:
        stop.set()
        thread.join()


def test_directories_and_devices_are_not_image_files(tmp_path):
    assert reason(lambda: FileImage(str(tmp_path)).read_bytes()) == "image_not_a_file"
    with pytest.raises(SampleError, match="not a regular file") as e:
        FileImage("/dev/null").read_bytes()  # a device: /dev/zero would be read until memory runs out
    assert e.value.reason == "image_not_a_file"


def test_encoded_bytes_are_capped_before_reading(tmp_path, png_bytes):
    data = png_bytes(size=(16, 16))
    (tmp_path / "a.png").write_bytes(data)
    assert FileImage(str(tmp_path / "a.png")).read_bytes(max_bytes=len(data)) == data
    with pytest.raises(SampleError, match=f"{len(data)} bytes > cap {len(data) - 1}") as e:
        FileImage(str(tmp_path / "a.png")).read_bytes(max_bytes=len(data) - 1)
    assert e.value.reason == "image_too_large"
    inline = InlineImage(base64.b64encode(data).decode(), "inline")
    assert inline.read_bytes(max_bytes=len(data)) == data
    assert reason(lambda: inline.read_bytes(max_bytes=len(data) - 1)) == "image_too_large"
    (tmp_path / "s.tsv").write_bytes(b"k\t" + base64.b64encode(data) + b"\n")
    store = open_image_store(str(tmp_path / "s.tsv"))
    assert store.ref("k").read_bytes(max_bytes=len(data)) == data
    assert reason(lambda: store.ref("k").read_bytes(max_bytes=len(data) // 3)) == "image_too_large"  # not even read
    assert reason(lambda: load_image(store.ref("k"), max_bytes=len(data) - 1)) == "image_too_large"


def test_a_file_growing_past_the_cap_while_read_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "grows.bin"
    path.write_bytes(b"x" * 10)
    real_fstat = os.fstat

    def fstat_then_grow(fd):  # the size checks pass, then the file grows before it is read
        result = real_fstat(fd)
        path.write_bytes(b"x" * 30)
        return result

    monkeypatch.setattr(os, "fstat", fstat_then_grow)
    with pytest.raises(FileRefused, match="grew past the cap of 20 bytes") as e:
        read_regular_file(str(path), max_bytes=20)
    assert e.value.problem == "too_large"


def test_image_directory_refs_stay_inside_the_root(tmp_path, png_bytes):
    root = tmp_path / "images"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(png_bytes())
    (root / "ok.png").write_bytes(png_bytes((0, 0, 255)))
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "inner.png").symlink_to(root / "ok.png")
    store = open_image_store(str(root))
    assert (np.asarray(load_image(store.ref("inner.png"))) == [0, 0, 255]).all()  # a symlink inside is fine
    assert (np.asarray(load_image(store.ref(str(root / "ok.png")))) == [0, 0, 255]).all()  # absolute, inside
    for key in ("../secret.png", str(tmp_path / "secret.png"), "link.png", "/etc/passwd"):
        with pytest.raises(SampleError, match="outside the root") as e:
            load_image(store.ref(key))
        assert e.value.reason == "image_outside_root"
