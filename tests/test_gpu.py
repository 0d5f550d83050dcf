"""The GPU extraction path (pipeline/features/gpu.py, its image operations in features/gpu_images.py, the
JPEG header parser in images/jpeg.py).

Its arithmetic runs on CPU tensors too, so most of it is tested here without a GPU: the resampling
weights against OpenCV, the header parser's routing, EXIF orientation against Pillow, the whole
preprocessing against the CPU decoder on real photos, the out-of-memory retry, and a folder extracted
end to end through the GPU path's code on the CPU. The tests marked `cuda` need a GPU; without one
they are skipped (benchmarks/gpu/check.sh runs them on a GPU machine).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.features import extract as extract_module
from pipeline.features import gpu, gpu_images
from pipeline.features.cache import FeatureStore
from pipeline.features.extract import extract
from pipeline.images import jpeg
from pipeline.images.decode import _draft_size, decode
from pipeline.images.preprocess import Preprocess
from pipeline.models.registry import get_spec

from .conftest import FLOWERS, make_image, needs_flowers

HAS_CUDA = torch.cuda.is_available()


def cuda(test):
    """Marked `cuda` (check.sh selects them with -m cuda) and skipped with a reason without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible (torch.cuda.is_available() "
                                               "is False); benchmarks/gpu/check.sh runs these on a GPU")(test))


LITE = get_spec("efficientnet_lite0").preprocess
SMALL = Preprocess(resize=40, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic")


def _photos(limit: int, split: str = "test") -> list[Path]:
    """`limit` real photos spread over the classes."""
    photos = sorted((FLOWERS / split).glob("*/*.jpg"))
    return photos[:: max(1, len(photos) // limit)][:limit]


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", **kwargs)
    return out.getvalue()


def _reencoded(photo: Path, width: int, quality: int, folder: Path, orientation: int = 1) -> Path:
    """The photo resized to `width` x 3/4 `width`, saved at `quality`, with an EXIF orientation."""
    image = Image.open(photo).convert("RGB").resize((width, width * 3 // 4), Image.BICUBIC)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    path = folder / f"{photo.stem}-{width}-q{quality}-o{orientation}.jpg"
    path.write_bytes(_jpeg(image, quality=quality, exif=exif))
    return path


def _gpu_preprocessed(path: Path, pre: Preprocess, device: str = "cpu") -> np.ndarray:
    """The GPU path's (H, W, 3) uint8 image for one JPEG file, computed on `device`."""
    data = bytearray(path.read_bytes())
    header = jpeg.read_jpeg_header(data)
    assert header is not None and header.gpu_decodable, path
    image = gpu_images.decode_batch([torch.frombuffer(data, dtype=torch.uint8)], device)[0]
    return gpu_images.preprocess(image[None], header.orientation, pre)[0].permute(1, 2, 0).cpu().numpy()


# --------------------------------------------------------------------------- resampling, geometry

@pytest.mark.parametrize("method,flag,sizes", [
    ("area", cv2.INTER_AREA, [(525, 224), (448, 224), (300, 224), (225, 224), (1000, 260)]),
    ("bicubic", cv2.INTER_CUBIC, [(100, 224), (200, 224), (31, 224), (224, 224)]),
    ("bilinear", cv2.INTER_LINEAR, [(100, 224), (200, 224), (31, 224)]),
    ("nearest", cv2.INTER_NEAREST, [(100, 224), (200, 224), (150, 224)]),
    ("lanczos", cv2.INTER_LANCZOS4, [(100, 224), (200, 224), (31, 224)]),
])
def test_resize_weights_are_opencvs(method, flag, sizes):
    rng = np.random.default_rng(0)
    for src, dst in sizes:
        x = rng.random((src, src)).astype(np.float32)
        weights = gpu_images.resize_weights(src, dst, method)
        expected = cv2.resize(x, (dst, dst), interpolation=flag)
        assert np.abs(weights @ x @ weights.T - expected).max() < 2e-5, (method, src, dst)


@pytest.mark.parametrize("size", [(224, 224), (300, 200), (513, 384), (800, 600), (1100, 2000), (4000, 3000)])
def test_draft_scale_is_pillows(size):
    image = Image.open(io.BytesIO(_jpeg(Image.new("RGB", size, (90, 120, 30)))))
    image.draft("RGB", _draft_size(image.size, LITE.resize))
    reduced = round(size[0] / image.size[0])
    assert gpu_images.draft_scale(size[1], size[0], LITE) == reduced


@pytest.mark.parametrize("height,width", [(224, 224), (300, 200), (201, 517), (33, 40)])
def test_crop_box_is_the_cpu_paths(height, width):
    """A stripe pattern whose crop position shows: identical pixels, not just similar ones."""
    rng = np.random.default_rng(height * width)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pre = Preprocess(resize=40, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear")
    from pipeline.images.decode import _resize_and_crop

    expected = _resize_and_crop(Image.fromarray(pixels), pre).astype(int)
    got = gpu_images.resize_and_crop(torch.from_numpy(pixels).permute(2, 0, 1)[None], pre)[0].permute(1, 2, 0).numpy()
    assert np.abs(got.astype(int) - expected).max() <= 1  # OpenCV's uint8 fixed-point rounding


# --------------------------------------------------------------------------- JPEG headers and routing

def test_header_routes_what_nvjpeg_decodes_to_the_gpu():
    rgb = make_image(3, 64)
    baseline = jpeg.read_jpeg_header(_jpeg(rgb, quality=90))
    assert baseline.gpu_decodable and (baseline.width, baseline.height, baseline.components) == (64, 64, 3)
    assert not jpeg.read_jpeg_header(_jpeg(rgb, progressive=True)).gpu_decodable
    assert not jpeg.read_jpeg_header(_jpeg(rgb.convert("CMYK"))).gpu_decodable
    assert not jpeg.read_jpeg_header(_jpeg(rgb.convert("L"))).gpu_decodable
    png = io.BytesIO()
    rgb.save(png, format="PNG")
    assert jpeg.read_jpeg_header(png.getvalue()) is None
    assert jpeg.read_jpeg_header(b"") is None and jpeg.read_jpeg_header(b"\xff\xd8\xff") is None
    whole = _jpeg(rgb)
    assert jpeg.ends_whole(whole) and not jpeg.ends_whole(whole[: len(whole) // 2])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_read_and_applied_as_pillow_does(tmp_path, orientation):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 80, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(image, quality=95, exif=exif)
    assert jpeg.read_jpeg_header(data).orientation == orientation
    decoded = torch.from_numpy(np.array(Image.open(io.BytesIO(data)))).permute(2, 0, 1)
    from PIL import ImageOps

    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    assert np.array_equal(gpu_images.apply_orientation(decoded, orientation).permute(1, 2, 0).numpy(), expected)


def test_xmp_orientation_goes_to_the_cpu_decoder():
    xmp = b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    data = _jpeg(make_image(2, 64), xmp=xmp)
    header = jpeg.read_jpeg_header(data)
    assert header.xmp_orientation and not header.gpu_decodable


# --------------------------------------------------------------------------- preprocessing parity, CPU tensors

@needs_flowers
def test_preprocessing_matches_the_cpu_decoder_on_real_photos(tmp_path):
    """The same decoder (libjpeg-turbo, through torchvision and through Pillow), then the GPU path's
    draft emulation, orientation, crop and resampling: near-identical pixels at every size."""
    diffs = []
    for i, photo in enumerate(_photos(12)):
        for path in (photo, _reencoded(photo, 512, 90, tmp_path), _reencoded(photo, 800, 95, tmp_path, 6),
                     _reencoded(photo, 1600, 85, tmp_path, (3, 8)[i % 2])):
            got = _gpu_preprocessed(path, LITE).astype(int)
            diffs.append(np.abs(got - decode(path, LITE).astype(int)).mean())
    assert np.mean(diffs) < 0.3 and max(diffs) < 0.6, diffs


# --------------------------------------------------------------------------- memory

def test_batch_size_from_free_memory():
    assert gpu.batch_from_memory(8 * 2**30, 20 * 2**20, floor=32) == 128  # 4 GiB / 20 MiB = 204 -> 128
    assert gpu.batch_from_memory(80 * 2**30, 10 * 2**20, floor=32) == gpu.MAX_BATCH
    assert gpu.batch_from_memory(100 * 2**20, 20 * 2**20, floor=32) == 32  # an explicit size is kept
    assert gpu.batch_from_memory(100 * 2**20, 20 * 2**20, floor=1) == 2


def _oom_above(limit: int, calls: list[int]):
    def fn(chunk):
        calls.append(len(chunk))
        if len(chunk) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return list(chunk)
    return fn


def test_oom_retry_halves_the_batch_and_keeps_the_smaller_size():
    calls: list[int] = []
    shrinks: list[int] = []
    retry = gpu.OomRetry(16, on_shrink=lambda: shrinks.append(1))
    out = retry(_oom_above(3, calls), list(range(10)))
    assert [x for chunk in out for x in chunk] == list(range(10))  # every item once, in order
    assert retry.size == 2 and len(shrinks) == 3 and calls[:4] == [10, 8, 4, 2]
    calls.clear()
    retry(_oom_above(3, calls), list(range(5)))
    assert calls == [2, 2, 1]  # the next batch starts at the smaller size


def test_oom_retry_gives_up_at_one_image_and_passes_other_errors():
    with pytest.raises(torch.cuda.OutOfMemoryError):
        gpu.OomRetry(4, on_shrink=lambda: None)(_oom_above(0, []), [1, 2, 3])

    def broken(chunk):
        raise RuntimeError("shape mismatch")
    retry = gpu.OomRetry(4, on_shrink=lambda: None)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        retry(broken, [1, 2, 3])
    assert retry.size == 4


def _tiny_runner(compiled=None) -> gpu._Runner:
    from torch import nn

    from pipeline.models.taps import TappedNetwork

    network = TappedNetwork(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), {"conv": "0"})
    return gpu._Runner(network, SMALL, "cpu", "fp32", gpu.OomRetry(4, on_shrink=lambda: None), compiled, "default")


def test_a_failing_compiled_network_falls_back_to_eager_mode(caplog):
    def broken(x):
        raise RuntimeError("inductor: no C++ compiler")
    runner = _tiny_runner(compiled=broken)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    out = runner(images)
    assert runner.compiled is None and "running the network eagerly" in caplog.text
    assert [chunk["conv"].shape for chunk in out] == [(4, 4), (2, 4)]
    eager = runner._eager(gpu_images.normalise(images, SMALL))["conv"]
    assert torch.allclose(torch.cat([c["conv"] for c in out]), eager, atol=1e-5)


def test_compiled_batches_are_padded_to_one_shape():
    shapes = []

    def compiled(x):
        shapes.append(tuple(x.shape))
        return {"conv": x.mean((2, 3))}
    out = _tiny_runner(compiled=compiled)(torch.zeros((6, 3, 32, 32), dtype=torch.uint8))
    assert shapes == [(4, 3, 32, 32), (4, 3, 32, 32)] and [c["conv"].shape[0] for c in out] == [4, 2]


@pytest.mark.parametrize("value,mode", [("", None), ("0", None), ("1", "default"),
                                        ("reduce-overhead", "reduce-overhead")])
def test_compile_mode_from_the_environment(monkeypatch, value, mode):
    monkeypatch.setenv(gpu.COMPILE_ENV, value)
    assert gpu.compile_mode() == mode


# --------------------------------------------------------------------------- the whole path, on the CPU

def make_mixed_folder(root: Path, photos: list[Path]) -> dict[str, str]:
    """A class folder of real photos (some re-encoded larger, one rotated) beside every case the GPU
    path hands to the CPU decoder or skips; returns {file name: expected skip reason prefix}."""
    folder = root / "mixed"
    folder.mkdir(parents=True)
    for photo in photos:
        shutil.copy(photo, folder / photo.name)
    _reencoded(photos[0], 800, 92, folder, orientation=6)
    _reencoded(photos[1], 1200, 80, folder)
    image = Image.open(photos[2]).convert("RGB")
    image.save(folder / "progressive.jpg", quality=90, progressive=True)
    image.convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    image.convert("L").save(folder / "grey.jpg", quality=90)
    image.save(folder / "photo.png")
    data = (folder / photos[3].name).read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    (folder / "empty.jpg").write_bytes(b"")
    return {"corrupt.jpg": "not an image (unknown format)", "empty.jpg": "empty file",
            "truncated.jpg": "corrupt or truncated image"}


def _rows(report) -> dict[str, np.ndarray]:
    features = report.feature_sets[("efficientnet_lite0", "head")]
    return {p.name: row for p, row in zip(features.paths, features.features.compute(), strict=True)}


def _cosines(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    assert a.keys() == b.keys()
    return {k: float(a[k] @ b[k] / np.linalg.norm(a[k]) / np.linalg.norm(b[k])) for k in a}


def _verified(cache: Path) -> None:
    stores = FeatureStore.all_in(cache)
    assert stores and all(store.verify() == [] for store in stores)


@needs_flowers
def test_gpu_path_on_the_cpu_matches_the_cpu_path_end_to_end(tmp_path, monkeypatch):
    """The GPU path's code (header routing, batched decoding, draft emulation, resampling, CPU
    fallback, OOM-retried batches, shard commit) with device=cpu, against the CPU path, fp32."""
    skips = make_mixed_folder(tmp_path, _photos(6))
    reference = extract(tmp_path / "mixed", "efficientnet_lite0", cache_dir=tmp_path / "cpu", device="cpu",
                        precision="fp32", batch_size=4, progress=False)
    monkeypatch.setattr(extract_module, "run_shard", gpu.run_shard)
    report = extract(tmp_path / "mixed", "efficientnet_lite0", cache_dir=tmp_path / "gpu", device="cpu",
                     precision="fp32", batch_size=4, shard_size=7, progress=False)
    assert report.computed == reference.computed == 6 + 2 + 4
    got = {Path(path).name: reason for path, reason in report.skipped}
    assert got == {Path(path).name: reason for path, reason in reference.skipped}
    assert {name: reason.split(":")[0] for name, reason in got.items()} == skips
    _verified(tmp_path / "gpu")
    cosines = _cosines(_rows(report), _rows(reference))
    # The same libjpeg-turbo decodes both, so only the larger JPEGs differ: Pillow decodes them at
    # reduced scale (draft mode) and the GPU path averages blocks of the full-size image instead.
    drafted = {name for name in cosines if "-q" in name}
    assert len(drafted) == 2 and min(cosines[name] for name in drafted) > 0.9995, cosines
    assert min(cosine for name, cosine in cosines.items() if name not in drafted) > 0.99999, cosines


# --------------------------------------------------------------------------- on a GPU

@cuda
@needs_flowers
def test_cuda_decode_matches_the_cpu_decoder(tmp_path):
    """nvJPEG against libjpeg-turbo, after the same preprocessing: the decoders' last bits only."""
    diffs = []
    for i, photo in enumerate(_photos(24)):
        for path in (photo, _reencoded(photo, 800, 95, tmp_path, (1, 6)[i % 2]), _reencoded(photo, 1600, 85, tmp_path)):
            got = _gpu_preprocessed(path, LITE, "cuda").astype(int)
            diffs.append(np.abs(got - decode(path, LITE).astype(int)).mean())
    assert np.mean(diffs) < 1.5 and max(diffs) < 3.0, (np.mean(diffs), max(diffs))


@cuda
def test_cuda_decoding_never_overwrites_memory_the_stream_still_reads():
    """torchvision's CUDA decoder can write into blocks freed on the caller's stream while queued
    kernels still read them (see gpu_images.decode_batch); the GPU path decodes on a stream of its own."""
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (384, 512, 3), dtype=np.uint8))
    datas = [torch.frombuffer(bytearray(_jpeg(image, quality=q)), dtype=torch.uint8) for q in (80, 85, 90, 95)]
    assert gpu_images.overwrites_queued_memory(lambda d: gpu_images.decode_batch(d, "cuda"), datas, 3 * 384 * 512) == 0


@cuda
@needs_flowers
def test_cuda_features_match_cpu_fp32_features(tmp_path):
    """fp32 on the GPU (GPU decoding, GPU preprocessing, cuDNN) against fp32 on the CPU: cosine >= 0.999."""
    skips = make_mixed_folder(tmp_path, _photos(40))
    cpu_report = extract(tmp_path / "mixed", "efficientnet_lite0", cache_dir=tmp_path / "cpu", device="cpu",
                         precision="fp32", progress=False)
    gpu_report = extract(tmp_path / "mixed", "efficientnet_lite0", cache_dir=tmp_path / "gpu", device="cuda",
                         precision="fp32", progress=False)
    assert {Path(p).name for p, _ in gpu_report.skipped} == set(skips)
    cosines = _cosines(_rows(gpu_report), _rows(cpu_report))
    assert min(cosines.values()) >= 0.999, sorted(cosines.items(), key=lambda kv: kv[1])[:5]


@cuda
def test_cuda_oom_retry_with_real_allocations():
    """A callable that allocates a third of the free memory per item: a real CUDA OOM above two items."""
    torch.cuda.empty_cache()
    per_item = torch.cuda.mem_get_info()[0] // 3

    def allocate(chunk):
        block = torch.empty(len(chunk) * per_item, dtype=torch.uint8, device="cuda")
        del block
        return list(chunk)

    retry = gpu.OomRetry(8)
    out = retry(allocate, list(range(7)))
    assert [x for chunk in out for x in chunk] == list(range(7)) and retry.size <= 2


@cuda
@needs_flowers
def test_cuda_folder_extracts_end_to_end_into_a_cache_that_verifies(tmp_path):
    skips = make_mixed_folder(tmp_path, _photos(30))
    report = extract(tmp_path / "mixed", "efficientnet_lite0", cache_dir=tmp_path / "cache", device="cuda",
                     precision="bf16", batch_size=8, shard_size=16, progress=False)
    assert report.computed == 30 + 2 + 4
    assert {Path(p).name for p, _ in report.skipped} == set(skips)
    _verified(tmp_path / "cache")
    again = extract(tmp_path / "mixed", "efficientnet_lite0", cache_dir=tmp_path / "cache", device="cuda",
                    precision="bf16", progress=False)
    assert again.computed == 0 and again.reused == 36
