"""The README's first command: a dataset that needs no download, through the real pipeline.

scikit-learn ships 1,797 handwritten digits (8x8, 16 grey levels). They are written out as PNG files
in the image-folder layout, then `pipeline run` embeds them with the bundled EfficientNet-Lite0 and
fits, compares and reports four heads on the cached features.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.features.settings import DEFAULTS

logger = logging.getLogger(__name__)


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


def demo_config(out_dir: Path, cache_dir: str) -> dict:
    """The raw config of `configs/demo.yaml`, with this run's folders: given on the command line, they are
    taken from the folder you run in, so they are written absolute (a config's own relative paths would
    be taken from its folder)."""
    import yaml

    raw = yaml.safe_load((Path(__file__).parent / "demo.yaml").read_text())
    raw["data"] = {"train": str((out_dir / "digits" / "train").absolute()),
                   "test": str((out_dir / "digits" / "test").absolute())}
    raw["features"]["cache_dir"] = str(Path(cache_dir).absolute())
    raw["output_dir"] = str(out_dir.absolute())
    return raw


def run_demo(cache_dir: str = DEFAULTS.cache_dir, out_dir: str = "runs/demo", progress: bool = True) -> dict:
    """Write the digits, then run the demo config on them: extract, fit four heads, report."""
    from pipeline.app.config import RunConfig
    from pipeline.app.run import run

    started = time.perf_counter()
    out = Path(out_dir)
    write_digits(out / "digits")
    logger.info(f"demo data: scikit-learn's digits as PNG files in {out / 'digits'}")
    config = RunConfig.parse(demo_config(out, cache_dir), "configs/demo.yaml")
    metrics = run("configs/demo.yaml", progress=progress, config=config)
    logger.info(f"demo took {time.perf_counter() - started:.0f} s; rerun it and every feature row comes from the cache")
    return metrics
