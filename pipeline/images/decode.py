"""Decoding an image robustly into the network's input: a uint8 square, the backbone's preprocessing.

Decoding never raises for a bad file: it returns the reason, and the caller skips it. The bytes are
checked against the image's id (`pipeline.images.data`), so a file that changed since it was hashed
is skipped instead of storing one image's features under another's id.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.core.errors import first_line
from pipeline.images.data import content_id, stream_id
from pipeline.images.preprocess import Preprocess

_CV2_RESAMPLE = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST,
                 "lanczos": cv2.INTER_LANCZOS4}
# Identifies this decoding and resampling code in the cache key: changing it changes the numbers.
DECODER = "pillow-decode+opencv-resize/1"
cv2.setNumThreads(1)  # decoding runs beside the network, which already has every core


# Decoding memory. A decoded image is held once, as Pillow stores it (1, 2 or 4 bytes a pixel), and
# never copied whole: it becomes RGB a strip of rows at a time, and only the square the crop keeps is
# kept (an HxWx3 uint8 array), so the result is the same as converting the whole image first. Where even
# that square would pass DECODE_BUDGET (an image near Pillow's pixel limit: 76 megapixels of RGB, say),
# the whole image is reduced by an integer factor strip by strip (Pillow's box reduce) to twice the
# resize target before it is resampled, as `Image.thumbnail` does, which keeps the peak under about
# 600 MB for any image Pillow accepts. Files over _READ_WHOLE are decoded from the open file instead of
# from a copy of their bytes in memory (an uncompressed TIFF or BMP is as large as its pixels). Pillow
# itself holds some formats more than once while it loads them (`_decoder_bytes`): a WebP or an upright-
# turned TIFF whose load alone would pass the budget is refused with its reason, as a decompression
# bomb is.
DECODE_BUDGET = 480 * 2**20  # bytes: the decoded image, the kept square and the file's bytes together
_STRIP_BYTES = 4 * 2**20  # bytes of Pillow pixels converted at a time
_READ_WHOLE = 32 * 2**20  # larger files are decoded from the open file, then checked against their id
_DEEP = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # scaled to 8 bits, not clipped
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")  # composited on white
_PILLOW_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}  # else 4 a pixel
# 16-bit grey to 8 bits: the same float64 arithmetic as ever (value / 65535 * 255, truncated), once per
# possible value instead of once per pixel.
_FROM_16_BITS = np.clip(np.arange(65536, dtype=np.float64) / 65535.0 * 255.0, 0, 255).astype(np.uint8)
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,  # as ImageOps.exif_transpose
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
_SWAPS_SIDES = (Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
                Image.Transpose.ROTATE_90)


def _deep_top(image: Image.Image) -> float | None:
    """What 16-bit, 32-bit and float pixels are scaled from to 255: 65535 for 16-bit images and for
    others whose largest value passes 255, else 255 (None for other modes). Read a strip at a time."""
    if image.mode not in _DEEP:
        return None
    if image.mode.startswith("I;16"):
        return 65535.0
    rows = _strip_rows(image.width, 1)
    largest = np.max([np.asarray(image.crop((0, y, image.width, min(y + rows, image.height)))).max()
                      for y in range(0, image.height, rows)])
    return 65535.0 if largest > 255 else 255.0


def _rgb_rows(strip: Image.Image, top: float | None, transparency: bool) -> np.ndarray:
    """Rows of the decoded image (a crop of it) as 8-bit RGB: 16-bit and float scaled from `top` (not
    clipped), alpha composited on white, palettes with a transparent colour (`transparency`) too. Every
    step works pixel by pixel, so converting strip by strip equals converting the whole image."""
    if strip.mode in _DEEP:
        if strip.mode.startswith("I;16"):
            grey = _FROM_16_BITS[np.asarray(strip)]
        else:
            grey = np.clip(np.asarray(strip, dtype=np.float64) / top * 255.0, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if strip.mode == "P":
        strip = strip.convert("RGBA" if transparency else "RGB")
    if strip.mode in _ALPHA:
        background = Image.new("RGBA", strip.size, (255, 255, 255, 255))
        strip = Image.alpha_composite(background, strip.convert("RGBA"))
    return np.asarray(strip.convert("RGB") if strip.mode != "RGB" else strip)


def _strip_rows(width: int, multiple: int) -> int:
    """Rows per strip: about _STRIP_BYTES of Pillow pixels, a multiple of `multiple`."""
    return multiple * max(1, _STRIP_BYTES // (4 * max(1, width) * multiple))


_T = Image.Transpose
_UPRIGHT_VIEWS = {_T.FLIP_LEFT_RIGHT: lambda a: a[:, ::-1], _T.FLIP_TOP_BOTTOM: lambda a: a[::-1],
                  _T.ROTATE_180: lambda a: a[::-1, ::-1], _T.TRANSPOSE: lambda a: a.transpose(1, 0, 2),
                  _T.ROTATE_90: lambda a: np.rot90(a, -1), _T.ROTATE_270: lambda a: np.rot90(a, 1),
                  _T.TRANSVERSE: lambda a: np.rot90(a, 2).transpose(1, 0, 2)}


def _upright_view(array: np.ndarray, method: Image.Transpose | None) -> np.ndarray:
    """A view of `array` in the decoded image's orientation: writing the decoded rows into it leaves
    `array` turned as `image.transpose(method)` would be."""
    return array if method is None else _UPRIGHT_VIEWS[method](array)


def _source_box(size: tuple[int, int], method: Image.Transpose | None, left: int, top: int,
                side: int) -> tuple[int, int, int, int]:
    """The (left, upper, right, lower) box of the decoded image that becomes the square at (left, top)
    of the upright image."""
    width, height = size
    right, bottom = width - left - side, height - top - side  # the square's offsets from the far sides
    across, down = width - top - side, height - left - side  # the same, for the turns that swap the sides
    x, y = {None: (left, top), _T.FLIP_LEFT_RIGHT: (right, top), _T.FLIP_TOP_BOTTOM: (left, bottom),
            _T.ROTATE_180: (right, bottom), _T.TRANSPOSE: (top, left), _T.ROTATE_90: (across, left),
            _T.ROTATE_270: (top, down), _T.TRANSVERSE: (across, down)}[method]
    return x, y, x + side, y + side


def _convert(image: Image.Image, box: tuple[int, int, int, int], out: np.ndarray, factor: int = 1) -> None:
    """Fill `out` with the `box` of the decoded image as 8-bit RGB, a strip of rows at a time, each
    reduced by `factor` (Pillow's box average; strips start at multiples of it, so the result is the
    whole box's reduction)."""
    top, transparency = _deep_top(image), "transparency" in image.info
    x0, y0, x1, y1 = box
    rows = _strip_rows(x1 - x0, factor)
    for y in range(y0, y1, rows):
        strip = _rgb_rows(image.crop((x0, y, x1, min(y + rows, y1))), top, transparency)
        if factor > 1:
            strip = np.asarray(Image.fromarray(strip).reduce(factor))
        out[(y - y0) // factor:(y - y0) // factor + len(strip)] = strip


def _draft_size(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    scale = shorter / min(size)
    return (max(1, int(size[0] * scale + 0.999)), max(1, int(size[1] * scale + 0.999)))


def _resample(region: np.ndarray, side: int, pre: Preprocess) -> np.ndarray:
    """The kept square (of `side` source pixels) resampled to crop x crop, by area averaging when it
    shrinks (no aliasing)."""
    method = cv2.INTER_AREA if side > pre.crop else _CV2_RESAMPLE[pre.interpolation]
    return cv2.resize(region, (pre.crop, pre.crop), interpolation=method)


def _box_side(size: tuple[int, int], pre: Preprocess) -> int:
    return max(1, round(min(size) * pre.crop / pre.resize))  # the source box the crop keeps, in source pixels


def _resize_and_crop(image: Image.Image | np.ndarray, pre: Preprocess) -> np.ndarray:
    """Resize the shorter side to `pre.resize` and centre-crop `pre.crop`, as one resampling pass.

    Only the source box that the crop keeps is resampled, straight to crop x crop. OpenCV does the
    resampling: Pillow's bicubic takes about 0.7 ms for a 224 px output, a tenth of a forward pass on
    two CPU cores, where OpenCV takes under 0.1 ms. Shrinking uses area averaging (no aliasing).
    """
    array = np.asarray(image)
    height, width = array.shape[:2]
    box = _box_side((width, height), pre)
    left, top = (width - box) // 2, (height - box) // 2
    return _resample(array[top:top + box, left:left + box], box, pre)


def _decoder_bytes(image: Image.Image) -> int:
    """What Pillow holds while it loads `image`: the decoded pixels, three times over for WebP (the
    decoder's canvas, a copy as bytes, the image) and twice for a TIFF it turns upright while loading."""
    copies = 1
    if image.format == "WEBP":
        copies = 3
    elif image.format == "TIFF" and getattr(image, "tag_v2", {}).get(0x0112) in range(2, 9):
        copies = 2
    return image.width * image.height * _PILLOW_BYTES.get(image.mode, 4) * copies


def _preprocess(image: Image.Image, pre: Preprocess, held: int = 0) -> np.ndarray:
    """A loaded image, upright (EXIF orientation), in RGB, resized and centre-cropped; `held` is what the
    caller holds besides (the file's bytes), counted against DECODE_BUDGET."""
    method = _ORIENTATION.get(image.getexif().get(0x0112, 1))
    width, height = image.size
    upright = (height, width) if method in _SWAPS_SIDES else (width, height)
    side = _box_side(upright, pre)
    decoded = width * height * _PILLOW_BYTES.get(image.mode, 4) + held
    if side <= min(upright) and decoded + 3 * side * side <= DECODE_BUDGET:
        # The square the crop keeps, converted from the decoded image's rows: the same pixels as turning
        # and converting the whole image and cutting the square out of it.
        region = np.empty((side, side, 3), np.uint8)
        left, top = (upright[0] - side) // 2, (upright[1] - side) // 2
        _convert(image, _source_box(image.size, method, left, top, side), _upright_view(region, method))
        return _resample(region, side, pre)
    factor = 1 if decoded + 3 * width * height <= DECODE_BUDGET else max(2, min(width, height) // (2 * pre.resize))
    whole = np.empty((-(-height // factor), -(-width // factor), 3), np.uint8)
    _convert(image, (0, 0, width, height), whole, factor)
    reduced = Image.fromarray(whole)
    return _resize_and_crop(reduced.transpose(method) if method is not None else reduced, pre)


_CHANGED = "file changed during the run (rerun to pick up the new content)"


def read_checked(path: str | os.PathLike, expected_id: str | None = None) -> bytes | str:
    """The file's bytes, read once and, given `expected_id`, checked against it; or a one-line reason
    why it is skipped. A file that changed since it was hashed is skipped instead of storing one
    image's features under another's id. `decode` reads with it, and so does the GPU path."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return f"unreadable file: {exc.strerror or exc}"
    if not data:
        return "empty file"
    if expected_id is not None and content_id(data) != expected_id:
        return _CHANGED
    return data


def decode(path: Path, pre: Preprocess, expected_id: str | None = None) -> np.ndarray | str:
    """The preprocessed image as an HxWx3 uint8 array, or a one-line reason why it was skipped.

    The bytes are read once and, given `expected_id`, checked against it (`read_checked`); a file over
    _READ_WHOLE is decoded from the open file instead, and its bytes checked once decoded.
    """
    try:
        large = os.stat(path).st_size > _READ_WHOLE
    except OSError:
        large = False  # read_checked says why
    if large:
        return _decode_open_file(path, pre, expected_id)
    data = read_checked(path, expected_id)
    if isinstance(data, str):
        return data
    return _decode_stream(io.BytesIO(data), pre, len(data))


def decode_bytes(data: bytes, pre: Preprocess) -> np.ndarray | str:
    """`decode` for an image held in memory (an upload, say): the same checks and limits, no content id."""
    if not data:
        return "empty file"
    return _decode_stream(io.BytesIO(data), pre, len(data))


def _decode_open_file(path: Path, pre: Preprocess, expected_id: str | None) -> np.ndarray | str:
    """`decode` for a large file: decoded from the open file, then its bytes (from that same open file)
    checked against `expected_id`, so what was decoded is what was hashed."""
    try:
        with open(path, "rb") as fh:
            result = _decode_stream(fh, pre, 0)
            if expected_id is not None and not isinstance(result, str):
                fh.seek(0)
                if stream_id(fh) != expected_id:
                    return _CHANGED
            return result
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return f"unreadable file: {exc.strerror or exc}"


def _decode_stream(stream: io.BufferedIOBase, pre: Preprocess, held: int) -> np.ndarray | str:
    try:
        with Image.open(stream) as image:
            if image.width * image.height > Image.MAX_IMAGE_PIXELS:
                return (f"refused: decompression bomb ({image.width} x {image.height} pixels, over Pillow's "
                        f"limit of {Image.MAX_IMAGE_PIXELS})")
            image.seek(0)  # first frame of animations
            if image.format == "JPEG":
                # Decode at reduced scale (1/2, 1/4, 1/8) when the target is much smaller: the
                # IDCT then does a fraction of the work; the result stays >= the resize target.
                image.draft("RGB", _draft_size(image.size, pre.resize))
            need = _decoder_bytes(image) + held
            if need > DECODE_BUDGET:
                return (f"refused: too large to decode ({image.width} x {image.height} {image.format} needs about "
                        f"{need >> 20} MB, over the {DECODE_BUDGET >> 20} MB one image may take)")
            image.load()
            return _preprocess(image, pre, held)
    except Image.DecompressionBombError as exc:
        return f"refused: decompression bomb ({first_line(exc)})"
    except UnidentifiedImageError:
        return "not an image (unknown format)"
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return f"corrupt or truncated image: {first_line(exc)}"
    except Exception as exc:  # noqa: BLE001 - a malformed file may trip any decoder; it must not stop the run
        return f"cannot decode: {type(exc).__name__}: {first_line(exc)}"
