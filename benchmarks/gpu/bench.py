"""Stage 1 on a GPU: end-to-end and model-alone speed, a tutorial-style loop, and CPU parity, in one run.

    python benchmarks/gpu/bench.py --out OUT/gpu_results.json [--flowers DIR] [--work DIR] [--dry-run]

Run by benchmarks/gpu/check.sh on the GPU machine. Steps, each recorded (seconds, ok, error) in the
results, which are rewritten after every step so that a run cut short still reports what it measured:

1. dataset: flowers12's 960 photos re-encoded at several sizes (256 to 800 px on the longer side,
   4:3 and 3:4), qualities (75, 85, 92 with 4:4:4 chroma) into 20,000 distinct JPEG files on local
   disk; one in 20 carries an EXIF rotation (turned upright on the GPU) and one in 50 is progressive
   (decoded by the CPU fallback), as in a real photo collection;
2. tutorial: torchvision ImageFolder + PIL transforms + DataLoader (fp32, eager), on the same GPU;
3. model alone: Lite0 (its weights) and ResNet-50 (random weights: same speed) at bf16, channels-last,
   on decoded images already on the GPU;
4. decode alone: nvJPEG batches over files already in memory (a diagnostic);
5. end to end: `extract` from the JPEG files into a fresh cache (hashing, decoding, resizing, the
   network, zarr writes), then `FeatureStore.verify()`; two runs, the better one counts;
6. parity: features of real photos (flowers12's test split and re-encoded ones) through the GPU path
   in fp32, with CPU decoding forced, and in bf16, against the CPU path's fp32 features (cosine, min
   over images); decoded pixels against the CPU decoder's;
7. compile: Lite0 through torch.compile, if time is left (its speed, and its features against eager).

`--dry-run`: the same steps on the CPU with tiny sizes (the GPU path's code runs with device=cpu), so
the script is known to work before a GPU is at hand. No figure from a dry run means anything.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import shutil
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.features import extract as extract_module  # noqa: E402
from pipeline.features import gpu, gpu_images  # noqa: E402
from pipeline.features.cache import FeatureStore  # noqa: E402
from pipeline.features.extract import extract  # noqa: E402
from pipeline.images import jpeg  # noqa: E402
from pipeline.images.data import scan  # noqa: E402
from pipeline.images.decode import decode  # noqa: E402
from pipeline.models.registry import get_spec  # noqa: E402
from pipeline.models.taps import TappedNetwork, tapped  # noqa: E402
from pipeline.models.weights import load_backbone  # noqa: E402

log = logging.getLogger("bench")
BACKBONE = "efficientnet_lite0"

# Targets of issue 15, for one run on an H100.
TARGETS = {"end_to_end_images_per_s": 5000, "end_to_end_vs_model_alone": 0.7, "end_to_end_vs_tutorial": 5.0,
           "fp32_cosine_min": 0.999}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = args.dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.started = time.perf_counter()
        self.out = Path(args.out)
        self.work = Path(args.work)
        self.results: dict = {"dry_run": self.dry, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                              "targets": TARGETS, "steps": {}}
        self.sizes = (256, 320) if self.dry else (256, 320, 400, 480, 560, 640, 800)
        self.qualities = (75, 85, 92)
        self.count = args.images or (96 if self.dry else 20_000)

    # -- bookkeeping
    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        os.replace(tmp, self.out)

    def step(self, name: str, fn, *, needs_s: float = 0.0) -> None:
        record: dict = {}
        self.results["steps"][name] = record
        if self.left() < needs_s:
            record.update(ok=False, skipped=f"{self.left():.0f} s of the budget left, {needs_s:.0f} s needed")
            log.warning("step %s skipped: %s", name, record["skipped"])
            self.save()
            return
        log.info("step %s (%.0f s of the budget left)", name, self.left())
        started = time.perf_counter()
        try:
            fn()
            record["ok"] = True
        except Exception as exc:  # noqa: BLE001 - one failed step must not lose the others' figures
            record.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
            log.error("step %s failed:\n%s", name, traceback.format_exc())
        finally:
            record["seconds"] = round(time.perf_counter() - started, 2)
            if self.device == "cuda":
                torch.cuda.empty_cache()
            self.save()

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    # -- 0. environment
    def environment(self) -> None:
        import cv2
        import dask
        import PIL
        import torchvision
        import zarr

        env = {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
               "torch": torch.__version__, "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
               "cudnn": torch.backends.cudnn.version(), "pillow": PIL.__version__, "opencv": cv2.__version__,
               "numpy": np.__version__, "dask": dask.__version__, "zarr": zarr.__version__,
               "device": self.device, "cuda_available": torch.cuda.is_available()}
        if self.device == "cuda":
            props = torch.cuda.get_device_properties(0)
            env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                       bf16=torch.cuda.is_bf16_supported())
        self.results["environment"] = env
        log.info("environment: %s", env)

    # -- 1. dataset
    def dataset(self) -> None:
        flowers = Path(self.args.flowers)
        sources = sorted(flowers.glob("*/*/*.jpg"))
        if not sources:
            raise FileNotFoundError(f"no photos under {flowers}")
        if self.dry:
            sources = sources[::30]  # a few photos, so that the few files still span every variant
        variants = [(size, quality) for size in self.sizes for quality in self.qualities]
        jobs = []
        for n in range(self.count):
            source = sources[n % len(sources)]
            size, quality = variants[(n // len(sources)) % len(variants)]
            jobs.append((str(source), str(self.work / "jpegs" / source.parent.name), n, size, quality))
        if len(jobs) > len(sources) * len(variants):
            raise ValueError(f"{len(jobs)} files asked for, but only {len(sources) * len(variants)} distinct variants")
        shutil.rmtree(self.work / "jpegs", ignore_errors=True)
        with ProcessPoolExecutor(min(16, os.cpu_count() or 2)) as pool:
            written = list(pool.map(_write_variant, jobs, chunksize=64))
        self.data = self.work / "jpegs"
        self.paths = scan(self.data).paths
        self.results["dataset"] = {"files": len(self.paths), "bytes": sum(written),
                                   "mean_kib": round(sum(written) / len(written) / 1024, 1),
                                   "sizes_px": list(self.sizes), "qualities": list(self.qualities),
                                   "exif_rotated": sum(1 for j in jobs if j[2] % 20 == 7),
                                   "progressive": sum(1 for j in jobs if j[2] % 50 == 13), "sources": len(sources)}

    # -- 2. tutorial loop
    def tutorial(self) -> None:
        from torch.utils.data import DataLoader, Subset
        from torchvision import datasets, transforms

        loaded = load_backbone(BACKBONE)
        pre = loaded.spec.preprocess
        transform = transforms.Compose([
            transforms.Resize(pre.resize, interpolation=transforms.InterpolationMode(pre.interpolation)),
            transforms.CenterCrop(pre.crop), transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std)])
        folder = datasets.ImageFolder(str(self.data), transform)
        count = min(len(folder), 48 if self.dry else 4000)
        subset = Subset(folder, list(range(0, len(folder), max(1, len(folder) // count)))[:count])
        workers = 2 if self.dry else min(8, os.cpu_count() or 2)
        batch = 16 if self.dry else 256
        loader = DataLoader(subset, batch_size=batch, num_workers=workers, pin_memory=self.device == "cuda")
        network = tapped(loaded, [loaded.spec.default_layer]).to(self.device).eval()
        started, seen = time.perf_counter(), 0
        with torch.no_grad():
            for images, _labels in loader:
                network(images.to(self.device))
                seen += len(images)
        self.sync()
        seconds = time.perf_counter() - started
        self.results["tutorial"] = {"images": seen, "images_per_s": round(seen / seconds, 1), "precision": "fp32",
                                    "num_workers": workers, "batch_size": batch, "pin_memory": self.device == "cuda",
                                    "what": "ImageFolder + PIL Resize/CenterCrop/ToTensor/Normalize + DataLoader, "
                                            "eager fp32 under no_grad, worker start-up included"}

    # -- 3. model alone
    def _images_on_device(self, pre, count: int) -> torch.Tensor:
        arrays = [decode(p, pre) for p in self.paths[:: max(1, len(self.paths) // count)][:count]]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(self.device)

    def _time_network(self, network, pre, images: torch.Tensor, precision: str, batch: int) -> dict:
        x_all = images.repeat((batch + len(images) - 1) // len(images), 1, 1, 1)[:batch]
        x = gpu_images.normalise(x_all, pre)

        def once():
            with torch.inference_mode(), torch.autocast(self.device, dtype=torch.bfloat16,
                                                        enabled=precision == "bf16"):
                return network(x)
        for _ in range(2 if self.dry else 5):
            once()
        self.sync()
        iterations, started = 0, time.perf_counter()
        while iterations < (2 if self.dry else 20) or time.perf_counter() - started < (0 if self.dry else 2.0):
            once()
            iterations += 1
        self.sync()
        seconds = time.perf_counter() - started
        return {"images_per_s": round(iterations * batch / seconds, 1), "batch_size": batch,
                "iterations": iterations, "precision": precision}

    def model_alone(self) -> None:
        batch = self.args.model_batch or (8 if self.dry else 256)
        precision = "bf16"
        loaded = load_backbone(BACKBONE)
        pre = loaded.spec.preprocess
        images = self._images_on_device(pre, batch)
        out = {}
        lite = tapped(loaded, [loaded.spec.default_layer]).to(self.device, memory_format=torch.channels_last)
        out[BACKBONE] = self._time_network(lite.eval(), pre, images, precision, batch)
        spec = get_spec("resnet50")
        resnet = TappedNetwork(spec.build().eval().requires_grad_(False),
                                        {spec.default_layer: spec.layers[spec.default_layer].module})
        resnet = resnet.to(self.device, memory_format=torch.channels_last).eval()
        out["resnet50"] = {**self._time_network(resnet, spec.preprocess, images, precision, batch),
                           "weights": "random (same speed as trained ones)"}
        out["what"] = "normalise + network on uint8 images already on the device, channels-last, inference_mode"
        self.results["model_alone"] = out
        self.lite_images = images

    # -- 4. decode alone
    def decode_alone(self) -> None:
        count = min(len(self.paths), 64 if self.dry else 4096)
        datas = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)
                 for p in self.paths[:count] if jpeg.read_jpeg_header(p.read_bytes()).gpu_decodable]
        batch = 32 if self.dry else 256
        gpu_images.decode_batch(datas[:batch], self.device)  # warm-up: nvJPEG's handles and buffers
        self.sync()
        started = time.perf_counter()
        for start in range(0, len(datas), batch):
            gpu_images.decode_batch(datas[start:start + batch], self.device)
        self.sync()
        self.results["decode_alone"] = {"images": len(datas), "batch": batch,
                                        "images_per_s": round(len(datas) / (time.perf_counter() - started), 1),
                                        "what": "torchvision.io.decode_jpeg on files in memory, full size"}
        if self.device == "cuda":  # does the decoder overwrite memory the caller's stream still reads?
            from torchvision.io import ImageReadMode, decode_jpeg

            image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (384, 512, 3), dtype=np.uint8))
            encoded = []
            for quality in (80, 85, 90, 95):
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=quality)
                encoded.append(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8))
            nbytes = 3 * 384 * 512
            self.results["decode_hazard"] = {
                "trials": 5, "what": "decodes that overwrote blocks freed with reads still queued "
                                     "(see gpu_images.decode_batch)",
                "torchvision_on_callers_stream": gpu_images.overwrites_queued_memory(
                    lambda d: decode_jpeg(d, mode=ImageReadMode.RGB, device="cuda"), encoded, nbytes),
                "gpu_decode_batch": gpu_images.overwrites_queued_memory(
                    lambda d: gpu_images.decode_batch(d, "cuda"), encoded, nbytes)}

    # -- 5. end to end
    def _extract(self, data: Path, cache: Path, precision: str, **kwargs):
        return extract(data, BACKBONE, cache_dir=cache, device=self.device, precision=precision,
                       progress=False, **kwargs)

    def end_to_end(self) -> None:
        runs = []
        for run in range(2):
            cache = self.work / f"cache-e2e-{run}"
            shutil.rmtree(cache, ignore_errors=True)
            report = self._extract(self.data, cache, "bf16", shard_size=self.args.shard_size)
            started = time.perf_counter()
            problems = [p for store in FeatureStore.all_in(cache) for p in store.verify()]
            verify_s = time.perf_counter() - started
            runs.append({"images": report.images, "computed": report.computed, "skipped": len(report.skipped),
                         "seconds": round(report.seconds, 2),
                         "images_per_s": round(report.computed / report.seconds, 1),
                         "verify_seconds": round(verify_s, 2), "verify_problems": problems[:5],
                         "with_verify_images_per_s": round(report.computed / (report.seconds + verify_s), 1)})
            log.info("end to end, run %d: %s", run + 1, runs[-1])
            shutil.rmtree(cache, ignore_errors=True)
        best = max(runs, key=lambda r: r["images_per_s"])
        runner = next(iter(gpu._RUNNERS.values()), None)
        self.results["end_to_end"] = {
            "runs": runs, "images_per_s": best["images_per_s"],
            "with_verify_images_per_s": best["with_verify_images_per_s"],
            "verified": all(not r["verify_problems"] and r["skipped"] == 0 for r in runs),
            "gpu_batch_size": runner.batch_size if runner else None, "shard_size": self.args.shard_size,
            "precision": "bf16", "what": "extract(): scan, SHA-256 of every file, read + check, GPU decode, "
                                         "resize, network, zarr shard commits (fsync); verify() after"}

    # -- 6. parity
    def parity(self) -> None:
        folder = self.work / "parity"
        shutil.rmtree(folder, ignore_errors=True)
        flowers = sorted((Path(self.args.flowers) / "test").glob("*/*.jpg"))
        native = flowers[:: max(1, len(flowers) // (16 if self.dry else 240))]
        generated = self.paths[:: max(1, len(self.paths) // (16 if self.dry else 240))]
        for path in [*native, *generated]:
            target = folder / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)

        def rows(report) -> dict[str, np.ndarray]:
            features = report.feature_sets[(BACKBONE, "head")]
            return {p.name: r for p, r in zip(features.paths, features.features.compute(), strict=True)}

        def cosines(a: dict, b: dict) -> dict:
            names = sorted(a.keys() & b.keys())
            values = np.array([a[n] @ b[n] / (np.linalg.norm(a[n]) * np.linalg.norm(b[n]) + 1e-12) for n in names])
            worst = names[int(values.argmin())] if names else None
            return {"images": len(names), "min": round(float(values.min()), 6), "mean": round(float(values.mean()), 6),
                    "worst": worst, "missing": len(a.keys() ^ b.keys())}

        on_cpu = self._extract_cpu(folder, self.work / "cache-parity-cpu")
        out: dict = {"images": len(native) + len(generated), "reference": "CPU path, fp32"}
        out["gpu_fp32"] = cosines(rows(self._extract(folder, self.work / "cache-parity-fp32", "fp32")), on_cpu)
        os.environ[gpu.GPU_DECODE_ENV] = "0"
        try:
            forced = self._extract(folder, self.work / "cache-parity-cpudec", "fp32")
            out["gpu_fp32_cpu_decoding"] = cosines(rows(forced), on_cpu)
        finally:
            del os.environ[gpu.GPU_DECODE_ENV]
        out["gpu_bf16"] = cosines(rows(self._extract(folder, self.work / "cache-parity-bf16", "bf16")), on_cpu)
        pre = get_spec(BACKBONE).preprocess
        diffs = []
        for path in [*native[:32], *generated[:32]]:
            data = bytearray(path.read_bytes())
            header = jpeg.read_jpeg_header(data)
            if header is None or not header.gpu_decodable:
                continue
            image = gpu_images.decode_batch([torch.frombuffer(data, dtype=torch.uint8)], self.device)[0]
            got = gpu_images.preprocess(image[None], header.orientation, pre)[0].permute(1, 2, 0).cpu().numpy()
            diffs.append(float(np.abs(got.astype(int) - decode(path, pre).astype(int)).mean()))
        out["pixels_mean_abs_diff"] = {"images": len(diffs), "mean": round(float(np.mean(diffs)), 4),
                                       "max": round(float(np.max(diffs)), 4)}
        self.results["parity"] = out

    def _extract_cpu(self, folder: Path, cache: Path) -> dict[str, np.ndarray]:
        """The CPU path's fp32 rows (the real run_shard, even in a dry run where it is patched)."""
        patched = extract_module.run_shard
        extract_module.run_shard = _CPU_RUN_SHARD
        try:
            report = extract(folder, BACKBONE, cache_dir=cache, device="cpu", precision="fp32", progress=False)
        finally:
            extract_module.run_shard = patched
        features = report.feature_sets[(BACKBONE, "head")]
        return {p.name: r for p, r in zip(features.paths, features.features.compute(), strict=True)}

    # -- 7. compile
    def compile(self) -> None:
        """The GPU path with PIPELINE_GPU_COMPILE=1 over a subset: the first run compiles (in its first
        batch), the second shows the speed; `compiled` says whether it stayed compiled or fell back."""
        subset = self.work / "compile-list.txt"
        subset.write_text("\n".join(str(p) for p in self.paths[:4096]) + "\n")
        os.environ[gpu.COMPILE_ENV] = "1"
        runs = []
        try:
            for run in range(2):
                cache = self.work / f"cache-compile-{run}"
                report = self._extract(subset, cache, "bf16", shard_size=self.args.shard_size)
                problems = [p for store in FeatureStore.all_in(cache) for p in store.verify()]
                runs.append({"computed": report.computed, "seconds": round(report.seconds, 2),
                             "images_per_s": round(report.computed / report.seconds, 1),
                             "verify_problems": problems[:5]})
                log.info("compiled, run %d: %s", run + 1, runs[-1])
                shutil.rmtree(cache, ignore_errors=True)
        finally:
            del os.environ[gpu.COMPILE_ENV]
        runner = next((r for r in gpu._RUNNERS.values() if r.compile_mode), None)
        self.results["compile"] = {"runs": runs, "images_per_s": runs[-1]["images_per_s"],
                                   "compiled": bool(runner and runner.compiled is not None), "mode": "default",
                                   "what": "end to end over 4,096 of the files; run 1 includes compiling"}

    def verdict(self) -> None:
        r = self.results
        e2e = r.get("end_to_end", {}).get("images_per_s")
        alone = r.get("model_alone", {}).get(BACKBONE, {}).get("images_per_s")
        tutorial = r.get("tutorial", {}).get("images_per_s")
        cos = r.get("parity", {}).get("gpu_fp32", {}).get("min")
        ratios = {"end_to_end_vs_model_alone": round(e2e / alone, 3) if e2e and alone else None,
                  "end_to_end_vs_tutorial": round(e2e / tutorial, 2) if e2e and tutorial else None}
        figures = {"end_to_end_images_per_s": e2e, **ratios, "fp32_cosine_min": cos}
        r["summary"] = {**figures, "met": {k: (v is not None and v >= TARGETS[k]) for k, v in figures.items()},
                        "all_steps_ok": all(s.get("ok") for n, s in r["steps"].items() if n != "compile")}
        r["total_seconds"] = round(time.perf_counter() - self.started, 1)
        self.save()
        log.info("summary: %s", r["summary"])


_CPU_RUN_SHARD = extract_module.run_shard


def _write_variant(job: tuple[str, str, int, int, int]) -> int:
    """One re-encoded file: the photo at `size` px on its longer side (4:3 or 3:4), at `quality`."""
    source, folder, n, size, quality = job
    image = Image.open(source).convert("RGB")
    shape = (size, size * 3 // 4) if n % 2 else (size * 3 // 4, size)
    image = image.resize(shape, Image.BICUBIC)
    options: dict = {"quality": quality, "subsampling": "4:4:4" if quality >= 90 else "4:2:0"}
    if n % 20 == 7:
        exif = Image.Exif()
        exif[0x0112] = 6
        options["exif"] = exif
    if n % 50 == 13:
        options["progressive"] = True
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"{Path(source).stem}-{n:05d}-{size}-q{quality}.jpg").write_bytes(buffer.getvalue())
    return buffer.tell()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the results JSON")
    parser.add_argument("--flowers", default=str(ROOT / ".gpu-data" / "flowers12"))
    parser.add_argument("--work", default=None, help="scratch folder for the JPEGs and caches (default: a temp one)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes on the CPU: checks the script, measures nothing")
    parser.add_argument("--images", type=int, default=0, help="JPEG files to make (default 20000; 96 in a dry run)")
    parser.add_argument("--shard-size", type=int, default=2048)
    parser.add_argument("--model-batch", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=270.0, help="optional steps are skipped past this")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    if args.dry_run:
        args.shard_size = min(args.shard_size, 32)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("pipeline").setLevel(logging.INFO)
    if args.work is None:
        import tempfile

        args.work = tempfile.mkdtemp(prefix="gpu-bench-")
    if not args.dry_run and not torch.cuda.is_available():
        log.error("no CUDA GPU visible: run with --dry-run to check the script on the CPU")
        return 2
    bench = Bench(args)
    if bench.dry:  # the GPU path's code, on the CPU: extract() sends CUDA shards only to it
        extract_module.run_shard = gpu.run_shard
    bench.step("environment", bench.environment)
    bench.step("dataset", bench.dataset)
    if "dataset" in bench.results:
        bench.step("tutorial", bench.tutorial)
        bench.step("model_alone", bench.model_alone)
        bench.step("decode_alone", bench.decode_alone)
        bench.step("end_to_end", bench.end_to_end)
        bench.step("parity", bench.parity)
        if not (bench.dry or args.no_compile):
            bench.step("compile", bench.compile, needs_s=120)
    bench.verdict()
    shutil.rmtree(args.work, ignore_errors=True)
    return 0 if bench.results["summary"]["all_steps_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
