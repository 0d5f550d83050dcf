"""Stage 1: images -> frozen backbone -> pooled features in the cache, one Dask task per shard.

Only images whose content id is missing from the cache are computed. Each shard task decodes in a
thread pool while the network runs batches under `inference_mode`, channels-last and (where the
hardware has it) bf16 autocast. The network is loaded once per process and kept, so on a
dask.distributed cluster each worker loads it once, not once per task. torch is imported only when a
shard is computed (or a CUDA driver is present to ask): a rerun over cached images starts in a second.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import platform
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from pipeline.core.errors import CacheError, ConfigError, first_line
from pipeline.core.hashing import bytes_sha256
from pipeline.core.names import DEFAULT_BACKBONE
from pipeline.core.paths import path_text
from pipeline.features.cache import CacheKey, FeatureStore
from pipeline.features.commit import ShardResult, ShardWriter, finish_shard
from pipeline.features.device import resolve_device, resolve_precision, resolve_runtime
from pipeline.features.settings import DEFAULTS
from pipeline.images.data import Dataset, scan
from pipeline.images.decode import decode
from pipeline.images.preprocess import Preprocess
from pipeline.images.statmemo import dataset_ids
from pipeline.models.registry import get_spec
from pipeline.models.weights import file_sha256, load_backbone, resolve_weights

if TYPE_CHECKING:
    import dask.array as da
    from dask.delayed import Delayed

    from pipeline.models.taps import TappedNetwork

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- shard tasks

@dataclass(frozen=True)
class ShardJob:
    """Everything one task needs; small and picklable, so it travels to cluster workers cheaply."""

    backbone: str
    weights: str | None
    weights_sha256: str
    layers: tuple[str, ...]
    stores: tuple[str, ...]  # absolute store folder per layer
    device: str
    precision: str
    batch_size: int
    shard: str
    paths: tuple[str, ...]  # absolute, so a worker in another folder finds them
    image_ids: tuple[str, ...]
    needed: tuple[frozenset[str], ...]  # per store, the ids of this shard that store still lacks
    runtime: str  # "torch", or "openvino" (features/openvino_runtime.py) on the CPU
    f32: tuple[str, ...] = ()  # with OpenVINO in bf16, the modules kept in f32 (`f32_modules`)


_NETWORKS: dict[tuple, tuple[TappedNetwork, Preprocess]] = {}
_NETWORKS_LOCK = threading.Lock()


# glibc's mallopt parameters (malloc.h) and the values that give a worker the speed of a plain process.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_WORKER_MMAP_THRESHOLD, _WORKER_TRIM_THRESHOLD = 32 * 2**20, 128 * 2**20


def undo_worker_malloc_trim() -> bool:
    """A dask nanny starts its workers with MALLOC_TRIM_THRESHOLD_=65536. Setting it turns off glibc's
    adaptive mmap threshold, so every activation tensor of a forward pass is a fresh mmap, page-faulted
    in and unmapped again: measured 32 instead of 53 images/s on one core. Raising both thresholds keeps
    those buffers in the heap (up to 128 MB of freed memory may stay with the worker). Returns whether it
    applied (only where the variable is set and libc is glibc)."""
    if not os.environ.get("MALLOC_TRIM_THRESHOLD_") or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _WORKER_MMAP_THRESHOLD)
                and libc.mallopt(_M_TRIM_THRESHOLD, _WORKER_TRIM_THRESHOLD))


def _network(job: ShardJob) -> tuple[TappedNetwork, Preprocess]:
    """The tapped network for this job, loaded once per process and reused by later tasks."""
    import torch

    from pipeline.models.taps import tapped

    key = (job.backbone, job.weights, job.weights_sha256, job.layers, job.device)
    with _NETWORKS_LOCK:
        if not _NETWORKS:
            undo_worker_malloc_trim()
        if key not in _NETWORKS:
            if job.device == "cuda" and not torch.cuda.is_available():
                raise ConfigError(f"this run asked for CUDA, but the worker on {platform.node()} has no GPU")
            loaded = load_backbone(job.backbone, job.weights, job.weights_sha256)
            if job.device == "cuda":  # "fp32" must mean fp32: no silent TF32 convolutions or matmuls
                torch.backends.cudnn.allow_tf32 = False
                torch.backends.cuda.matmul.allow_tf32 = False
            network = tapped(loaded, list(job.layers))
            network.to(job.device, memory_format=torch.channels_last).eval()
            _NETWORKS[key] = (network, loaded.spec.preprocess)
        return _NETWORKS[key]


def forward(network: TappedNetwork, pre: Preprocess, images: np.ndarray,
            device: str, precision: str) -> dict[str, np.ndarray]:
    """A uint8 NHWC batch -> pooled float32 features per layer."""
    import torch

    batch = torch.from_numpy(images)
    if device == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    # NHWC memory permuted to NCHW shape is exactly the channels-last layout the network wants.
    x = batch.permute(0, 3, 1, 2).float()
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1) * 255
    x = (x - mean) / std
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
        outputs = network(x)
    return {layer: out.float().cpu().numpy() for layer, out in outputs.items()}


def _decode_threads(job: ShardJob) -> int:
    """On a CPU torch eager keeps every core busy and decoding costs about a tenth of a forward pass,
    so one thread keeps ahead; more would only steal cycles. OpenVINO's forward pass is about three
    times shorter, and a GPU leaves the CPU free: there decoding needs a thread per core."""
    if job.device == "cpu" and job.runtime == "torch":
        return 1
    return max(2, min(8, os.cpu_count() or 2))


def run_shard(job: ShardJob, on_progress: Callable[[int], None] | None = None,
              writer: ShardWriter | None = None) -> ShardResult:
    """Decode (in threads) and embed one shard, then commit it to every layer's store that lacks it
    (given `writer`, on its thread: features/commit.py)."""
    if job.device == "cuda":  # batched GPU JPEG decoding and preprocessing: features/gpu.py
        from pipeline.features import gpu

        return gpu.run_shard(job, on_progress, writer)
    embed_batches: Callable[[Iterable[np.ndarray]], Iterable[dict[str, np.ndarray]]]
    batch_size = job.batch_size
    if job.runtime == "openvino":  # batches run asynchronously, overlapping the decoding of the next ones
        from pipeline.features.openvino_runtime import REQUEST_IMAGES, network_for

        compiled = network_for(job)
        embed_batches, pre = compiled.map, compiled.preprocess
        batch_size = min(batch_size, REQUEST_IMAGES)  # a request starts as soon as its images are decoded
    else:
        network, pre = _network(job)
        embed_batches = functools.partial(map, functools.partial(forward, network, pre, device=job.device,
                                                                 precision=job.precision))
    started = time.perf_counter()  # after loading: the records keep the steady-state cost per image
    good_ids: list[str] = []
    failed: dict[str, str] = {}
    chunks: dict[str, list[np.ndarray]] = {layer: [] for layer in job.layers}

    def batches(decoded: Iterable[np.ndarray | str]) -> Iterator[np.ndarray]:
        pending: list[np.ndarray] = []
        for image_id, image in zip(job.image_ids, decoded, strict=True):
            if isinstance(image, str):
                failed[image_id] = image
                if on_progress:
                    on_progress(1)
                continue
            pending.append(image)
            good_ids.append(image_id)
            if len(pending) == batch_size:
                yield np.stack(pending)
                pending.clear()
        if pending:
            yield np.stack(pending)

    with ThreadPoolExecutor(_decode_threads(job)) as pool:
        decoded = pool.map(lambda item: decode(Path(item[0]), pre, item[1]), zip(job.paths, job.image_ids, strict=True))
        for features in embed_batches(batches(decoded)):
            for layer, feats in features.items():
                chunks[layer].append(feats)
            if on_progress:
                on_progress(len(feats))
    per_image = (time.perf_counter() - started) / max(len(good_ids), 1)
    features = {layer: np.concatenate(parts) for layer, parts in chunks.items() if parts}
    return finish_shard(job, good_ids, failed, features, per_image, writer)


def _unscanned(job: ShardJob) -> Delayed:
    """The job as a Dask argument that Dask does not walk through (its tuples hold every path and id of
    the shard: walking them cost about 5 ms a shard). Named, as Dask would otherwise hash the whole job
    for its key; the random part keeps the key unique on a cluster that outlives one run."""
    import dask

    return dask.delayed(job, name=f"job-{job.backbone}-{job.shard}-{uuid.uuid4().hex}", traverse=False)


def _run_jobs(jobs: list[ShardJob], scheduler: str | None, bar: tqdm) -> list[ShardResult]:
    if not jobs:
        return []
    import dask

    if scheduler is None:
        # Dask's local in-process scheduler, one shard at a time (the network already uses every core),
        # each committed on the writer's thread while the next one runs
        with ShardWriter() as writer:
            tasks = [dask.delayed(run_shard, pure=False)(_unscanned(job), bar.update, writer) for job in jobs]
            return list(dask.compute(*tasks, scheduler="sync"))
    from distributed import Client, KilledWorker, as_completed

    try:
        client = Client(scheduler, timeout="10s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ConfigError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
    with client:
        futures = client.compute([dask.delayed(run_shard, pure=False)(_unscanned(job)) for job in jobs])
        results = []
        for future in as_completed(futures, loop=client.loop):
            try:
                result = future.result()
            except KilledWorker as exc:  # the cluster already retried it on other workers
                raise CacheError(f"Dask gave up on a shard after its workers died ({first_line(exc)}); "
                                 "finished shards are kept, rerun to compute the rest") from None
            bar.update(result.computed + len(result.failed))
            results.append(result)
        return results


# --------------------------------------------------------------------------- the public API

@dataclass
class FeatureSet:
    """Features of one (backbone, layer) for every usable image of a dataset, in dataset order."""

    features: da.Array
    labels: np.ndarray
    image_ids: list[str]
    paths: list[Path]
    class_names: list[str]
    backbone: str
    layer: str
    cache_key: str


@dataclass
class ExtractReport:
    images: int
    computed: int = 0
    reused: int = 0
    opened: int = 0  # files read to identify them: new or changed since the stat memo saw them
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    feature_sets: dict[tuple[str, str], FeatureSet] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        took = f"{self.seconds:.1f} s"  # a rate only where something was computed
        return (f"images: {self.images} | rows computed: {self.computed} | rows reused: {self.reused} | "
                f"files skipped: {len(self.skipped)} | files read: {self.opened} | "
                + (f"{self.images_per_second:.1f} images/s ({took})" if self.computed else took))


def layers_for(backbone: str, layers: Iterable[str] | None) -> list[str]:
    """`--layer NAME` applies to every backbone, `--layer BACKBONE:NAME` to one; none means the default."""
    spec = get_spec(backbone)
    chosen = []
    for entry in layers or []:
        owner, _, name = entry.rpartition(":")
        if owner in ("", backbone):
            chosen.append(spec.layer(name))
    return list(dict.fromkeys(chosen)) or [spec.default_layer]


def _check_layer_owners(backbones: list[str], layers: Iterable[str] | None) -> None:
    for entry in layers or []:
        owner = entry.rpartition(":")[0]
        if owner and owner not in backbones:
            raise ConfigError(f"--layer {entry}: {owner!r} is not one of the backbones being extracted "
                              f"({', '.join(backbones)})")


def f32_modules(backbone: str, precision: str, runtime: str, openvino_f32: bool = True) -> tuple[str, ...]:
    """The modules of `backbone` that OpenVINO keeps in f32: its spec's `openvino_f32` where OpenVINO runs
    it in bf16; none with `openvino_f32` False (the plain bf16 that made features before 2026-11-29)."""
    if not openvino_f32 or runtime != "openvino" or precision != "bf16":
        return ()
    return get_spec(backbone).openvino_f32


def cache_key(backbone: str, weights_sha256: str, layer: str, precision: str, runtime: str = "torch",
              f32: tuple[str, ...] = ()) -> CacheKey:
    spec = get_spec(backbone)
    tap = spec.layers[layer]
    module = f"{tap.module}#{tap.pool}" if tap.pool else tap.module  # token pooling; feature maps as before
    return CacheKey(backbone, weights_sha256, spec.preprocess.as_dict(), layer, precision, tap.dim, module,
                    runtime=runtime, f32=",".join(f32))


def _provenance(device: str, runtime: str = "torch") -> dict:
    """Written into meta.json beside the key: what made the numbers, for a person reading the cache."""
    import cv2
    import PIL

    version = importlib.metadata.version  # torch's own version, without importing it
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device, "torch": version("torch"),
            "torchvision": version("torchvision"), "pillow": PIL.__version__, "opencv": cv2.__version__,
            **({"openvino": version("openvino")} if runtime == "openvino" else {})}


def _plan(ids: list[str], paths: list[Path], shard_size: int) -> list[tuple[str, list[str], list[str]]]:
    """Group images into shards; a shard's id is a hash of its image ids, so a retry reuses it."""
    shards = []
    for start in range(0, len(ids), shard_size):
        chunk_ids = ids[start:start + shard_size]
        shard = bytes_sha256("".join(chunk_ids).encode())[:16]
        shards.append((shard, chunk_ids, [str(p.absolute()) for p in paths[start:start + shard_size]]))
    return shards


def extract(data: str | os.PathLike | Dataset, backbones: str | Iterable[str] | None = None,
            layers: Iterable[str] | None = None, cache_dir: str | os.PathLike = DEFAULTS.cache_dir,
            device: str = DEFAULTS.device, precision: str = DEFAULTS.precision, batch_size: int = DEFAULTS.batch_size,
            shard_size: int = DEFAULTS.shard_size, scheduler: str | None = DEFAULTS.scheduler,
            weights: str | os.PathLike | None = DEFAULTS.weights, progress: bool = True,
            runtime: str = DEFAULTS.runtime, rehash: bool = False, openvino_f32: bool = True) -> ExtractReport:
    """Embed every image of `data` with each backbone, computing only what the cache lacks (the
    settings' defaults are `pipeline.features.settings.ExtractSettings`). Files are identified through
    the cache's stat memo (`pipeline.images.statmemo`): one whose size, mtime, inode and device are as
    the memo last saw them is not read again (`rehash` reads every file). `openvino_f32` False remakes
    the plain OpenVINO bf16 features of heads fitted before 2026-11-29 (`f32_modules`; `pipeline predict`
    sets it from the head).

    Everything that can be wrong with the arguments (names, layers, weights files) is checked before
    the first image is touched."""
    backbones = [backbones] if isinstance(backbones, str) else list(backbones or [DEFAULT_BACKBONE])
    if weights is not None and len(backbones) != 1:
        raise ConfigError("--weights names one weights file, so give exactly one --backbone with it")
    if batch_size < 1 or shard_size < 1:
        raise ConfigError("batch size and shard size must be positive integers")
    _check_layer_owners(backbones, layers)
    layer_plan = {name: layers_for(name, layers) for name in backbones}
    weights_path = Path(weights).absolute() if weights is not None else None
    shas = {name: file_sha256(resolve_weights(get_spec(name), weights_path))
            for name in backbones}
    # OpenVINO runs on the CPU: a head whose features it made extracts there even where a GPU is present
    device = "cpu" if runtime == "openvino" and device == "auto" else resolve_device(device, local=scheduler is None)
    precision = resolve_precision(precision, device)
    runtime = resolve_runtime(runtime, device)
    cache_dir = Path(cache_dir).absolute()
    dataset = data if isinstance(data, Dataset) else scan(data)
    _warn_about_classes(dataset)
    started = time.perf_counter()
    report = ExtractReport(images=len(dataset.paths), skipped=list(dataset.skipped))

    if dataset.ids is not None:
        ids = dataset.ids
    else:
        ids, report.opened = dataset_ids(dataset, cache_dir, rehash)
    usable = [i for i, image_id in enumerate(ids) if image_id is not None]
    report.skipped += [(str(dataset.paths[i]), "unreadable file") for i, v in enumerate(ids) if v is None]
    failed: dict[str, str] = {}  # image id -> reason; every copy of a failed image is skipped
    all_stores = {}
    for backbone in backbones:
        f32 = f32_modules(backbone, precision, runtime, openvino_f32)
        used = _runtime_used(runtime, cache_dir, backbone, weights_path, shas[backbone], layer_plan[backbone],
                             precision, f32)
        f32 = f32 if used == "openvino" else ()
        stores = [FeatureStore.create(cache_dir, cache_key(backbone, shas[backbone], layer, precision, used, f32),
                                      _provenance(device, used)) for layer in layer_plan[backbone]]
        all_stores[backbone] = stores
        present = [store.have(ids[i] for i in usable) for store in stores]
        todo: dict[str, Path] = {}  # id -> first path with that content, in dataset order
        for i in usable:
            if any(ids[i] not in have for have in present):
                todo.setdefault(ids[i], dataset.paths[i])
        report.reused += len({ids[i] for i in usable} - todo.keys())
        jobs = []
        for shard, chunk_ids, paths in _plan(list(todo), list(todo.values()), shard_size):
            needed = tuple(frozenset(i for i in chunk_ids if i not in have) for have in present)
            jobs.append(ShardJob(backbone, str(weights_path) if weights_path else None, shas[backbone],
                                 tuple(layer_plan[backbone]), tuple(str(s.root) for s in stores), device,
                                 precision, batch_size, shard, tuple(paths), tuple(chunk_ids), needed, used, f32))
        with tqdm(total=len(todo), unit="img", desc=backbone, disable=None if progress else True) as bar:
            for result in _run_jobs(jobs, scheduler, bar):
                report.computed += result.computed
                failed.update(result.failed)
    rows = [i for i in usable if ids[i] not in failed]
    report.skipped += [(str(dataset.paths[i]), failed[ids[i]]) for i in usable if ids[i] in failed]
    for backbone, stores in all_stores.items():
        report.feature_sets.update(_feature_sets(dataset, ids, rows, stores, backbone, layer_plan[backbone]))
    report.seconds = time.perf_counter() - started
    return report


def _runtime_used(runtime: str, cache_dir: Path, backbone: str, weights: Path | None, sha: str, layers: list[str],
                  precision: str, f32: tuple[str, ...]) -> str:
    """The runtime that computes this backbone's features: OpenVINO falls back to torch (logged) for a
    network it cannot run. Trying costs a conversion, done here only when the OpenVINO keys are new to
    the cache (the local scheduler then reuses the converted network)."""
    if runtime != "openvino" or all((cache_dir / cache_key(backbone, sha, layer, precision, runtime, f32).dirname
                                     / "meta.json").is_file() for layer in layers):
        return runtime
    from pipeline.features.openvino_runtime import NetworkId, runtime_for  # imports torch and OpenVINO

    return runtime_for(NetworkId(backbone, str(weights) if weights else None, sha, tuple(layers), precision, f32))


def _warn_about_classes(dataset: Dataset) -> None:
    """Class folders that are named nowhere else: empty ones (a head never predicts them) and ones named
    like splits (`--data` given the folder that holds train/ and val/, not one of them)."""
    where = path_text(dataset.source) if dataset.source else "the data"
    empty = dataset.empty_classes
    if empty:
        logger.warning(f"warning: {where}: class folder{'s' if len(empty) > 1 else ''} with no images: "
                       f"{', '.join(empty)} (a head fitted on this data never predicts "
                       f"{'them' if len(empty) > 1 else 'it'})")
    splits = dataset.split_like_classes
    if splits:
        example = f" ({path_text(dataset.source / splits[0])})" if dataset.source else ""
        logger.warning(f"warning: {where}: class folders named like splits ({', '.join(splits)}): if they are "
                       f"splits, give one of them{example}, not the folder that holds them")


def _feature_sets(dataset: Dataset, ids: list[str | None], rows: list[int], stores: list[FeatureStore],
                  backbone: str, layers: list[str]) -> dict:
    """The same rows (everything that decoded, in dataset order) for every backbone and layer."""
    row_ids = [ids[i] for i in rows]
    sets = {}
    for layer, store in zip(layers, stores, strict=True):
        sets[(backbone, layer)] = FeatureSet(
            features=store.read(row_ids), labels=dataset.labels[rows], image_ids=row_ids,
            paths=[dataset.paths[i] for i in rows], class_names=dataset.class_names,
            backbone=backbone, layer=layer, cache_key=store.root.name)
    return sets
