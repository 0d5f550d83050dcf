"""Where and how features are computed: the device, the precision and the runtime that `auto` stands for.

Light to import: torch is imported only where a CUDA driver is present to ask, and OpenVINO never.
"""

from __future__ import annotations

import functools
import os
import sys

from pipeline.core.errors import ConfigError
from pipeline.features.settings import DEVICES, PRECISIONS, RUNTIMES


def _nvidia_driver_present() -> bool:
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")


def cuda_available() -> bool:
    """`torch.cuda.is_available()`, without importing torch (a second or two) on a machine with no
    NVIDIA driver, where the answer can only be no."""
    if "torch" not in sys.modules and not _nvidia_driver_present():
        return False
    import torch

    return torch.cuda.is_available()


def resolve_device(device: str, local: bool = True) -> str:
    """`local=False` when a cluster will run the work: its workers, not this machine, need the GPU."""
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if device == "cuda" and local and not cuda_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is visible; use --device auto or cpu")
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    return device


@functools.cache
def cpu_has_bf16() -> bool:
    """AMX or AVX512-BF16 make bf16 autocast several times faster than fp32 on a CPU."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    if device == "cuda":  # with no local GPU (a cluster's GPU workers), assume bf16 as every GPU since Ampere
        if not cuda_available():
            return "bf16"
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def resolve_runtime(runtime: str, device: str) -> str:
    """`auto` is OpenVINO on a CPU (several times torch eager's speed there) and torch on CUDA; OpenVINO
    runs on the CPU only. `device` is already resolved (cpu or cuda)."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if runtime == "auto":
        return "openvino" if device == "cpu" else "torch"
    if runtime == "openvino" and device != "cpu":
        raise ConfigError("runtime 'openvino' runs on the CPU: use --device cpu, or --runtime torch/auto on CUDA")
    return runtime
