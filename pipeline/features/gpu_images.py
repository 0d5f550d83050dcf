"""The GPU path's image operations, on (N, 3, H, W) tensors: batched JPEG decoding, and the CPU path's
preprocessing (`images.decode.decode`) redone on the device with the same numbers.

- `decode_batch`: `torchvision.io.decode_jpeg` over a batch, on a CUDA stream of its own (see there);
- `preprocess`: Pillow's reduced-scale (draft) decoding emulated by averaging blocks, the EXIF
  orientation, then `resize_and_crop`: the centre square resampled with OpenCV's INTER_AREA /
  bicubic / bilinear / nearest / Lanczos weights as matrices (`resize_weights`), rounded to uint8
  like OpenCV's output;
- `normalise`: uint8 images to the network's float32 channels-last input.

It sits in `features`, beside the GPU path (`features.gpu`) that uses it, and not in `images`: it
imports torch at the top (its tensor caches and orientation table are module-level), and importing
`images` loads no torch. The header parsing that routes files here is torch-free, in `images.jpeg`.

Every function here also runs on CPU tensors (`device="cpu"`), which is how it is tested without a GPU.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn import functional as F

if TYPE_CHECKING:
    from pipeline.images.preprocess import Preprocess

log = logging.getLogger(__name__)

RESIZE_FLOATS = 64 * 2**20  # float32 elements per resize step (256 MB)


# --------------------------------------------------------------------------- geometry, as images.data does it

def crop_box(height: int, width: int, pre: Preprocess) -> tuple[int, int, int]:
    """(top, left, side) of the square the CPU path keeps (`images.decode._resize_and_crop`)."""
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
    size (`Image.draft` with `images.decode._draft_size`): the largest that keeps both sides at or
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
    uint8: the centre square `images.decode._resize_and_crop` keeps, resampled with OpenCV's weights."""
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
        if isinstance(exc, torch.cuda.OutOfMemoryError):
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

