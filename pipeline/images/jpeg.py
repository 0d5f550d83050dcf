"""JPEG headers, read without decoding: enough to choose between nvJPEG and the CPU decoder.

The GPU path (`features.gpu`) reads a few markers of each file (the frame header, the EXIF
orientation, Adobe's APP14 colour transform, an XMP orientation) and sends to the GPU decoder only
what nvJPEG handles the way Pillow does (`JpegHeader.gpu_decodable`). Pure Python: no torch, no
decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_GPU_PIXELS = 64 * 2**20  # larger JPEGs are decoded by the CPU path (Pillow's draft mode is cheaper)

_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_GPU_SOF = frozenset({0xC0, 0xC1})  # baseline and extended sequential, Huffman-coded
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"


@dataclass(frozen=True)
class JpegHeader:
    """What the frame header and the segments before it say; enough to choose a decoder."""

    sof: int  # the start-of-frame marker: 0xC0 baseline, 0xC2 progressive, ...
    precision: int
    width: int
    height: int
    components: int
    orientation: int = 1  # EXIF orientation (1 = as stored)
    adobe_transform: int | None = None  # APP14: 0 = RGB or CMYK coded as is, 1 = YCbCr, 2 = YCCK
    xmp_orientation: bool = False  # Pillow also reads an orientation from XMP; such files go to the CPU

    @property
    def gpu_decodable(self) -> bool:
        return (self.sof in _GPU_SOF and self.precision == 8 and self.components == 3
                and self.adobe_transform != 0 and not self.xmp_orientation
                and 0 < self.width * self.height <= MAX_GPU_PIXELS)


def _exif_orientation(tiff: bytes) -> int:
    """Tag 0x0112 of IFD0 in a TIFF-structured EXIF block; 1 when absent or unreadable."""
    if tiff[:4] == b"II*\x00":
        order = "little"
    elif tiff[:4] == b"MM\x00*":
        order = "big"
    else:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    for entry in range(ifd + 2, ifd + 2 + 12 * int.from_bytes(tiff[ifd:ifd + 2], order), 12):
        if entry + 12 > len(tiff):
            break
        if int.from_bytes(tiff[entry:entry + 2], order) == 0x0112:
            kind = int.from_bytes(tiff[entry + 2:entry + 4], order)
            value = (int.from_bytes(tiff[entry + 8:entry + 10], order) if kind == 3  # SHORT
                     else int.from_bytes(tiff[entry + 8:entry + 12], order) if kind == 4 else 1)  # LONG
            return value if 1 <= value <= 8 else 1
    return 1


def read_jpeg_header(data: bytes | bytearray | memoryview) -> JpegHeader | None:
    """The header of a JPEG file, or None for anything that is not a JPEG with a frame header."""
    if data[:2] != b"\xff\xd8":
        return None
    orientation, adobe, xmp = 1, None, False
    i, end = 2, len(data)
    while i + 4 <= end:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or a scan, before any frame header
            return None
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2 or i + 2 + length > end:
            return None
        segment = bytes(data[i + 4:i + 2 + length])
        if marker == 0xE1 and segment[:6] == b"Exif\x00\x00":
            if orientation == 1:
                orientation = _exif_orientation(segment[6:])
        elif marker == 0xE1 and segment.startswith(_XMP):
            xmp = xmp or b"tiff:Orientation" in segment
        elif marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe = segment[11]
        elif marker in _SOF_MARKERS:
            if len(segment) < 6:
                return None
            return JpegHeader(marker, segment[0], int.from_bytes(segment[3:5], "big"),
                              int.from_bytes(segment[1:3], "big"), segment[5], orientation, adobe, xmp)
        i += 2 + length
    return None


def ends_whole(data: bytes | bytearray | memoryview) -> bool:
    """True when an end-of-image marker closes the data (allowing a little padding after it): a
    truncated file goes to the CPU decoder, which names the problem, rather than to nvJPEG."""
    return b"\xff\xd9" in bytes(data[-64:])
