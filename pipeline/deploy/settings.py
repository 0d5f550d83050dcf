"""The prediction server's limits and batching, checked once; light to import (the command line builds its
options from the defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.errors import ConfigError


@dataclass(frozen=True)
class ServeSettings:
    """Batching: when the network is free, a batch takes every image queued by then, waits `max_wait_ms` and
    takes what arrived meanwhile, up to `max_batch` in all. Limits: a request body of at most
    `max_request_mb` MiB holding at most `max_images` images; each image is decoded under the limits of
    `pipeline.images.decode` (Pillow's pixel limit, the decoding memory budget)."""

    max_batch: int = 32
    max_wait_ms: float = 2.0
    max_request_mb: float = 32.0
    max_images: int = 64

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, not {getattr(self, name)}")
        if not self.max_wait_ms >= 0:
            raise ConfigError(f"--max-wait-ms must be a number >= 0, not {self.max_wait_ms}")
        if not self.max_request_mb > 0:
            raise ConfigError(f"--max-request-mb must be a positive number, not {self.max_request_mb}")

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)
