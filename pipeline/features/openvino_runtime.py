"""Stage 1 on a CPU through OpenVINO: the tapped torch network converted once per process, then compiled.

`ov.convert_model` traces a module that takes the decoded uint8 NHWC batch as it comes from the decoding
threads and returns the pooled output of each tap point, in the job's layer order: the conversion to
float, the NCHW view and the normalisation are in the graph, so OpenVINO fuses them into the first
convolution. The model is compiled for the CPU with the precision hint of the run's `precision` (bf16
where the CPU has AVX512-BF16 or AMX, else f32, as `features.device.resolve_precision` chooses) and as
many threads as torch would use (so a Dask worker started with OMP_NUM_THREADS=1 uses one core), and kept
for the life of the process: every later shard, and every task of a Dask worker, reuses it. Each thread
gets its own infer request, so a multi-threaded worker may run several batches at once.

A backbone that OpenVINO cannot convert or compile (an operation it lacks) is computed by torch:
`runtime_for` finds out in the process that plans the extraction, before any cache key is made, logs
the reason, and the features are stored under the torch key, the runtime actually used.
"""

from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.core.errors import first_line
from pipeline.models.taps import tapped
from pipeline.models.weights import load_backbone

if TYPE_CHECKING:
    from pipeline.features.extract import ShardJob
    from pipeline.images.preprocess import Preprocess

logger = logging.getLogger(__name__)

HINTS = {"bf16": "bf16", "fp32": "f32"}  # the project's precision -> OpenVINO's INFERENCE_PRECISION_HINT


@dataclass(frozen=True)
class NetworkId:
    """What identifies one compiled model within a process."""

    backbone: str
    weights: str | None
    weights_sha256: str
    layers: tuple[str, ...]
    precision: str


class CompiledNetwork:
    """A compiled model and one infer request per calling thread."""

    def __init__(self, compiled: Any, layers: tuple[str, ...], preprocess: Preprocess) -> None:
        self.compiled = compiled
        self.layers = layers
        self.preprocess = preprocess
        self._local = threading.local()

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """A uint8 NHWC batch -> pooled float32 features per layer."""
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        request.infer({0: np.ascontiguousarray(images)})
        return {layer: np.array(request.get_output_tensor(i).data, dtype=np.float32)
                for i, layer in enumerate(self.layers)}


_COMPILED: dict[NetworkId, CompiledNetwork] = {}
_FAILED: dict[NetworkId, str] = {}  # why OpenVINO cannot serve a network, found once per process
_LOCK = threading.Lock()
conversions = 0  # how many networks this process converted (a test checks once per worker)


class FromUint8(torch.nn.Module):
    """uint8 NHWC in, the tapped network's pooled outputs out (a tuple in layer order)."""

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
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": HINTS[key.precision],
                                                      "PERFORMANCE_HINT": "LATENCY",
                                                      "INFERENCE_NUM_THREADS": torch.get_num_threads()})
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
    return compiled_network(NetworkId(job.backbone, job.weights, job.weights_sha256, job.layers, job.precision))


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
