"""The feature cache: reuse, content ids, skips, atomic shards, tamper detection, schedulers."""

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from pipeline.features.cache import FeatureStore
from pipeline.features.extract import ShardJob, extract, run_shard

from .conftest import TINY, TINY_DIMS, make_folder


def _features(report):
    (fs,) = report.feature_sets.values()
    return fs, fs.features.compute()


def test_rerun_reuses_every_row(tiny_folder, cache_dir):
    first = extract(tiny_folder, TINY, cache_dir=cache_dir, progress=False)
    assert (first.images, first.computed, first.reused) == (12, 12, 0)
    again = extract(tiny_folder, TINY, cache_dir=cache_dir, progress=False)
    assert (again.computed, again.reused) == (0, 12)
    fs1, x1 = _features(first)
    fs2, x2 = _features(again)
    assert x1.shape == (12, TINY_DIMS["head"]) and np.array_equal(x1, x2)
    assert list(fs2.labels) == [0] * 4 + [1] * 4 + [2] * 4 and fs2.class_names == ["class0", "class1", "class2"]


def test_renamed_moved_and_duplicated_files_are_not_recomputed(tiny_folder, cache_dir):
    _, before = _features(extract(tiny_folder, TINY, cache_dir=cache_dir, progress=False))
    (tiny_folder / "class0" / "img0.jpg").rename(tiny_folder / "class0" / "renamed.jpg")
    (tiny_folder / "class1" / "img1.jpg").rename(tiny_folder / "class2" / "moved.jpg")
    (tiny_folder / "class2" / "copy.jpg").write_bytes((tiny_folder / "class2" / "img3.jpg").read_bytes())
    report = extract(tiny_folder, TINY, cache_dir=cache_dir, progress=False)
    assert (report.images, report.computed, report.reused) == (13, 0, 12)
    fs, after = _features(report)
    assert np.array_equal(after[fs.paths.index(tiny_folder / "class2" / "copy.jpg")],
                          after[fs.paths.index(tiny_folder / "class2" / "img3.jpg")])
    assert set(map(tuple, after.tolist())) == set(map(tuple, before.tolist()))  # same rows, one twice


def test_corrupt_file_is_skipped_and_reported_while_others_are_cached(tiny_folder, cache_dir):
    (tiny_folder / "class1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tiny_folder / "class2" / "empty.png").write_bytes(b"")
    report = extract(tiny_folder, TINY, cache_dir=cache_dir, progress=False)
    reasons = dict(report.skipped)
    assert set(reasons) == {str(tiny_folder / "class1" / "broken.jpg"), str(tiny_folder / "class2" / "empty.png")}
    assert reasons[str(tiny_folder / "class2" / "empty.png")] == "empty file"
    assert report.computed == 12
    fs, x = _features(report)
    assert x.shape[0] == 12 and np.isfinite(x).all() and len(fs.paths) == 12
    assert extract(tiny_folder, TINY, cache_dir=cache_dir, progress=False).computed == 0


def test_shards_are_plain_zarr_readable_by_dask(tiny_folder, cache_dir):
    fs, x = _features(extract(tiny_folder, TINY, cache_dir=cache_dir, progress=False, shard_size=5))
    store = FeatureStore(cache_dir / fs.cache_key)
    records = store.records()
    assert len(records) == 3 and sum(r["rows"] for r in records.values()) == 12
    rows = {}
    for record in records.values():
        array = da.from_zarr(str(store.arrays / record["array"])).compute()
        rows.update(zip(record["image_ids"], array, strict=True))
    assert np.array_equal(np.stack([rows[i] for i in fs.image_ids]), x)


def test_a_shard_task_that_runs_twice_is_harmless(tiny_folder, cache_dir):
    fs, x = _features(extract(tiny_folder, TINY, cache_dir=cache_dir, progress=False, shard_size=100))
    store = FeatureStore(cache_dir / fs.cache_key)
    (shard, record), = store.records().items()
    meta = json.loads((store.root / "meta.json").read_text())
    job = ShardJob(backbone=TINY, weights=None, weights_sha256=meta["weights_sha256"],
                   layers=("head",), stores=(str(store.root),), device="cpu", precision=meta["precision"],
                   batch_size=32, shard=shard, paths=tuple(str(p) for p in fs.paths),
                   image_ids=tuple(fs.image_ids), needed=(frozenset(fs.image_ids),), runtime=meta["runtime"])
    run_shard(job)  # the retry of a task that had in fact finished
    assert len(store.orphans()) == 1 and store.verify() == []
    assert np.array_equal(store.read(fs.image_ids).compute(), x)


def test_flipped_byte_is_caught_by_verify_and_gc_lets_the_next_run_recompute(tiny_folder, cache_dir):
    fs, x = _features(extract(tiny_folder, TINY, cache_dir=cache_dir, progress=False, shard_size=6))
    store = FeatureStore(cache_dir / fs.cache_key)
    assert store.verify() == []
    record = next(iter(store.records().values()))
    chunk = next(p for p in (store.arrays / record["array"]).rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    problems = store.verify()
    assert len(problems) == 1
    assert "does not match its completion record" in problems[0] or "unreadable" in problems[0]
    assert any("damaged shard" in line for line in store.gc())
    report = extract(tiny_folder, TINY, cache_dir=cache_dir, progress=False, shard_size=6)
    assert (report.computed, report.reused) == (6, 6)
    assert np.array_equal(_features(report)[1], x)


def test_truncated_shard_is_caught(tiny_folder, cache_dir):
    fs, _ = _features(extract(tiny_folder, TINY, cache_dir=cache_dir, progress=False))
    store = FeatureStore(cache_dir / fs.cache_key)
    record = next(iter(store.records().values()))
    chunk = next(p for p in (store.arrays / record["array"]).rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:100])
    assert len(store.verify()) == 1


def test_key_changes_with_precision_and_layer(tiny_folder, cache_dir):
    extract(tiny_folder, TINY, cache_dir=cache_dir, progress=False, precision="fp32")
    report = extract(tiny_folder, TINY, cache_dir=cache_dir, progress=False, precision="bf16",
                     layers=["head", "stage1"])
    assert report.computed == 12 and len(report.feature_sets) == 2
    keys = sorted(p.parent.name for p in cache_dir.glob("*/meta.json"))
    assert len(keys) == 3 and any("-fp32-" in k for k in keys) and any("stage1-bf16" in k for k in keys)


def _run_cli(*args):
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_run_killed_midway_resumes_identical_to_an_uninterrupted_run(tmp_path):
    data = make_folder(tmp_path / "images", classes=4, per_class=30)
    # 60 shards of 2: the tiny backbone is fast, so many small shards leave the kill time to land mid-run
    options = ["--data", str(data), "--backbone", TINY, "--shard-size", "2", "--batch-size", "2",
               "--precision", "fp32", "--quiet"]
    killed_cache = tmp_path / "killed"
    proc = _run_cli("extract", "--cache", str(killed_cache), *options)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed_cache.glob("*/shards/*.json"))) < 3:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(killed_cache.glob("*/shards/*.json")))
    assert 0 < done < 60, f"the kill did not land mid-run ({done} of 60 shards)"
    resumed = _run_cli("extract", "--cache", str(killed_cache), *options)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"rows computed: {120 - 2 * done}" in out and f"rows reused: {2 * done}" in out
    clean = extract(data, TINY, cache_dir=tmp_path / "clean", shard_size=2, batch_size=2, precision="fp32",
                    progress=False)
    resumed_report = extract(data, TINY, cache_dir=killed_cache, shard_size=2, batch_size=2, precision="fp32",
                             progress=False)
    assert resumed_report.computed == 0
    assert np.array_equal(_features(resumed_report)[1], _features(clean)[1])
    (store,) = FeatureStore.all_in(killed_cache)
    assert store.verify() == []


@pytest.mark.slow
def test_local_scheduler_and_two_process_cluster_give_identical_features(tmp_path):
    from distributed import LocalCluster

    data = make_folder(tmp_path / "images", classes=2, per_class=6)
    local = extract(data, TINY, cache_dir=tmp_path / "local", shard_size=3, progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = extract(data, TINY, cache_dir=tmp_path / "cluster", shard_size=3, progress=False,
                         scheduler=cluster.scheduler_address)
    assert remote.computed == 12
    assert np.array_equal(_features(local)[1], _features(remote)[1])


def test_unreachable_scheduler_is_a_clear_error(tiny_folder, cache_dir):
    from pipeline.core.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot reach the Dask scheduler"):
        extract(tiny_folder, TINY, cache_dir=cache_dir, progress=False, scheduler="tcp://127.0.0.1:1")
    assert not list(Path(cache_dir).glob("*/shards/*.json"))


def test_every_copy_of_an_undecodable_file_is_skipped(tiny_folder, cache_dir):
    for name in ("a.jpg", "b.jpg"):
        (tiny_folder / "class0" / name).write_bytes(b"")
    report = extract(tiny_folder, TINY, cache_dir=cache_dir, progress=False)
    assert sorted(reason for _path, reason in report.skipped) == ["empty file", "empty file"]
    assert _features(report)[1].shape == (12, TINY_DIMS["head"])


def test_a_tampered_record_cannot_make_gc_delete_other_shards(tiny_folder, cache_dir):
    fs, x = _features(extract(tiny_folder, TINY, cache_dir=cache_dir, progress=False, shard_size=6))
    store = FeatureStore(cache_dir / fs.cache_key)
    path = next(store.records_dir.glob("*.json"))
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "array": ""}))
    assert len(store.verify()) == 1 and len(store.records()) == 1
    store.gc()
    assert (store.arrays / "zarr.json").is_file() and len(store.records()) == 1
    report = extract(tiny_folder, TINY, cache_dir=cache_dir, progress=False, shard_size=6)
    assert report.computed == 6 and np.array_equal(_features(report)[1], x)


def test_adding_a_layer_computes_it_without_rewriting_the_complete_one(tiny_folder, cache_dir):
    first = extract(tiny_folder, TINY, cache_dir=cache_dir, progress=False)
    head = FeatureStore(cache_dir / _features(first)[0].cache_key)
    before = head.records()
    report = extract(tiny_folder, TINY, cache_dir=cache_dir, progress=False, layers=["head", "stage1"])
    assert report.computed == 12 and head.records() == before
    assert report.feature_sets[(TINY, "stage1")].features.shape == (12, TINY_DIMS["stage1"])


def test_workers_started_with_dask_malloc_trim_get_glibc_thresholds_back():
    """The nanny's MALLOC_TRIM_THRESHOLD_ halves the forward pass's speed; a worker undoes it, a plain
    process is left alone."""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt thresholds are glibc's")
    code = "from pipeline.features.extract import undo_worker_malloc_trim; print(undo_worker_malloc_trim())"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    worker = subprocess.run([sys.executable, "-c", code], env={**env, "MALLOC_TRIM_THRESHOLD_": "65536"},
                            capture_output=True, text=True, check=True)
    assert (plain.stdout.strip(), worker.stdout.strip()) == ("False", "True")


def test_a_failed_background_commit_stops_the_run_and_keeps_every_other_shard(tiny_folder, cache_dir, monkeypatch):
    """With the local scheduler a shard is committed on the writer thread while the next one runs: a commit
    that fails (here the second) ends the run with its error, and every shard committed stays trusted."""
    from pipeline.core.errors import OutputError
    from pipeline.features import commit

    calls = []

    class SecondCommitFails(FeatureStore):
        def write_shard(self, shard, *args, **kwargs):
            calls.append(shard)
            if len(calls) == 2:
                raise OutputError(f"cannot write the feature cache {self.root}: no space left")
            super().write_shard(shard, *args, **kwargs)

    monkeypatch.setattr(commit, "FeatureStore", SecondCommitFails)
    with pytest.raises(OutputError, match="no space left"):
        extract(tiny_folder, TINY, cache_dir=cache_dir, shard_size=2, progress=False)
    (store,) = FeatureStore.all_in(cache_dir)
    assert calls[1] not in store.records() and calls[0] in store.records()
    kept = len(store.records())
    assert store.verify() == []
    monkeypatch.undo()
    report = extract(tiny_folder, TINY, cache_dir=cache_dir, shard_size=2, progress=False)
    assert (report.computed, report.reused) == (12 - 2 * kept, 2 * kept)
