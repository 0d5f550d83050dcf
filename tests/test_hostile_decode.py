"""Decoding memory is bounded, and bounding it changed no pixel.

The decoder converts an image to RGB a strip of rows at a time and keeps only the square the crop
keeps (pipeline/images/decode.py); these tests hold it to the whole-image conversion it replaced (kept
here as `_reference`, the code of DECODER "pillow-decode+opencv-resize/1"), bit for bit, for every
mode, EXIF orientation and strip height, and measure the peak memory of images near Pillow's pixel
limit in a fresh process.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

import pipeline.images.decode as data
from pipeline.images.data import hash_file
from pipeline.images.decode import DECODER, decode
from pipeline.images.preprocess import Preprocess

from .conftest import make_image

PRESETS = [Preprocess(40, 32, (0.5,) * 3, (0.5,) * 3), Preprocess(33, 33, (0.5,) * 3, (0.5,) * 3, "bicubic"),
           Preprocess(30, 40, (0.5,) * 3, (0.5,) * 3, "nearest")]  # the last crops more than it resizes


def _reference(image: Image.Image, pre: Preprocess) -> np.ndarray:
    """The whole-image decoding that DECODER names (before memory was bounded), verbatim."""
    ImageOps.exif_transpose(image, in_place=True)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / top * 255.0, 0, 255)
        image = Image.fromarray(array.astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    image = image.convert("RGB") if image.mode != "RGB" else image
    return data._resize_and_crop(image, pre)


def _modes(width: int, height: int) -> dict[str, Image.Image]:
    rng = np.random.default_rng(width * height)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (height, width), dtype=np.uint8)
    deep = rng.integers(0, 65536, (height, width), dtype=np.uint16)
    floats = rng.normal(100, 120, (height, width)).astype(np.float32)
    floats[0, 0] = np.nan
    palette = Image.fromarray(rgb).convert("P")
    clear = palette.copy()
    clear.info["transparency"] = 3
    alpha = Image.fromarray(grey[::-1].copy())
    return {"RGB": Image.fromarray(rgb), "RGBA": Image.fromarray(np.dstack([rgb, grey])),
            "L": Image.fromarray(grey), "LA": Image.merge("LA", [Image.fromarray(grey), alpha]),
            "P": palette, "P+transparency": clear, "I;16": Image.fromarray(deep),
            "I;16B": Image.frombytes("I;16B", (width, height), deep.astype(">u2").tobytes()),
            "I": Image.fromarray(rng.integers(-100, 70000, (height, width), dtype=np.int32)),
            "I (8-bit range)": Image.fromarray(rng.integers(-10, 250, (height, width), dtype=np.int32)),
            "F": Image.fromarray(floats), "1": Image.fromarray(grey > 128),
            "CMYK": Image.fromarray(rgb).convert("CMYK"),
            "RGBa": Image.fromarray(np.dstack([rgb, grey])).convert("RGBa")}


def _oriented(image: Image.Image, orientation: int) -> Image.Image:
    copy = image.copy()
    copy.info = dict(image.info)
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        copy.info["exif"] = exif.tobytes()
    return copy


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # NaN in mode F
@pytest.mark.parametrize("strip_bytes", [data._STRIP_BYTES, 1], ids=["strips", "one-row-strips"])
@pytest.mark.parametrize("size", [(57, 41), (20, 90)])
def test_bounded_decoding_is_bit_identical_to_whole_image_decoding(monkeypatch, strip_bytes, size):
    """Every mode, every EXIF orientation, crops larger than the resize too: the same pixels as before,
    so the cache key's DECODER stays what it was."""
    assert DECODER == "pillow-decode+opencv-resize/1"
    monkeypatch.setattr(data, "_STRIP_BYTES", strip_bytes)
    for mode, image in _modes(*size).items():
        for orientation in range(1, 9):
            for pre in PRESETS:
                expected = _reference(_oriented(image, orientation), pre)
                got = data._preprocess(_oriented(image, orientation), pre)
                assert got.dtype == np.uint8 and np.array_equal(got, expected), (mode, orientation, pre)


@pytest.mark.parametrize("fmt,mode,orientation", [("PNG", "RGBA", 6), ("PNG", "I;16", 8), ("JPEG", "RGB", 5),
                                                  ("TIFF", "RGB", 3), ("WEBP", "RGB", 7), ("GIF", "P", 2)])
def test_decoded_files_are_bit_identical(tmp_path, fmt, mode, orientation):
    image = make_image(3, 96).resize((96, 70))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
    else:
        image = image.convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"x.{fmt.lower()}"
    image.save(path, format=fmt, exif=exif)
    pre = Preprocess(40, 32, (0.5,) * 3, (0.5,) * 3)
    with Image.open(path) as expected:
        expected.load()
        assert np.array_equal(decode(path, pre), _reference(expected, pre))


def test_images_over_the_budget_are_reduced_first(monkeypatch):
    """Past DECODE_BUDGET the whole image is reduced strip by strip before the resampling: close to the
    exact result (it is the same picture), and turned upright the same way."""
    image = _oriented(make_image(5, 400).resize((600, 400)).convert("RGBA"), 6)
    pre = Preprocess(64, 56, (0.5,) * 3, (0.5,) * 3)
    exact = data._preprocess(_oriented(image, 6), pre)
    monkeypatch.setattr(data, "DECODE_BUDGET", 600 * 400 * 4 + 1000)  # the image fits, its kept square does not
    reduced = data._preprocess(_oriented(image, 6), pre)
    assert reduced.shape == exact.shape == (56, 56, 3)
    assert np.abs(reduced.astype(int) - exact.astype(int)).mean() < 2


@pytest.mark.parametrize("fmt,exif", [("WEBP", None), ("TIFF", 6)])
def test_formats_pillow_holds_twice_are_refused_over_the_budget(tmp_path, monkeypatch, fmt, exif):
    """Pillow holds a WebP three times while it decodes it, and a TIFF it turns upright twice: past the
    budget they are skipped with the reason, as a decompression bomb is."""
    path = tmp_path / f"big.{fmt.lower()}"
    tags = Image.Exif()
    if exif:
        tags[0x0112] = exif
    Image.new("RGB", (200, 100), (10, 20, 30)).save(path, format=fmt, exif=tags)
    pre = Preprocess(40, 32, (0.5,) * 3, (0.5,) * 3)
    assert isinstance(decode(path, pre), np.ndarray)
    monkeypatch.setattr(data, "DECODE_BUDGET", 200 * 100 * 4 + 100)
    reason = decode(path, pre)
    size = "100 x 200" if exif else "200 x 100"  # an upright-turned TIFF opens with its sides swapped
    assert reason.startswith(f"refused: too large to decode ({size} {fmt} needs about") and "\n" not in reason


def test_large_files_are_decoded_from_the_open_file_and_still_checked(tmp_path, monkeypatch):
    path = tmp_path / "photo.png"
    make_image(7, 80).save(path)
    pre = Preprocess(40, 32, (0.5,) * 3, (0.5,) * 3)
    in_memory = decode(path, pre, hash_file(path))
    monkeypatch.setattr(data, "_READ_WHOLE", 0)  # every file is "large"
    assert np.array_equal(decode(path, pre, hash_file(path)), in_memory)
    assert decode(path, pre, "0" * 32).startswith("file changed during the run")
    assert decode(tmp_path / "gone.png", pre) == "file not found"
    (tmp_path / "junk.png").write_bytes(b"not an image")
    assert decode(tmp_path / "junk.png", pre) == "not an image (unknown format)"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["I;16", "RGBA", "RGB", "P"])
def test_decoding_a_9400_pixel_square_png_stays_under_600_mb(tmp_path, mode):
    """One 9400 x 9400 PNG (a few hundred KB on disk) took 2.2 GB (16-bit grey) or 1.4 GB (RGBA, palette)
    to decode; the peak resident memory of a fresh process that decodes it is now under 600 MB."""
    from benchmarks.decode_memory import peak_decode_mb, write_big

    path = write_big(tmp_path / "big.png", mode, 9400)
    assert path.stat().st_size < 5 * 2**20
    figures = peak_decode_mb(path)
    assert figures["result"] == [224, 224, 3]
    assert figures["peak_mb"] < 600, figures
