"""Classify images with a model written by `pipeline export`, using numpy, Pillow and onnxruntime only.

    pip install numpy pillow onnxruntime
    python onnx_predict.py model.onnx photo1.jpg photo2.png ...

Prints one JSON line per image: its path, the most probable class and every class's probability. The
model's metadata says which classes its output columns are and how each input wants its images: shorter
side resized to `resize_shorter_side`, centre crop `center_crop`, uint8 RGB, NHWC. The normalisation is
inside the model. The resampling is written out in numpy as OpenCV computes it for `pipeline predict`
(area averaging when shrinking, else bilinear or bicubic): pixels agree to within one grey level.
"""

from __future__ import annotations

import functools
import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps


def load_rgb(path: str, shorter: int) -> Image.Image:
    """The image upright (EXIF orientation), in RGB, transparency composited on white; a JPEG is decoded
    at a reduced scale where that still leaves its shorter side at least `shorter` pixels."""
    image = Image.open(path)
    if image.format == "JPEG":
        scale = shorter / min(image.size)
        image.draft("RGB", (int(image.width * scale + 0.999), int(image.height * scale + 0.999)))
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return image.convert("RGB")


@functools.cache
def weights(size: int, out: int, method: str) -> np.ndarray:
    """The (out x size) matrix that resamples one axis of `size` pixels to `out`, as OpenCV's resize does:
    area averaging, or bilinear/bicubic (a = -0.75) on pixel centres with the edge pixels repeated."""
    scale, matrix = size / out, np.zeros((out, size))
    for i in range(out):
        if method == "area":
            low, high = i * scale, (i + 1) * scale
            for j in range(int(low), min(size, int(np.ceil(high)))):
                matrix[i, j] = (min(high, j + 1) - max(low, j)) / scale
            continue
        if method == "nearest":
            matrix[i, min(int(i * scale), size - 1)] = 1
            continue
        source = (i + 0.5) * scale - 0.5
        first, t = int(np.floor(source)), source - np.floor(source)
        if method == "bilinear":
            taps = {0: 1 - t, 1: t}
        elif method == "bicubic":
            x = {-1: 1 + t, 0: t, 1: 1 - t, 2: 2 - t}
            a = -0.75
            taps = {k: ((a + 2) * d - (a + 3)) * d * d + 1 if d <= 1 else ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
                    for k, d in x.items()}
        else:
            raise SystemExit(f"interpolation {method!r} is not written out in this example")
        for k, w in taps.items():
            matrix[i, min(max(first + k, 0), size - 1)] += w
    return matrix


def prepare(image: Image.Image, geometry: dict) -> np.ndarray:
    """Resize the shorter side and centre-crop, as one resampling of the square the crop keeps."""
    resize, crop = geometry["resize_shorter_side"], geometry["center_crop"]
    side = max(1, round(min(image.size) * crop / resize))  # the kept square, in source pixels
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = np.asarray(image.crop((left, top, left + side, top + side)), dtype=np.float32)
    matrix = weights(side, crop, "area" if side > crop else geometry["interpolation"]).astype(np.float32)
    resampled = np.einsum("ij,jkc->ikc", matrix, square)  # rows, then columns
    resampled = np.einsum("ij,kjc->kic", matrix, resampled)
    return np.clip(np.rint(resampled), 0, 255).astype(np.uint8)


def main(model_path: str, paths: list[str], batch: int = 32) -> None:
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    classes, inputs = json.loads(meta["classes"]), json.loads(meta["inputs"])
    shorter = max(g["resize_shorter_side"] for g in inputs.values())
    for start in range(0, len(paths), batch):  # a batch at a time: activations grow with the batch
        chunk = paths[start:start + batch]
        images = [load_rgb(path, shorter) for path in chunk]
        feeds = {name: np.stack([prepare(image, geometry) for image in images]) for name, geometry in inputs.items()}
        (probabilities,) = session.run(["probabilities"], feeds)
        for path, row in zip(chunk, probabilities, strict=True):
            print(json.dumps({"path": path, "class": classes[int(row.argmax())],
                              "probabilities": {c: round(float(p), 6) for c, p in zip(classes, row, strict=True)}}))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__.split("\n\n")[1])
    main(sys.argv[1], sys.argv[2:])
