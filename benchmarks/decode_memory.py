"""Peak memory of decoding one very large image, each in a fresh process.

    python benchmarks/decode_memory.py [--side 9400] [--folder DIR]

Writes compressed PNGs of SIDE x SIDE pixels (16-bit grey, RGBA, RGB, 8-bit grey, palette with
transparency; small on disk) and decodes each with `pipeline.images.decode.decode` in a subprocess,
which reports the resident set before decoding (imports done) and its peak (`ru_maxrss`), in MB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODES = ("I;16", "RGBA", "RGB", "L", "P")

# The peak resident set of this process alone: VmHWM (ru_maxrss keeps the parent's figure across fork
# and exec on Linux, so a test process holding the big image would be counted); ru_maxrss elsewhere.
_CHILD = """
import json, resource, sys
from pathlib import Path
from pipeline.images.decode import decode
from pipeline.images.preprocess import Preprocess

def peak_mb():
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

before = peak_mb()
out = decode(Path(sys.argv[1]), Preprocess(256, 224, (0.5,) * 3, (0.5,) * 3, "bicubic"))
result = out if isinstance(out, str) else list(out.shape)
print(json.dumps({"before_mb": before, "peak_mb": peak_mb(), "result": result}))
"""


def write_big(path: Path, mode: str, side: int) -> Path:
    """A SIDE x SIDE image of `mode` with smooth content (it compresses to a few hundred KB)."""
    ramp = np.linspace(0, 1, side, dtype=np.float32)
    if mode == "I;16":
        rows = (ramp * 65535).astype(np.uint16)
        image = Image.fromarray(np.broadcast_to(rows, (side, side)).copy())
    elif mode == "P":
        image = Image.fromarray(np.broadcast_to((ramp * 255).astype(np.uint8), (side, side)).copy()).convert("P")
        image.info["transparency"] = 0
    else:
        rows = (ramp * 255).astype(np.uint8)
        plane = np.broadcast_to(rows, (side, side))
        bands = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        image = Image.fromarray(np.ascontiguousarray(np.stack([plane] * bands, -1).squeeze()), mode)
    image.save(path, compress_level=1, **({"transparency": 0} if mode == "P" else {}))
    return path


def peak_decode_mb(path: Path) -> dict:
    """Resident memory (MB) before and at the peak of decoding `path` in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, cwd=ROOT,
                          check=False)
    if proc.returncode:
        raise RuntimeError(f"decoding {path} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=9400)
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for mode in args.modes:
            path = folder / f"big-{mode.replace(';', '')}-{args.side}.png"
            if not path.exists():
                write_big(path, mode, args.side)
            figures = peak_decode_mb(path)
            print(f"{mode:5} {path.stat().st_size / 1024:8.0f} KB on disk: before {figures['before_mb']:6.0f} MB, "
                  f"peak {figures['peak_mb']:6.0f} MB -> {figures['result']}")


if __name__ == "__main__":
    main()
