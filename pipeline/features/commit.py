"""Committing a computed shard to the feature stores, here or on the local scheduler's writer thread.

A commit compresses the shard's rows, writes them, syncs the files and the folder, then writes the
record that makes them count (`FeatureStore.write_shard`): 9-15 ms a shard of 256 Lite0 rows on machine
B's local disk, a few of them waiting for `fsync` (far longer on a network file system). With Dask's
local scheduler, shards run one after another in one process, so each commit is handed to a single
writer thread (`ShardWriter`) while the next shard runs: the network (above all a GPU, which a commit
would leave idle) does not wait for the disk. On a CPU the network already keeps busy, the compression
still costs the same CPU time: there the gain is only the waits (benchmarks/RESULTS.md). A task on a
dask.distributed worker commits before it returns, so a shard the scheduler counts as done is on disk.
Either way a shard is trusted only once its record is written: a run stopped while a commit is
pending loses that shard, which the next run computes again.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.features.cache import FeatureStore

if TYPE_CHECKING:
    from pipeline.features.extract import ShardJob


@dataclass
class ShardResult:
    computed: int
    failed: dict[str, str]  # image id -> why it was skipped


class ShardWriter:
    """One thread that commits shards in the order they are handed over. `submit` first raises the
    error of any commit that already failed (a full disk stops the run at the next shard, not after the
    last); `close` waits for every commit and raises the first error."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-commit")
        self._pending: list[Future] = []

    def submit(self, job: ShardJob, image_ids: list[str], features: Mapping[str, np.ndarray],
               seconds_per_image: float) -> None:
        for future in [f for f in self._pending if f.done()]:
            self._pending.remove(future)
            future.result()
        self._pending.append(self._pool.submit(commit_shard, job, image_ids, features, seconds_per_image))

    def close(self) -> None:
        """Wait for every pending commit (even after an error, so that finished shards are kept)."""
        try:
            for future in self._pending:
                future.exception()
            for future in self._pending:
                future.result()
        finally:
            self._pending.clear()
            self._pool.shutdown()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def commit_shard(job: ShardJob, image_ids: list[str], features: Mapping[str, np.ndarray],
                 seconds_per_image: float) -> None:
    """Write each layer's rows of `image_ids` to every store of the job that still lacks them."""
    for layer, store, needed in zip(job.layers, job.stores, job.needed, strict=True):
        rows = [i for i, image_id in enumerate(image_ids) if image_id in needed]
        if rows:
            FeatureStore(Path(store)).write_shard(job.shard, [image_ids[i] for i in rows], features[layer][rows],
                                                  seconds_per_image * len(rows))


def finish_shard(job: ShardJob, image_ids: list[str], failed: dict[str, str], features: Mapping[str, np.ndarray],
                 seconds_per_image: float, writer: ShardWriter | None = None) -> ShardResult:
    """Commit a computed shard, here or (given `writer`) on the writer's thread."""
    if writer is None:
        commit_shard(job, image_ids, features, seconds_per_image)
    else:
        writer.submit(job, image_ids, features, seconds_per_image)
    return ShardResult(len(image_ids), failed)
