"""Scaling of `pipeline batch`: cost per image and peak memory at 1k and 10k images, an unchanged rerun,
an incremental run adding 10%, and 1 vs 2 worker processes on a dask.distributed LocalCluster.

    flock /tmp/bench.lock python benchmarks/batch_scale.py [--photos ../shared/data/flowers12] [--sizes 1000 10000]

Images are flowers12's 960 photos replicated: each copy gets a JPEG comment (COM segment) carrying its
number, so every file has its own SHA-256 (a new image to the pipeline) while decoding costs exactly what
the photo costs. Every `pipeline batch` runs as a subprocess on a fresh cache and output folder; its peak
RSS comes from wait4(). Figures go to runs/bench/batch_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# distributed's LocalCluster writes OMP_NUM_THREADS=1 (for its workers) into this process's environment and
# leaves it there: the plain runs get the environment as it was, or they would run torch on one core.
ENVIRON = dict(os.environ)


def replicate(photos: list[Path], folder: Path, start: int, stop: int) -> None:
    """Copies `start`..`stop-1`, a thousand per subfolder, each with its number in a JPEG comment."""
    for i in range(start, stop):
        data = photos[i % len(photos)].read_bytes()
        comment = f"batch_scale copy {i}".encode()
        segment = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
        target = folder / f"{i // 1000:03d}" / f"{i:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data[:2] + segment + data[2:])  # right after the SOI marker


def batch(config: Path, *extra: str) -> dict:
    """One `pipeline batch` subprocess: its log entry, wall seconds and peak RSS."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "batch", str(config), "--quiet", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENVIRON)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"pipeline batch failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    proc.stderr.close()
    log = Path(json.loads(config.read_text())["log"])
    entry = json.loads(log.read_text().splitlines()[-1])
    return {"images": entry["predicted"], "computed": entry["computed"], "seconds": entry["seconds"],
            "wall_seconds": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "images_per_s": round(entry["predicted"] / entry["seconds"], 1) if entry["predicted"] else None}


def write_config(work: Path, name: str, images: Path, head: Path) -> Path:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = {"inputs": [str(images)], "heads": {"lr": str(head)},
              "features": {"cache_dir": str(out / "cache"), "batch_size": 32, "shard_size": 256},
              "output_dir": str(out / "predictions"), "log": str(out / "runs.jsonl")}
    (out / "batch.yaml").write_text(json.dumps(config))
    return out / "batch.yaml"


def fit_head(photos: Path, work: Path) -> Path:
    head = work / "head" / "lr.skops"
    if not head.is_file():
        subprocess.run([sys.executable, "-m", "pipeline.cli", "fit", "--data", str(photos / "train"),
                        "--type", "logistic_regression", "--cache", str(work / "head" / "cache"),
                        "--out", str(head), "--quiet"], check=True)
    return head


def on_cluster(config: Path, workers: int) -> dict:
    """The same run with its shard tasks on a LocalCluster of `workers` single-threaded processes
    (the Dask nanny starts each with OMP_NUM_THREADS=MKL_NUM_THREADS=1, so torch uses one core each)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        return batch(config, "--scheduler", cluster.scheduler_address)


def measure_size(size: int, photo_list: list[Path], head: Path, work: Path) -> dict:
    images = work / f"images_{size}"
    shutil.rmtree(images, ignore_errors=True)
    replicate(photo_list, images, 0, size)
    config = write_config(work, f"run_{size}", images, head)
    result = {"full": batch(config)}
    result["unchanged_rerun"] = batch(config)
    replicate(photo_list, images, size, size + size // 10)
    result["plus_10_percent"] = batch(config)
    result["incremental_cost_share"] = round(result["plus_10_percent"]["seconds"] / result["full"]["seconds"], 3)
    print(f"{size} images: {json.dumps(result)}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", default=str(ROOT.parent / "shared/data/flowers12"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--cluster-size", type=int, default=1000, help="images for the LocalCluster runs")
    parser.add_argument("--work", default=str(ROOT / "runs/bench/batch_scale"))
    parser.add_argument("--out", default=str(ROOT / "runs/bench/batch_scale.json"))
    args = parser.parse_args()
    photos, work = Path(args.photos), Path(args.work).absolute()
    photo_list = sorted(p for split in ("train", "test") for p in (photos / split).rglob("*.jpg"))
    if not photo_list:
        raise SystemExit(f"no photos under {photos}")
    work.mkdir(parents=True, exist_ok=True)
    head = fit_head(photos, work)
    results: dict = {"photos": len(photo_list), "cpu_count": os.cpu_count(), "sizes": {}}

    images = work / "images_cluster"
    shutil.rmtree(images, ignore_errors=True)
    replicate(photo_list, images, 0, args.cluster_size)
    results["cluster"] = {"images": args.cluster_size}
    for workers in (1, 2):
        results["cluster"][f"{workers}_workers"] = on_cluster(
            write_config(work, f"cluster_{workers}", images, head), workers)
        print(f"LocalCluster, {workers} worker(s): {json.dumps(results['cluster'][f'{workers}_workers'])}", flush=True)
    for size in args.sizes:
        results["sizes"][str(size)] = measure_size(size, photo_list, head, work)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    for folder in work.glob("images_*"):  # gigabytes of copies; the results are in the JSON
        shutil.rmtree(folder)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
