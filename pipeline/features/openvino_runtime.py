"""Stage 1 on a CPU through OpenVINO: the tapped torch network converted once per process, then compiled.

`ov.convert_model` traces a module that takes the decoded uint8 NHWC batch as it comes from the decoding
threads and returns the pooled output of each tap point, in the job's layer order: the conversion to
float, the NCHW view and the normalisation are in the graph, so OpenVINO fuses them into the first
convolution. The model is compiled for the CPU with the precision hint of the run's `precision` (bf16
where the CPU has AVX512-BF16 or AMX, else f32, as `features.device.resolve_precision` chooses; in bf16
the modules the backbone names in `openvino_f32` stay f32: `features.openvino_precise`) as one
single-threaded stream per thread torch would use (so a Dask worker started with OMP_NUM_THREADS=1 uses
one core), and kept for the life of the process: every later shard, and every task of a Dask worker,
reuses it. Batches run asynchronously as requests of at most `REQUEST_IMAGES` images, two queued per
stream (`CompiledNetwork.map`): decoding and the network overlap, and a stream held up by another
thread (a decoding thread, another process) holds up only itself, where the threads of one parallel
pass all wait for the slowest at every layer. Each calling thread gets its own infer requests, so a
multi-threaded worker may run several batches at once.

A backbone that OpenVINO cannot convert or compile (an operation it lacks) is computed by torch:
`runtime_for` finds out in the process that plans the extraction, before any cache key is made, logs
the reason, and the features are stored under the torch key, the runtime actually used.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.core.errors import first_line
from pipeline.features.openvino_precise import kept_in_f32, names_in
from pipeline.models.taps import tapped
from pipeline.models.weights import load_backbone

if TYPE_CHECKING:
    from pipeline.features.extract import ShardJob
    from pipeline.images.preprocess import Preprocess

logger = logging.getLogger(__name__)

HINTS = {"bf16": "bf16", "fp32": "f32"}  # the project's precision -> OpenVINO's INFERENCE_PRECISION_HINT
# Images per infer request, whatever the batch size asked: small requests keep every stream busy to the end
# of a shard (a stream left with the last big batch runs it while the others wait) and start the network
# sooner after decoding begins. benchmarks/openvino_speed.py measured the sizes (RESULTS.md).
REQUEST_IMAGES = 8


@dataclass(frozen=True)
class NetworkId:
    """What identifies one compiled model within a process."""

    backbone: str
    weights: str | None
    weights_sha256: str
    layers: tuple[str, ...]
    precision: str
    f32: tuple[str, ...] = ()  # modules kept in f32 when the rest runs in bf16 (`features.openvino_precise`)


class CompiledNetwork:
    """A compiled model run as `streams` independent single-threaded streams; each calling thread gets its own
    queue of infer requests (one per stream).

    Every output is the same to the bit whatever the streams, threads or batch size (a test checks), so
    `map` and `__call__` may split and overlap the work freely."""

    def __init__(self, compiled: Any, layers: tuple[str, ...], preprocess: Preprocess) -> None:
        self.compiled = compiled
        self.layers = layers
        self.preprocess = preprocess
        self.streams: int = compiled.get_property("NUM_STREAMS")
        self._local = threading.local()

    def _queue(self) -> Any:
        import openvino as ov

        queue = getattr(self._local, "queue", None)
        if queue is None:
            # two requests per stream: a stream that finishes one starts the next at once, without waiting
            # for this process's threads (the GIL) to hand it over
            queue = self._local.queue = ov.AsyncInferQueue(self.compiled, 2 * self.streams)
        return queue

    def map(self, batches: Iterable[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """uint8 NHWC batches -> pooled float32 features per layer, one dict per batch in order. Each batch
        runs as requests of at most `REQUEST_IMAGES` images, two queued per stream, asynchronously: the
        caller prepares the next batch (and OpenVINO releases the GIL) while the network runs, and blocks
        only when every request is queued or running."""
        queue = self._queue()
        done: dict[int, dict[str, np.ndarray]] = {}
        running: dict[int, np.ndarray] = {}  # inputs shared with OpenVINO, kept alive until their request ends
        parts: list[int] = []  # requests per batch, in order

        def finished(request: Any, index: int) -> None:
            done[index] = {layer: np.array(request.get_output_tensor(i).data, dtype=np.float32)
                           for i, layer in enumerate(self.layers)}
            running.pop(index, None)

        def answered() -> Iterator[dict[str, np.ndarray]]:
            nonlocal ready
            while parts and all(ready + k in done for k in range(parts[0])):
                pieces = [done.pop(ready + k) for k in range(parts[0])]
                ready += parts.pop(0)
                yield pieces[0] if len(pieces) == 1 else {
                    layer: np.concatenate([piece[layer] for piece in pieces]) for layer in self.layers}

        queue.set_callback(finished)
        submitted = ready = 0
        try:
            for batch in batches:
                starts = range(0, len(batch), REQUEST_IMAGES)
                parts.append(len(starts))
                for start in starts:
                    running[submitted] = np.ascontiguousarray(batch[start:start + REQUEST_IMAGES])
                    queue.start_async({0: running[submitted]}, submitted, share_inputs=True)
                    submitted += 1
                yield from answered()
        finally:  # no request of this call may outlive it (a later call's callback would see its indices)
            queue.wait_all()
        yield from answered()
        if ready != submitted:
            raise RuntimeError(f"OpenVINO answered {ready} of {submitted} requests")

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """A uint8 NHWC batch -> pooled float32 features per layer, split across the streams."""
        parts = list(self.map(np.array_split(images, min(self.streams, len(images)))))
        return {layer: np.concatenate([part[layer] for part in parts]) for layer in self.layers}


_COMPILED: dict[NetworkId, CompiledNetwork] = {}
_FAILED: dict[NetworkId, str] = {}  # why OpenVINO cannot serve a network, found once per process
_LOCK = threading.Lock()
conversions = 0  # how many networks this process converted (a test checks once per worker)


class FromUint8(torch.nn.Module):
    """uint8 NHWC in, the tapped network's pooled outputs out (a tuple in layer order)."""

    ROOT = "network.network."  # the backbone's own modules' path prefix in the converted model's names

    def __init__(self, network: torch.nn.Module, pre: Preprocess, layers: tuple[str, ...]) -> None:
        super().__init__()
        self.network = network
        self.layers = layers
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1) * 255)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.network((x.permute(0, 3, 1, 2).float() - self.mean) / self.std)
        return tuple(outputs[layer] for layer in self.layers)


def _convert(key: NetworkId) -> CompiledNetwork:
    import openvino as ov

    loaded = load_backbone(key.backbone, key.weights, key.weights_sha256)
    pre = loaded.spec.preprocess
    module = FromUint8(tapped(loaded, list(key.layers)), pre, key.layers).eval()
    shape = [-1, pre.crop, pre.crop, 3]
    root_level = logging.root.level
    try:
        with warnings.catch_warnings(), torch.inference_mode(False):
            warnings.simplefilter("ignore")  # tracer warnings about Python arithmetic on shapes: fixed by the crop
            model = ov.convert_model(module, input=[(shape, ov.Type.u8)],
                                     example_input=torch.zeros(1, pre.crop, pre.crop, 3, dtype=torch.uint8))
    finally:  # a failed conversion leaves the root logger at ERROR (OpenVINO 2026.4), hiding every warning
        logging.root.setLevel(root_level)
    # torch's thread count: every core in a plain process, one in a Dask nanny's worker (OMP_NUM_THREADS=1)
    threads = torch.get_num_threads()
    config = {"INFERENCE_PRECISION_HINT": HINTS[key.precision], "PERFORMANCE_HINT": "THROUGHPUT",
              "NUM_STREAMS": threads, "INFERENCE_NUM_THREADS": threads}
    if key.f32:
        with kept_in_f32(model, names_in(model, FromUint8.ROOT, key.f32)) as marked:
            compiled = ov.Core().compile_model(marked, "CPU", config)
    else:
        compiled = ov.Core().compile_model(model, "CPU", config)
    network = CompiledNetwork(compiled, key.layers, pre)
    network(np.zeros((1, pre.crop, pre.crop, 3), dtype=np.uint8))  # an operation that fails only when run
    return network


def _reason(exc: Exception) -> str:
    """The line of an OpenVINO error that names what failed ("No conversion rule found for operations:
    aten::cummax"), not the line of C++ source it starts with."""
    summary = [line.lstrip("- ") for line in str(exc).splitlines() if line.startswith("-- ")]
    return "; ".join(summary) or f"{type(exc).__name__}: {first_line(exc)}"


def compiled_network(key: NetworkId) -> CompiledNetwork:
    """The compiled model of `key`, converted on first use in this process; raises what conversion raised."""
    global conversions
    with _LOCK:
        if key not in _COMPILED:
            _COMPILED[key] = _convert(key)
            conversions += 1
        return _COMPILED[key]


def network_for(job: ShardJob) -> CompiledNetwork:
    return compiled_network(NetworkId(job.backbone, job.weights, job.weights_sha256, job.layers, job.precision,
                                      job.f32))


def runtime_for(key: NetworkId) -> str:
    """"openvino" when OpenVINO can convert, compile and run this network, else "torch" (the reason
    logged once per process)."""
    if key in _FAILED:
        return "torch"
    try:
        compiled_network(key)
    except Exception as exc:  # noqa: BLE001 - any failure of the converter or the plugin means "use torch"
        _FAILED[key] = _reason(exc)
        logger.warning(f"warning: OpenVINO cannot run {key.backbone} ({_FAILED[key]}); "
                       "its features are computed by torch (runtime torch in the cache key)")
        return "torch"
    return "openvino"
