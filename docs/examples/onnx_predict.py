"""Classify images with a model written by `pipeline export`, using numpy, Pillow and onnxruntime only.

    pip install numpy pillow onnxruntime
    python onnx_predict.py model.onnx photo1.jpg photo2.png ...

Prints one JSON line per image: its path, the most probable class and every class's probability. The
model's metadata says which classes its output columns are and how each input wants its images: shorter
side resized to `resize_shorter_side`, centre crop `center_crop`, uint8 RGB, NHWC. The normalisation is
inside the model. Pillow's resampling differs from the OpenCV resampling of `pipeline predict` by a grey
level or two here and there, so probabilities may differ from its CSV in the third decimal.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


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


def prepare(image: Image.Image, geometry: dict) -> np.ndarray:
    """Resize the shorter side and centre-crop, as one resampling of the square the crop keeps."""
    resize, crop = geometry["resize_shorter_side"], geometry["center_crop"]
    side = max(1, round(min(image.size) * crop / resize))  # the kept square, in source pixels
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    method = Image.Resampling.BOX if side > crop else RESAMPLE[geometry["interpolation"]]
    return np.asarray(square.resize((crop, crop), method), dtype=np.uint8)


def main(model_path: str, paths: list[str]) -> None:
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    classes, inputs = json.loads(meta["classes"]), json.loads(meta["inputs"])
    batches: dict[str, list[np.ndarray]] = {name: [] for name in inputs}
    for path in paths:
        shorter = max(g["resize_shorter_side"] for g in inputs.values())
        image = load_rgb(path, shorter)
        for name, geometry in inputs.items():
            batches[name].append(prepare(image, geometry))
    (probabilities,) = session.run(["probabilities"], {name: np.stack(b) for name, b in batches.items()})
    for path, row in zip(paths, probabilities, strict=True):
        print(json.dumps({"path": path, "class": classes[int(row.argmax())],
                          "probabilities": {c: round(float(p), 6) for c, p in zip(classes, row, strict=True)}}))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__.split("\n\n")[1])
    main(sys.argv[1], sys.argv[2:])
