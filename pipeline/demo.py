"""The README's first command: a dataset that needs no download, through the real pipeline.

scikit-learn ships 1,797 handwritten digits (8x8, 16 grey levels). They are written out as PNG files
in the image-folder layout, embedded by the bundled EfficientNet-Lite0 into the feature cache, and a
logistic-regression probe on the cached features shows that the features carry the classes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.extract import DEFAULT_BACKBONE, extract


def write_digits(root: Path, test_fraction: float = 0.25, size: int = 64) -> dict[str, Path]:
    """Digits as PNG files under root/{train,test}/<digit>/; skipped when already written."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train, test = train_test_split(index, test_size=test_fraction, stratify=digits.target, random_state=0)
    splits = {"train": root / "train", "test": root / "test"}
    for split, rows in (("train", train), ("test", test)):
        done = splits[split] / ".complete"
        if done.exists():
            continue
        for row in rows:
            folder = splits[split] / str(digits.target[row])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[row] * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.BILINEAR).save(
                folder / f"digit-{row:04d}.png")
        done.touch()
    return splits


def run_demo(cache_dir: str = "cache", out_dir: str = "runs/demo", progress: bool = True) -> float:
    """Extract train and test features, fit a linear probe, print and return its test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    started = time.perf_counter()
    splits = write_digits(Path(out_dir) / "digits")
    print(f"demo data: scikit-learn digits as PNG files in {splits['train'].parent}")
    sets = {}
    for split, folder in splits.items():
        report = extract(folder, cache_dir=cache_dir, progress=progress)
        print(f"{split}: {report.summary()}")
        sets[split] = report.feature_sets[(DEFAULT_BACKBONE, "head")]
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    probe.fit(sets["train"].features.compute(), sets["train"].labels)
    accuracy = float(probe.score(sets["test"].features.compute(), sets["test"].labels))
    print(f"linear probe on cached {DEFAULT_BACKBONE} features: test accuracy {accuracy:.1%} "
          f"({len(sets['test'].labels)} test images)")
    print(f"features cached in {Path(cache_dir).resolve()} (`pipeline cache ls`); "
          f"demo took {time.perf_counter() - started:.0f} s")
    return accuracy
