"""Stage 1 on a CUDA GPU: JPEG files decoded in batches on the GPU, resized and normalised there.

`extract.run_shard` hands a shard to `run_shard` here when the device is CUDA. For each shard:

- threads read each file once and check its bytes against the content id it was hashed to, as
  `images.data.decode` does (a file that changed since is skipped, never stored under another's id);
- a JPEG header parser (a few markers, no decoding) sends the files nvJPEG handles (8-bit baseline
  Huffman, three YCbCr components, ending with an EOI marker) to `torchvision.io.decode_jpeg(device=
  "cuda")` in batches; everything else (PNG, WebP, progressive, CMYK and greyscale JPEGs, truncated
  files, XMP orientation...) is decoded by the CPU path (`decode`) in the same threads, meanwhile;
- Pillow's reduced-scale decoding of large JPEGs (emulated by averaging blocks), the EXIF
  orientation, the centre crop and the resampling run on the GPU with the CPU path's rules (see
  `preprocess`: OpenCV's INTER_AREA / bicubic / bilinear / nearest / Lanczos weights as matrices,
  rounded to uint8 like OpenCV's output), so a GPU-decoded image differs from the CPU one by the two
  JPEG decoders' last bits: the cache key stays the CPU path's, as the device is not in it either;
- the network runs channels-last under bf16 autocast (as asked by the precision), in batches sized
  from free GPU memory (never below `--batch-size`), halved and retried on an out-of-memory error;
- CPU-decoded images go up through pinned host buffers on a copy stream, and each batch's features
  come back into pinned buffers without waiting, so copies overlap the next batch's compute;
- `PIPELINE_GPU_COMPILE=1` (or a `torch.compile` mode such as `reduce-overhead` for CUDA graphs) runs
  the network through `torch.compile`, falling back to eager mode on any compile error;
  `PIPELINE_GPU_DECODE=0` sends every file to the CPU path's decoding and resizing (the network still
  runs on the GPU).

Every function here also runs on CPU tensors (`device="cpu"`), which is how it is tested without a GPU.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.features import extract as _extract
from pipeline.features.cache import FeatureStore
from pipeline.images.data import content_id, decode

if TYPE_CHECKING:
    from pipeline.images.preprocess import Preprocess
    from pipeline.models.taps import TappedNetwork

log = logging.getLogger(__name__)

COMPILE_ENV = "PIPELINE_GPU_COMPILE"
GPU_DECODE_ENV = "PIPELINE_GPU_DECODE"
MAX_BATCH = 512  # a larger batch brings a small CNN no more speed, only more memory
PROBE_BATCH = 8  # images in the forward pass that measures memory per image
MEMORY_FRACTION = 0.5  # of the free GPU memory, for the network's batches (the rest: decoding, resizing)
DECODE_PIXELS = 96 * 2**20  # source pixels per batched GPU decode (about 300 MB of RGB output)
RESIZE_FLOATS = 64 * 2**20  # float32 elements per resize step (256 MB)
MAX_GPU_PIXELS = 64 * 2**20  # larger JPEGs are decoded by the CPU path (Pillow's draft mode is cheaper)


# --------------------------------------------------------------------------- JPEG headers

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


# --------------------------------------------------------------------------- geometry, as images.data does it

def crop_box(height: int, width: int, pre: Preprocess) -> tuple[int, int, int]:
    """(top, left, side) of the square the CPU path keeps (`images.data._resize_and_crop`)."""
    box = max(1, round(min(width, height) * pre.crop / pre.resize))
    return (height - box) // 2, (width - box) // 2, box


def resize_method(box: int, pre: Preprocess) -> str:
    """OpenCV's INTER_AREA when shrinking, else the backbone's interpolation, as the CPU path."""
    return "area" if box > pre.crop else pre.interpolation


def _cubic(f: float) -> list[float]:
    a = -0.75  # OpenCV's (and PyTorch's) bicubic coefficient
    c0 = ((a * (f + 1) - 5 * a) * (f + 1) + 8 * a) * (f + 1) - 4 * a
    c1 = ((a + 2) * f - (a + 3)) * f * f + 1
    c2 = ((a + 2) * (1 - f) - (a + 3)) * (1 - f) * (1 - f) + 1
    return [c0, c1, c2, 1 - c0 - c1 - c2]


def _lanczos4(f: float) -> list[float]:
    if f < 1.19209290e-07:  # OpenCV's FLT_EPSILON shortcut
        return [0, 0, 0, 1, 0, 0, 0, 0]
    values = [math.sin(y) * math.sin(y / 4) / (y * y / 4) for y in ((f + 3 - k) * math.pi for k in range(8))]
    total = sum(values)
    return [v / total for v in values]


@lru_cache(maxsize=512)
def resize_weights(src: int, dst: int, method: str) -> np.ndarray:
    """A (dst, src) matrix M such that `M @ x @ M.T` resamples a square `src` image to `dst` exactly
    as `cv2.resize` does (float64; borders replicated, as OpenCV does for resizing)."""
    weights = np.zeros((dst, src))
    if method == "area":  # every source pixel weighted by the fraction of it inside the output pixel
        scale = src / dst
        for i in range(dst):
            lo, hi = i * scale, (i + 1) * scale
            for j in range(math.floor(lo), min(math.ceil(hi), src)):
                weights[i, j] = (min(hi, j + 1) - max(lo, j)) / scale
        return weights
    if method == "nearest":
        inverse = 1.0 / (dst / src)  # OpenCV's rounding of the scale, which decides ties
        for i in range(dst):
            weights[i, min(math.floor(i * inverse), src - 1)] = 1.0
        return weights
    if method not in ("bilinear", "bicubic", "lanczos"):
        raise ValueError(f"unknown interpolation {method!r}")
    scale = src / dst
    for i in range(dst):
        position = (i + 0.5) * scale - 0.5
        left = math.floor(position)
        f = position - left
        if method == "bilinear":
            taps = {left: 1 - f, left + 1: f}
            if left < 0:
                taps = {0: 1.0}
            elif left >= src - 1:
                taps = {src - 1: 1.0}
        elif method == "bicubic":
            taps = dict(zip(range(left - 1, left + 3), _cubic(f), strict=True))
        else:
            taps = dict(zip(range(left - 3, left + 5), _lanczos4(f), strict=True))
        for j, w in taps.items():
            weights[i, min(max(j, 0), src - 1)] += w
    return weights


_WEIGHTS: dict[tuple, torch.Tensor] = {}
_WEIGHTS_LOCK = threading.Lock()


def _weights_on(src: int, dst: int, method: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (src, dst, method, str(device))
    with _WEIGHTS_LOCK:
        if key not in _WEIGHTS:
            matrix = torch.from_numpy(resize_weights(src, dst, method)).to(device, torch.float32)
            _WEIGHTS[key] = matrix
        matrix = _WEIGHTS[key]
    return matrix, matrix.t()


_ORIENT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    # EXIF orientation -> what Pillow's exif_transpose does, on (..., H, W) tensors
    2: lambda x: x.flip(-1),                       # FLIP_LEFT_RIGHT
    3: lambda x: x.flip(-2, -1),                   # ROTATE_180
    4: lambda x: x.flip(-2),                       # FLIP_TOP_BOTTOM
    5: lambda x: x.transpose(-2, -1),              # TRANSPOSE
    6: lambda x: x.rot90(-1, (-2, -1)),            # ROTATE_270 (clockwise)
    7: lambda x: x.transpose(-2, -1).flip(-2, -1),  # TRANSVERSE
    8: lambda x: x.rot90(1, (-2, -1)),             # ROTATE_90 (counter-clockwise)
}


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (..., H, W) image turned upright the way `PIL.ImageOps.exif_transpose` does it."""
    turn = _ORIENT.get(orientation)
    return turn(image) if turn else image


def draft_scale(height: int, width: int, pre: Preprocess) -> int:
    """The reduction (1, 2, 4 or 8) at which the CPU path's Pillow decodes a JPEG of this stored
    size (`Image.draft` with `images.data._draft_size`): the largest that keeps both sides at or
    above the resize target."""
    target = pre.resize / min(width, height)
    wanted = (max(1, int(width * target + 0.999)), max(1, int(height * target + 0.999)))
    scale = min(width // wanted[0], height // wanted[1])
    return next((s for s in (8, 4, 2) if scale >= s), 1)


def preprocess(images: torch.Tensor, orientation: int, pre: Preprocess) -> torch.Tensor:
    """(N, 3, H, W) uint8 decoded JPEGs of one stored size and orientation -> (N, 3, crop, crop) uint8,
    the CPU path's numbers: Pillow's reduced-scale (draft) decoding emulated by averaging s x s
    blocks (rounded to uint8, as the decoder's output is), the EXIF orientation, then the centre
    square resampled with OpenCV's weights and rounded like OpenCV's uint8 output."""
    height, width = images.shape[-2:]
    scale = draft_scale(height, width, pre)
    step = max(1, RESIZE_FLOATS // (3 * height * width))
    out = []
    for start in range(0, images.shape[0], step):
        chunk = images[start:start + step]
        if scale > 1:
            chunk = F.avg_pool2d(chunk.float(), scale, scale, ceil_mode=True).round_()
        out.append(resize_and_crop(apply_orientation(chunk, orientation), pre))
    return torch.cat(out) if len(out) > 1 else out[0]


def resize_and_crop(images: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """(N, 3, H, W) images (uint8, or float holding whole numbers) of one size -> (N, 3, crop, crop)
    uint8: the centre square `images.data._resize_and_crop` keeps, resampled with OpenCV's weights."""
    height, width = images.shape[-2:]
    top, left, box = crop_box(height, width, pre)
    rows, cols = _weights_on(box, pre.crop, resize_method(box, pre), images.device)
    step = max(1, RESIZE_FLOATS // (3 * box * box))
    out = []
    for start in range(0, images.shape[0], step):
        region = images[start:start + step, :, top:top + box, left:left + box].float()
        resized = torch.matmul(torch.matmul(rows, region), cols)
        out.append(resized.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out) if len(out) > 1 else out[0]


_SCALES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def normalise(images: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 channels-last network input, as `extract.forward` computes it."""
    key = (pre.mean, pre.std, str(images.device))
    if key not in _SCALES:  # made once: a small host-to-device copy would wait for the stream each time
        _SCALES[key] = (torch.tensor(pre.mean, device=images.device).view(1, 3, 1, 1) * 255,
                        torch.tensor(pre.std, device=images.device).view(1, 3, 1, 1) * 255)
    mean, std = _SCALES[key]
    x = images.contiguous(memory_format=torch.channels_last).float()
    return (x - mean) / std


def _decode_jpegs(datas: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device))
    except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError too
        log.debug("batched JPEG decode failed (%s); decoding one at a time", exc)
        if is_oom(exc):
            torch.cuda.empty_cache()
    out: list[torch.Tensor | None] = []
    for data in datas:
        try:
            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as exc:
            log.debug("JPEG decode failed on %s (%s); the CPU decoder takes it", device, exc)
            out.append(None)
    return out


_DECODE_STREAMS: dict[int, torch.cuda.Stream] = {}


def decode_batch(datas: Sequence[torch.Tensor], device: str | torch.device) -> list[torch.Tensor | None]:
    """`torchvision.io.decode_jpeg` over a batch of encoded files, as (3, H, W) uint8 RGB on `device`.

    If the batch as a whole fails (one bad file, or memory), each file is decoded alone; None marks
    the files that still fail (the caller gives them to the CPU decoder, which names the problem).

    On CUDA the decoder runs with a stream of its own current. torchvision's CUDA decoder (and
    nvJPEG's hardware engine on H100s) writes its outputs without waiting for the work queued on the
    stream that allocated them (pytorch/vision PR 9606, meta-pytorch/torchcodec PR 1634): given the
    caller's stream, it can be handed memory just freed there that queued kernels still read, and
    overwrite it. PyTorch's caching allocator keeps one pool per stream, so outputs allocated on a
    stream that only the decoder uses can only reuse the decoder's own earlier outputs, and
    `record_stream` keeps those from being reused while the caller's stream still reads them."""
    if not datas:
        return []
    device = torch.device(device)
    if device.type != "cuda":
        return _decode_jpegs(datas, device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DECODE_STREAMS:
        _DECODE_STREAMS[index] = torch.cuda.Stream(device=index)
    side, caller = _DECODE_STREAMS[index], torch.cuda.current_stream(index)
    with torch.cuda.stream(side):
        images = _decode_jpegs(datas, device)
    caller.wait_stream(side)
    for image in images:
        if image is not None:
            image.record_stream(caller)
    return images


def overwrites_queued_memory(decode: Callable[[list[torch.Tensor]], list], datas: list[torch.Tensor],
                             nbytes: int, trials: int = 5) -> int:
    """How many of `trials` decodes overwrote memory that work queued on the current CUDA stream was
    still reading: the hazard `decode_batch` guards against (`nbytes`: one decoded image's size, so
    the allocator has the freed blocks at hand). A diagnostic for the GPU check and its test."""
    corrupted = 0
    for _ in range(trials):
        victims = [torch.ones(nbytes, dtype=torch.uint8, device="cuda") for _ in datas]
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # keeps the stream busy: the sums below are still queued
        sums = [victim.sum(dtype=torch.int64) for victim in victims]
        del victims  # freed on the stream, with reads queued: the allocator may hand the blocks out again
        decode(datas)
        torch.cuda.synchronize()
        corrupted += any(int(total) != nbytes for total in sums)
    return corrupted


# --------------------------------------------------------------------------- memory

def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError)


def batch_from_memory(free_bytes: int, per_image_bytes: float, floor: int = 1, cap: int = MAX_BATCH,
                      fraction: float = MEMORY_FRACTION) -> int:
    """The largest power of two whose activations fit in `fraction` of the free memory, within
    [floor, cap] (floor wins over cap: an explicit batch size is honoured, and halved on OOM)."""
    fits = int(free_bytes * fraction / max(per_image_bytes, 1.0))
    size = 1 << max(fits, 1).bit_length() - 1
    return max(floor, min(cap, size))


class OomRetry:
    """Runs `fn` over a batch in chunks of `size`; on an out-of-memory error frees the cache, halves
    `size` and retries the same chunk. The smaller size is kept for later calls (the memory is not
    coming back); a single image that does not fit re-raises the error."""

    def __init__(self, size: int, on_shrink: Callable[[], None] | None = None) -> None:
        self.size = max(1, size)
        self.on_shrink = on_shrink or _empty_cuda_cache

    def __call__(self, fn: Callable[[Any], Any], batch: Any) -> list[Any]:
        outputs, start, total = [], 0, len(batch)
        while start < total:
            chunk = batch[start:start + self.size]
            try:
                outputs.append(fn(chunk))
            except RuntimeError as exc:
                if not is_oom(exc) or self.size == 1:
                    raise
                self.size //= 2
                log.warning("out of GPU memory at a batch of %d images; retrying at %d", len(chunk), self.size)
                self.on_shrink()
                continue
            start += len(chunk)
        return outputs


def _empty_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the network, per process

@dataclass
class _Runner:
    """The forward pass of one network on one device: batch size, OOM state, compiled version."""

    network: TappedNetwork
    pre: Preprocess
    device: str
    precision: str
    retry: OomRetry
    compiled: Callable | None = None
    compile_mode: str | None = None

    @property
    def batch_size(self) -> int:
        return self.retry.size

    def _eager(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode(), torch.autocast(self.device, dtype=torch.bfloat16,
                                                    enabled=self.precision == "bf16"):
            return self.network(x)

    def _call(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = normalise(images, self.pre)
        if self.compiled is not None:
            try:
                return self._compiled(x)
            except RuntimeError as exc:
                if is_oom(exc):
                    raise
                self._drop_compiled(exc)
            except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager mode
                self._drop_compiled(exc)
        return self._eager(x)

    def _compiled(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n = x.shape[0]
        if n < self.batch_size:  # one input shape only: no recompiles, and CUDA graphs replay
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))]).contiguous(
                memory_format=torch.channels_last)
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.inference_mode(), torch.autocast(self.device, dtype=torch.bfloat16,
                                                    enabled=self.precision == "bf16"):
            out = self.compiled(x)
        return {layer: value[:n].clone() for layer, value in out.items()}

    def _drop_compiled(self, exc: BaseException) -> None:
        log.warning("torch.compile failed (%s: %s); running the network eagerly", type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "")
        self.compiled = None

    def __call__(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """uint8 (N, 3, crop, crop) on the device -> per chunk, pooled features per layer (on the device)."""
        return self.retry(self._call, images)


_RUNNERS: dict[tuple, _Runner] = {}
_RUNNERS_LOCK = threading.Lock()


def _per_image_bytes(runner: _Runner) -> float:
    """Peak memory of a forward pass per image, measured on a small batch of zeros."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    zeros = torch.zeros((PROBE_BATCH, 3, runner.pre.crop, runner.pre.crop), dtype=torch.uint8, device=runner.device)
    runner._eager(normalise(zeros, runner.pre))
    torch.cuda.synchronize()
    return max(torch.cuda.max_memory_allocated() - base, 1) / PROBE_BATCH


def compile_mode() -> str | None:
    """None (off, the default), or the `torch.compile` mode asked for by PIPELINE_GPU_COMPILE."""
    value = os.environ.get(COMPILE_ENV, "").strip()
    if value in ("", "0", "false", "no", "off"):
        return None
    return "default" if value in ("1", "true", "yes", "on") else value


def _runner(job: _extract.ShardJob, network: TappedNetwork, pre: Preprocess) -> _Runner:
    mode = compile_mode() if job.device == "cuda" else None
    key = (job.backbone, job.weights, job.weights_sha256, job.layers, job.device, job.precision, mode)
    with _RUNNERS_LOCK:
        if key not in _RUNNERS:
            runner = _Runner(network, pre, job.device, job.precision, OomRetry(job.batch_size))
            if job.device == "cuda":
                runner.retry.size = batch_from_memory(torch.cuda.mem_get_info()[0], _per_image_bytes(runner),
                                                      floor=job.batch_size)
                log.info("GPU batch size %d (from free memory; --batch-size %d)", runner.batch_size,
                         job.batch_size)
            if mode is not None:
                try:
                    runner.compiled = torch.compile(network, mode=None if mode == "default" else mode)
                    runner.compile_mode = mode
                except Exception as exc:  # noqa: BLE001 - no compiler, unsupported mode...
                    runner._drop_compiled(exc)
            _RUNNERS[key] = runner
        return _RUNNERS[key]


# --------------------------------------------------------------------------- one shard

def _read(path: str, image_id: str) -> bytearray | str:
    """The file's bytes once, checked against its id; or the reason `decode` would give."""
    try:
        with open(path, "rb") as fh:
            data = bytearray(fh.read())
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return f"unreadable file: {exc.strerror or exc}"
    if not data:
        return "empty file"
    if content_id(data) != image_id:
        return "file changed during the run (rerun to pick up the new content)"
    return data


def _threads() -> int:
    return max(2, min(16, os.cpu_count() or 2))


def gpu_decode_enabled() -> bool:
    return os.environ.get(GPU_DECODE_ENV, "1").strip() not in ("0", "false", "no", "off")


class _ShardWork:
    """Decoding and the forward passes of one shard, overlapped. Features stay on the device until
    the end, except that each batch's are copied into pinned host memory as soon as it is queued."""

    def __init__(self, job: _extract.ShardJob, runner: _Runner, pool: ThreadPoolExecutor,
                 on_progress: Callable[[int], None] | None, gpu_decode: bool) -> None:
        self.job, self.runner, self.pool, self.on_progress = job, runner, pool, on_progress
        self.pre = runner.pre
        self.device = torch.device(job.device)
        self.cuda = self.device.type == "cuda"
        self.gpu_decode = gpu_decode and self.pre.crop <= self.pre.resize  # else the crop leaves the image
        self.copy_stream = torch.cuda.Stream() if self.cuda else None
        self.failed: dict[str, str] = {}
        self.done_ids: list[str] = []
        self.outputs: dict[str, list[torch.Tensor]] = {layer: [] for layer in job.layers}
        self.ready: list[torch.Tensor] = []  # uint8 (n, 3, crop, crop) on the device, in ready_ids order
        self.ready_ids: list[str] = []
        self.encoded: list[tuple[str, bytearray, JpegHeader]] = []
        self.encoded_pixels = 0
        self.fallback: list[tuple[str, Future]] = []
        self.gpu_decoded = 0
        self.paths = dict(zip(job.image_ids, job.paths, strict=True))

    # -- routing
    def add(self, path: str, image_id: str, data: bytearray | str) -> None:
        if isinstance(data, str):
            self._fail(image_id, data)
            return
        header = read_jpeg_header(data) if self.gpu_decode else None
        if header is not None and header.gpu_decodable and ends_whole(data):
            self.encoded.append((image_id, data, header))
            self.encoded_pixels += header.width * header.height
            if len(self.encoded) >= self.runner.batch_size or self.encoded_pixels >= DECODE_PIXELS:
                self.decode_encoded()
            return
        self._to_cpu(path, image_id)

    def _to_cpu(self, path: str, image_id: str) -> None:
        self.fallback.append((image_id, self.pool.submit(decode, Path(path), self.pre, image_id)))

    def _fail(self, image_id: str, reason: str) -> None:
        self.failed[image_id] = reason
        if self.on_progress:
            self.on_progress(1)

    # -- decoding
    def decode_encoded(self) -> None:
        if not self.encoded:
            return
        batch, self.encoded, self.encoded_pixels = self.encoded, [], 0
        images = decode_batch([torch.frombuffer(data, dtype=torch.uint8) for _, data, _ in batch], self.device)
        groups: dict[tuple[int, int, int], list[tuple[str, torch.Tensor]]] = {}
        for (image_id, _data, header), image in zip(batch, images, strict=True):
            if image is None:
                self._to_cpu(self.paths[image_id], image_id)
                continue
            groups.setdefault((*image.shape[-2:], header.orientation), []).append((image_id, image))
        for (_height, _width, orientation), members in groups.items():
            stacked = torch.stack([image for _, image in members])
            self._push(preprocess(stacked, orientation, self.pre), [image_id for image_id, _ in members])
            self.gpu_decoded += len(members)
        self.run_full_batches()

    def upload_fallback(self) -> None:
        """The CPU-decoded images, through one pinned buffer and a copy stream."""
        arrays, ids = [], []
        for image_id, future in self.fallback:
            image = future.result()
            if isinstance(image, str):
                self._fail(image_id, image)
            else:
                arrays.append(image)
                ids.append(image_id)
        self.fallback = []
        if not arrays:
            return
        host = torch.from_numpy(np.stack(arrays))  # (n, crop, crop, 3)
        if self.cuda:
            host = host.pin_memory()
            with torch.cuda.stream(self.copy_stream):
                on_device = host.to(self.device, non_blocking=True)
            torch.cuda.current_stream().wait_stream(self.copy_stream)
            on_device.record_stream(torch.cuda.current_stream())
        else:
            on_device = host
        self._push(on_device.permute(0, 3, 1, 2), ids)  # NHWC memory: already channels-last

    def _push(self, images: torch.Tensor, ids: list[str]) -> None:
        self.ready.append(images)
        self.ready_ids += ids

    # -- the network
    def run_full_batches(self, final: bool = False) -> None:
        size = self.runner.batch_size
        count = len(self.ready_ids)
        if count < size and not (final and count):
            return
        images = torch.cat(self.ready) if len(self.ready) > 1 else self.ready[0]
        take = count if final else count - count % size
        self.ready = [images[take:]] if take < count else []
        ids, self.ready_ids = self.ready_ids[:take], self.ready_ids[take:]
        for chunk in self.runner(images[:take]):
            for layer, value in chunk.items():
                if self.cuda:  # back to the host without waiting: the next batch computes meanwhile
                    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                    host.copy_(value, non_blocking=True)
                    value = host
                self.outputs[layer].append(value)
        self.done_ids += ids
        if self.on_progress:
            self.on_progress(take)

    def features(self) -> dict[str, np.ndarray]:
        if self.cuda:
            torch.cuda.current_stream().synchronize()
        return {layer: torch.cat(values).numpy() if values else np.zeros((0, 0), np.float32)
                for layer, values in self.outputs.items()}


def run_shard(job: _extract.ShardJob, on_progress: Callable[[int], None] | None = None) -> _extract.ShardResult:
    """`extract.run_shard` for a CUDA device (any device works: the tests run it on the CPU)."""
    network, pre = _extract._network(job)
    runner = _runner(job, network, pre)
    started = time.perf_counter()
    with ThreadPoolExecutor(_threads()) as pool:
        work = _ShardWork(job, runner, pool, on_progress, gpu_decode_enabled())
        for path, image_id, data in zip(job.paths, job.image_ids,
                                        pool.map(_read, job.paths, job.image_ids), strict=True):
            work.add(path, image_id, data)
        work.decode_encoded()
        work.upload_fallback()
        work.run_full_batches(final=True)
        features = work.features()
    log.debug("shard %s: %d images decoded on %s, %d by the CPU path, %d skipped", job.shard, work.gpu_decoded,
              job.device, len(work.done_ids) - work.gpu_decoded, len(work.failed))
    good_ids = work.done_ids
    per_image = (time.perf_counter() - started) / max(len(good_ids), 1)
    for layer, store, needed in zip(job.layers, job.stores, job.needed, strict=True):
        rows = [i for i, image_id in enumerate(good_ids) if image_id in needed]
        if rows:
            FeatureStore(Path(store)).write_shard(job.shard, [good_ids[i] for i in rows], features[layer][rows],
                                                  per_image * len(rows))
    return _extract.ShardResult(len(good_ids), work.failed)
