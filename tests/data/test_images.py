import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from megatron_visualchat.data import SampleError, decode_image, load_image, open_image_store
from megatron_visualchat.data.images import FileImage, ImageDirectory, InlineImage


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
