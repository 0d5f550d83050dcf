"""`pipeline batch` at 100k and 1M files: first run, unchanged rerun, +1% new files, peak RSS, files
opened and forward passes on the rerun, the cache index's opening time, a 2-worker LocalCluster run, and
a 10k-photo first run against the code before the stat memo and index (`git archive` of that commit).

    nice -n 10 python benchmarks/scale.py --sizes 100000 1000000 [--work /work/scale-data] [--base REV]
    nice -n 10 python benchmarks/scale.py --sizes 20000 100000 --rerun-base REV --work /tmp/scale

The second form compares unchanged reruns (and the scan and stat memo alone) with revision REV,
interleaved, on one folder and cache.

The images are N distinct tiny JPEGs (32x32, one noise picture, each copy with its number in a JPEG
comment, so every file has its own content id), written by this script under --work (never committed),
a thousand per folder. Features come from `scale_tiny` (benchmarks/tiny_backbone.py: the network of
tests/tinynet.py, registered as a plugin that imports torch only to build it), so extraction is cheap
and the costs that grow with the collection show. Each `pipeline batch` runs as a subprocess under an
audit hook that counts the files it opens under the image folder; its forward passes are counted by
wrapping `pipeline.features.extract.forward`, and whether torch was imported at all is noted; its peak
RSS is its own VmHWM (/proc/self/status) at exit. wait4's ru_maxrss is not used: a child started by
vfork carries the parent's high-water mark across exec, so it reported this script's own ~550 MB.
Figures go to --out (JSON), one line per measurement to stdout.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENVIRON = dict(os.environ)  # as it was before LocalCluster sets OMP_NUM_THREADS=1 in this process

# Run in the child: `pipeline batch` under an audit hook that counts opened files below IMAGES.
_CHILD = """
import atexit, json, os, sys
images, report = os.environ["SCALE_IMAGES"], os.environ["SCALE_REPORT"]
opened = [0]
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        if os.fsdecode(args[0]).startswith(images):
            opened[0] += 1
sys.addaudithook(hook)
import pipeline.features.extract as extract
forwards, real_forward = [0], extract.forward
def counted(*args, **kwargs):
    forwards[0] += 1
    return real_forward(*args, **kwargs)
extract.forward = counted
def peak_mb():  # this process's own peak: wait4's ru_maxrss also counts the parent's pages it forked from
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
atexit.register(lambda: open(report, "w").write(json.dumps(
    {"opened": opened[0], "forwards": forwards[0], "torch": "torch" in sys.modules, "peak_mb": peak_mb()})))
from pipeline.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def make_images(folder: Path, start: int, stop: int) -> None:
    """Files `start`..`stop-1`: one 32x32 noise JPEG with the file's number in a comment segment."""
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    for i in range(start, stop):
        comment = f"scale {i}".encode()
        target = folder / f"{i // 1000:04d}" / f"{i:07d}.jpg"
        if i % 1000 == 0 or not target.parent.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:])


def replicate_photos(photos: list[Path], folder: Path, count: int) -> None:
    """`count` copies of real photos, each with its number in a JPEG comment (its own content id)."""
    for i in range(count):
        data = photos[i % len(photos)].read_bytes()
        comment = f"scale copy {i}".encode()
        target = folder / f"{i // 1000:03d}" / f"{i:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:])


def environment(code: Path, weights: Path) -> dict:
    """`code`'s pipeline, with the benchmark backbone of this checkout (`benchmarks` is a namespace package)."""
    return {**ENVIRON, "PYTHONPATH": os.pathsep.join([str(code), str(ROOT)]),
            "PIPELINE_PLUGINS": "benchmarks.tiny_backbone:register", "PIPELINE_TINY_WEIGHTS": str(weights)}


def command(args: list[str], images: Path, report: Path, env: dict, code: Path = ROOT) -> tuple[float, dict]:
    """One `pipeline ARGS` subprocess (of the code at `code`) under the audit hook: its wall time, and
    what the child reported (files opened under `images`, forward passes, torch imported, peak RSS)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, *args], cwd=code,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**env, "SCALE_IMAGES": str(images), "SCALE_REPORT": str(report)})
    code_ = proc.wait()
    wall = time.perf_counter() - started
    error = proc.stderr.read().decode()[-2000:]
    proc.stderr.close()
    if code_ != 0:
        raise SystemExit(f"pipeline {args[0]} failed ({code_}): {error}")
    return wall, json.loads(report.read_text())


def batch(config: Path, images: Path, env: dict, code: Path = ROOT, *extra: str) -> dict:
    """One `pipeline batch` subprocess (of the code at `code`): its log entry, wall time, peak RSS,
    files opened under `images`, and whether torch was imported."""
    wall, child = command(["batch", str(config), "--quiet", *extra], images, config.parent / "child.json", env, code)
    entry = json.loads(Path(json.loads(config.read_text())["log"]).read_text().splitlines()[-1])
    return {"seen": entry["seen"], "predicted": entry["predicted"], "computed": entry["computed"],
            "seconds": entry["seconds"], "wall_seconds": round(wall, 2), "peak_rss_mb": child["peak_mb"],
            "files_opened": child["opened"], "forward_passes": child["forwards"], "torch_imported": child["torch"]}


def extract_run(images: Path, cache: Path, env: dict, code: Path = ROOT) -> dict:
    """One `pipeline extract` subprocess over `images` (its thousand-file folders are its classes) with
    `scale_tiny` into `cache`: wall time, peak RSS, files opened under `images`."""
    wall, child = command(["extract", "--data", str(images), "--backbone", "scale_tiny", "--cache", str(cache),
                           "--quiet"], images, cache.parent / "extract-child.json", env, code)
    return {"wall_seconds": round(wall, 2), "peak_rss_mb": child["peak_mb"], "files_opened": child["opened"]}


def write_config(folder: Path, images: Path, head: Path, cache: Path | None = None) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = {"inputs": [str(images)], "heads": {"lr": str(head)}, "chunk_size": 2048,
              "features": {"cache_dir": str(cache or folder / "cache"), "batch_size": 256, "shard_size": 2048},
              "output_dir": str(folder / "predictions"), "log": str(folder / "runs.jsonl")}
    (folder / "batch.yaml").write_text(json.dumps(config))
    return folder / "batch.yaml"


def fit_head(work: Path, env: dict) -> Path:
    """A logistic regression on tiny_test features of two classes of generated pictures."""
    import numpy as np
    from PIL import Image

    head = work / "head" / "lr.skops"
    if head.is_file():
        return head
    for label in range(2):
        folder = work / "head" / "data" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(20):
            pixels = np.random.default_rng(100 * label + i).integers(0, 128, (32, 32, 3), dtype=np.uint8)
            pixels[..., label] += 127
            Image.fromarray(pixels).save(folder / f"{i}.jpg")
    subprocess.run([sys.executable, "-m", "pipeline.cli", "fit", "--data", str(work / "head" / "data"),
                    "--type", "logistic_regression", "--backbone", "scale_tiny",
                    "--cache", str(work / "head" / "cache"),
                    "--out", str(head), "--quiet"], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return head


def index_timing(cache: Path, env: dict) -> dict:
    """Seconds to open the cache's index as a run does (existing file, brought up to date), and to
    rebuild it from the completion records (file deleted), each in a fresh process."""
    code = ("import sys, time; from pathlib import Path; from pipeline.features.cache import FeatureStore\n"
            "store = FeatureStore(next(p for p in Path(sys.argv[1]).iterdir() if (p / 'shards').is_dir()))\n"
            "start = time.perf_counter(); index = store.lookup; index.refresh(); opened = time.perf_counter() - start\n"
            "rows = index.db.execute('SELECT COUNT(*) FROM rows').fetchone()[0]\n"
            "print(opened, rows)")
    run = [sys.executable, "-c", code, str(cache)]
    opened, rows = subprocess.run(run, env=env, cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    key = next(p for p in cache.iterdir() if (p / "shards").is_dir())
    for suffix in ("", "-wal", "-shm"):
        Path(f"{key / 'index.sqlite'}{suffix}").unlink(missing_ok=True)
    rebuilt, _rows = subprocess.run(run, env=env, cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    return {"rows": int(rows), "open_seconds": round(float(opened), 3), "rebuild_seconds": round(float(rebuilt), 2)}


def synthetic_index(rows: int, work: Path, env: dict) -> dict:
    """The index alone at `rows` rows: a cache key filled by `FeatureStore.write_shard` with random
    64-wide features under made-up ids (2,048 per shard, as the batch runs above write them), then
    opened and rebuilt as `index_timing` does. What the index costs does not depend on the features."""
    import numpy as np

    from pipeline.features.cache import CacheKey, FeatureStore

    cache = work / f"index_{rows}"
    shutil.rmtree(cache, ignore_errors=True)
    key = CacheKey("synthetic", "0" * 64, {}, "head", "fp32", 64)
    store = FeatureStore.create(cache, key)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for start in range(0, rows, 2048):
        ids = [f"{i:032x}" for i in range(start, min(start + 2048, rows))]
        store.write_shard(f"{start:016x}", ids, rng.standard_normal((len(ids), 64), dtype=np.float32))
    written = time.perf_counter() - started
    for suffix in ("", "-wal", "-shm"):  # built by index_timing's first open, as for a cache made before it
        Path(f"{store.root / 'index.sqlite'}{suffix}").unlink(missing_ok=True)
    first = index_timing(cache, env)
    return {"shards_written_seconds": round(written, 1), "first_open": first, "then": index_timing(cache, env)}


_IDENTIFY = """
import json, os, sys, time
from pathlib import Path
images, opened = sys.argv[1], [0]
sys.addaudithook(lambda event, args: opened.__setitem__(0, opened[0] + 1) if event == "open"
                 and isinstance(args[0], str) and args[0].startswith(images) else None)
from pipeline.app.batch_scan import identify
started = time.perf_counter()
found = identify([Path(images)], sys.argv[2])
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"files": len(found.paths), "seconds": round(time.perf_counter() - started, 2),
                  "hashed": found.opened, "files_opened": opened[0], "peak_rss_mb": round(peak / 1024)}))
"""


def _identify(images: Path, cache: Path, code: Path, weights: Path) -> dict:
    """The scan and the stat memo alone (`batch_scan.identify`) in a fresh process of `code`'s pipeline."""
    proc = subprocess.Popen([sys.executable, "-c", _IDENTIFY, str(images), str(cache)], cwd=code,
                            env=environment(code, weights), stdout=subprocess.PIPE)
    if proc.wait() != 0:
        raise SystemExit(f"identify failed ({proc.returncode})")
    result = json.loads(proc.stdout.read())
    proc.stdout.close()
    return result


def identify_only(size: int, work: Path, weights: Path) -> dict:
    """The part of a rerun that grows with the inputs, alone: scanning `size` files and identifying them
    through a fresh stat memo (every file hashed), then again (the memo's unchanged rerun), each in a
    fresh process with its peak RSS. Reading earlier predictions back and the heads are left out."""
    images = work / f"images_{size}"
    if not (images / f"{(size - 1) // 1000:04d}" / f"{size - 1:07d}.jpg").is_file():
        make_images(images, 0, size)
        time.sleep(2.5)  # the memo does not remember files modified in the last two seconds
    cache = work / f"identify_{size}"
    shutil.rmtree(cache, ignore_errors=True)
    result = {}
    for name in ("memo_filled", "unchanged"):
        result[name] = _identify(images, cache, ROOT, weights)
        print(f"{size} identify only, {name}: {json.dumps(result[name])}", flush=True)
    return result


def measure(size: int, work: Path, head: Path, env: dict, cluster: bool) -> dict:
    images = work / f"images_{size}"
    if not (images / f"{(size - 1) // 1000:04d}" / f"{size - 1:07d}.jpg").is_file():
        started = time.perf_counter()
        make_images(images, 0, size)
        print(f"{size}: images written in {time.perf_counter() - started:.0f} s", flush=True)
    extra_start = size
    shutil.rmtree(images / "extra", ignore_errors=True)
    config = write_config(work / f"run_{size}", images, head)
    result = {"first_run": batch(config, images, env)}
    print(f"{size} first run: {json.dumps(result['first_run'])}", flush=True)
    result["unchanged_rerun"] = batch(config, images, env)
    print(f"{size} unchanged rerun: {json.dumps(result['unchanged_rerun'])}", flush=True)
    make_images(images / "extra", extra_start, extra_start + size // 100)
    time.sleep(2)
    result["plus_1_percent"] = batch(config, images, env)
    print(f"{size} +1%: {json.dumps(result['plus_1_percent'])}", flush=True)
    result["rehash_rerun"] = batch(config, images, env, ROOT, "--rehash")
    print(f"{size} --rehash: {json.dumps(result['rehash_rerun'])}", flush=True)
    result["index"] = index_timing(work / f"run_{size}" / "cache", env)
    print(f"{size} index: {json.dumps(result['index'])}", flush=True)
    shutil.rmtree(images / "extra", ignore_errors=True)
    if cluster:
        from distributed import LocalCluster

        cluster_config = write_config(work / f"cluster_{size}", images, head)
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                          env={k: env[k] for k in ("PYTHONPATH", "PIPELINE_PLUGINS", "PIPELINE_TINY_WEIGHTS")}) as lc:
            result["cluster_2_workers_first_run"] = batch(cluster_config, images, env, ROOT,
                                                          "--scheduler", lc.scheduler_address)
            result["cluster_2_workers_rerun"] = batch(cluster_config, images, env, ROOT,
                                                      "--scheduler", lc.scheduler_address)
        print(f"{size} LocalCluster 2 workers: {json.dumps(result['cluster_2_workers_first_run'])}, "
              f"rerun {json.dumps(result['cluster_2_workers_rerun'])}", flush=True)
    return result


def checkout(work: Path, rev: str) -> Path:
    """The tree of git revision `rev` under `work` (`git archive`: a plain copy, no worktree to clean up)."""
    code = work / f"code-{rev}"
    if not code.is_dir():
        code.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
    return code


def against_base(work: Path, base: str, photos: Path, count: int, head: Path, weights: Path) -> dict:
    """A first run over `count` photo copies with this code and with `base` (`checkout`), twice each,
    in the order before, this, this, before (a load that drifts during the benchmark cancels out)."""
    base_code = checkout(work, base)
    images = work / f"photos_{count}"
    if not images.is_dir():
        replicate_photos(sorted(p for s in ("train", "test") for p in (photos / s).rglob("*.jpg")), images, count)
    result: dict = {"base": base, "images": count, "this": [], "before": []}
    for name in ("before", "this", "this", "before"):
        code = base_code if name == "before" else ROOT
        run = batch(write_config(work / f"photos_{name}", images, head), images, environment(code, weights), code)
        run["ms_per_image"] = round(1000 * run["seconds"] / run["predicted"], 3)
        result[name].append(run)
        print(f"{count} photos, first run, {name}: {json.dumps(run)}", flush=True)
    return result


def reruns_against(size: int, work: Path, base: str, rounds: int, head: Path, weights: Path,
                   extract: bool = False) -> dict:
    """Unchanged reruns of `pipeline batch` over `size` files with this code and with `base`
    (`checkout`), `rounds` times in the order before, this, this, before, on one output folder and cache
    (made by a first run with this code when missing); then the scan and the stat memo alone the same
    way; with `extract`, unchanged `pipeline extract` runs too (on a cache of their own)."""
    base_code = checkout(work, base)
    images = work / f"images_{size}"
    if not (images / f"{(size - 1) // 1000:04d}" / f"{size - 1:07d}.jpg").is_file():
        make_images(images, 0, size)
    shutil.rmtree(images / "extra", ignore_errors=True)
    folder = work / f"rerun_{size}"
    config = folder / "batch.yaml"
    if not (folder / "runs.jsonl").is_file():
        write_config(folder, images, head)
        time.sleep(2.5)  # the memo does not remember files modified in the last two seconds
        print(f"{size} first run: {json.dumps(batch(config, images, environment(ROOT, weights)))}", flush=True)
    result: dict = {"base": base, "batch": {"before": [], "this": []}, "identify": {"before": [], "this": []}}
    for _ in range(rounds):
        for name in ("before", "this", "this", "before"):
            code = base_code if name == "before" else ROOT
            result["batch"][name].append(batch(config, images, environment(code, weights), code))
            print(f"{size} unchanged rerun, {name}: {json.dumps(result['batch'][name][-1])}", flush=True)
    for _ in range(rounds):
        for name in ("before", "this", "this", "before"):
            code = base_code if name == "before" else ROOT
            result["identify"][name].append(_identify(images, folder / "cache", code, weights))
            print(f"{size} identify only, {name}: {json.dumps(result['identify'][name][-1])}", flush=True)
    if extract:
        cache = folder / "extract-cache"
        if not cache.is_dir():
            print(f"{size} extract, first: {json.dumps(extract_run(images, cache, environment(ROOT, weights)))}")
        result["extract"] = {"before": [], "this": []}
        for _ in range(rounds):
            for name in ("before", "this", "this", "before"):
                code = base_code if name == "before" else ROOT
                result["extract"][name].append(extract_run(images, cache, environment(code, weights), code))
                print(f"{size} unchanged extract, {name}: {json.dumps(result['extract'][name][-1])}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--cluster-size", type=int, default=100_000, help="the size that also runs on 2 workers")
    parser.add_argument("--work", default="/work/scale-data", help="where images, caches and outputs go")
    parser.add_argument("--base", help="git revision to compare a 10k-photo first run with (skipped if not given)")
    parser.add_argument("--photos", default=str(ROOT.parent / "shared/data/flowers12"))
    parser.add_argument("--photo-count", type=int, default=10_000)
    parser.add_argument("--reruns", type=int, default=0,
                        help="only this many unchanged reruns of each size, in the folders of an earlier run")
    parser.add_argument("--identify-only", type=int, nargs="*", default=[],
                        help="also time the scan and the stat memo alone at these sizes")
    parser.add_argument("--index-rows", type=int, nargs="*", default=[],
                        help="also time the index alone on a synthetic cache of these many rows")
    parser.add_argument("--rerun-base", metavar="REV",
                        help="instead: unchanged reruns of each size with this code and with git revision REV, "
                             "interleaved (made after a first run with this code, in --work/rerun_SIZE)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of --rerun-base (each: REV, this, this, REV)")
    parser.add_argument("--extract", action="store_true",
                        help="with --rerun-base: also unchanged `pipeline extract` runs over the same files")
    parser.add_argument("--out", default=str(ROOT / "runs/bench/scale.json"))
    args = parser.parse_args()
    work = Path(args.work).absolute()
    sys.path.insert(0, str(ROOT))
    from tests.tinynet import write_weights  # the weights file that scale_tiny loads

    weights = work / "tinynet"
    write_weights(weights)
    env = environment(ROOT, weights)
    head = fit_head(work, env)
    results: dict = {"cpu_count": os.cpu_count(), "sizes": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        if args.rerun_base:
            results["sizes"][str(size)] = reruns_against(size, work, args.rerun_base, args.rounds, head, weights,
                                                         args.extract)
        elif args.reruns:  # the folders of an earlier run of this script: unchanged reruns only
            config = work / f"run_{size}" / "batch.yaml"
            results["sizes"][str(size)] = {"unchanged_reruns": [
                batch(config, work / f"images_{size}", env) for _ in range(args.reruns)]}
            print(f"{size} unchanged reruns: {json.dumps(results['sizes'][str(size)])}", flush=True)
        else:
            results["sizes"][str(size)] = measure(size, work, head, env, size == args.cluster_size)
        out.write_text(json.dumps(results, indent=1))
    for size in args.identify_only:
        results.setdefault("identify_only", {})[str(size)] = identify_only(size, work, weights)
        out.write_text(json.dumps(results, indent=1))
    for rows in args.index_rows:
        results.setdefault("synthetic_index", {})[str(rows)] = synthetic_index(rows, work, env)
        print(f"index of {rows} rows: {json.dumps(results['synthetic_index'][str(rows)])}", flush=True)
        out.write_text(json.dumps(results, indent=1))
    if args.base:
        results["against_base"] = against_base(work, args.base, Path(args.photos), args.photo_count, head, weights)
        out.write_text(json.dumps(results, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
