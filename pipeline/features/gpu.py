"""Stage 1 on a CUDA GPU: JPEG files decoded in batches on the GPU, resized and normalised there.

`extract.run_shard` hands a shard to `run_shard` here when the device is CUDA. For each shard:

- threads read each file once and check its bytes against the content id it was hashed to, with
  `images.decode.read_checked` as `images.decode.decode` does (a file that changed since is skipped,
  never stored under another's id);
- a JPEG header parser (`images.jpeg`: a few markers, no decoding) sends the files nvJPEG handles
  (8-bit baseline Huffman, three YCbCr components, ending with an EOI marker) to
  `torchvision.io.decode_jpeg(device="cuda")` in batches (`gpu_images.decode_batch`); everything else
  (PNG, WebP, progressive, CMYK and greyscale JPEGs, truncated files, XMP orientation...) is decoded
  by the CPU path (`decode`) in the same threads, meanwhile;
- Pillow's reduced-scale decoding of large JPEGs (emulated by averaging blocks), the EXIF
  orientation, the centre crop and the resampling run on the GPU with the CPU path's rules (see
  `gpu_images.preprocess`: OpenCV's INTER_AREA / bicubic / bilinear / nearest / Lanczos weights as
  matrices, rounded to uint8 like OpenCV's output), so a GPU-decoded image differs from the CPU one
  by the two JPEG decoders' last bits: the cache key stays the CPU path's, as the device is not in it
  either;
- the network runs channels-last under bf16 autocast (as asked by the precision), in batches sized
  from free GPU memory (never below `--batch-size`), halved and retried on an out-of-memory error;
- CPU-decoded images go up through pinned host buffers on a copy stream, and each batch's features
  come back into pinned buffers without waiting, so copies overlap the next batch's compute;
- `PIPELINE_GPU_COMPILE=1` (or a `torch.compile` mode such as `reduce-overhead` for CUDA graphs) runs
  the network through `torch.compile`, falling back to eager mode on any compile error;
  `PIPELINE_GPU_DECODE=0` sends every file to the CPU path's decoding and resizing (the network still
  runs on the GPU).

This module holds the memory sizing (`batch_from_memory`, `OomRetry`), the network per process
(`_Runner`) and the work of one shard (`run_shard`); the image operations on tensors are in
`features.gpu_images`, the header parsing in `images.jpeg`.

Every function here also runs on CPU tensors (`device="cpu"`), which is how it is tested without a GPU.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.features import extract as _extract
from pipeline.features.commit import ShardResult, ShardWriter, finish_shard
from pipeline.features.gpu_images import decode_batch, normalise, preprocess
from pipeline.images.decode import decode, read_checked
from pipeline.images.jpeg import JpegHeader, ends_whole, read_jpeg_header

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
    """The file's bytes once, checked against its id (`read_checked`), as a writable buffer for
    `torch.frombuffer`; or the reason `decode` would give."""
    data = read_checked(path, image_id)
    return data if isinstance(data, str) else bytearray(data)


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


def run_shard(job: _extract.ShardJob, on_progress: Callable[[int], None] | None = None,
              writer: ShardWriter | None = None) -> ShardResult:
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
    per_image = (time.perf_counter() - started) / max(len(work.done_ids), 1)
    return finish_shard(job, work.done_ids, work.failed, features, per_image, writer)
