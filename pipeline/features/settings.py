"""How features are computed, as typed settings: the one source of their defaults, for `extract`, the
run and batch configs' `features:` sections and the command line. Light to import (no torch)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, PositiveInt

from pipeline.core.configfile import from_config_folder
from pipeline.core.schema import Section, one_of, option

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")
RUNTIMES = ("auto", "torch", "openvino")


class ComputeSettings(Section):
    """Where features are cached and what computes them; what a batch run may set."""

    cache_dir: Annotated[str, AfterValidator(from_config_folder("features.cache_dir"))] = option(
        "cache", accepts="a folder path", validate_default=True,
        about="feature cache folder; in a config file relative to the file's folder, on the command line to the "
              "folder you run in")
    device: Literal[DEVICES] = option("auto", accepts=one_of(DEVICES), about="auto picks CUDA when present")
    batch_size: PositiveInt = option(32, accepts="a positive integer", about="images per forward pass")
    shard_size: PositiveInt = option(256, accepts="a positive integer",
                                     about="images per shard, i.e. per Dask task")
    scheduler: str | None = option(None, accepts="a dask.distributed scheduler address, or null",
                                   about="address of a dask.distributed scheduler (default: Dask's local "
                                         "in-process scheduler)")


class ExtractSettings(ComputeSettings):
    """Everything `extract` takes besides the data, backbones and layers."""

    precision: Literal[PRECISIONS] = option(
        "auto", accepts=one_of(PRECISIONS),
        about="auto = bf16 on CUDA and on CPUs with AMX/AVX512-BF16, else fp32 (part of the cache key)")
    runtime: Literal[RUNTIMES] = option(
        "auto", accepts=one_of(RUNTIMES),
        about="what runs the network: auto = OpenVINO on a CPU, torch on CUDA; a backbone OpenVINO cannot "
              "convert falls back to torch, logged (the runtime used is part of the cache key)")
    weights: Annotated[str | None, AfterValidator(from_config_folder("features.weights"))] = option(
        None, accepts="a local state-dict path (in a config file relative to its folder), or null",
        about="a local state dict for the (single) backbone, instead of its registered weights")


DEFAULTS = ExtractSettings()
