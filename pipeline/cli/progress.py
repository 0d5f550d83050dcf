"""The progress bar of a weights download: `pipeline.models.download` reports bytes, the CLI draws them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.models.download import Progress, RemoteFile, set_progress


@contextmanager
def _bar(remote: RemoteFile, what: str) -> Iterator[Progress]:
    from tqdm.auto import tqdm

    with tqdm(total=remote.size or None, unit="B", unit_scale=True, unit_divisor=1024,
              desc=f"downloading {what} ({remote.file_name})") as bar:
        def update(done: int, total: int) -> None:
            bar.total = total or None
            bar.update(done - bar.n)
        yield update


@contextmanager
def download_bars(quiet: bool = False) -> Iterator[None]:
    """Inside, every download draws a bar on stderr (none with `quiet`)."""
    set_progress(None if quiet else _bar)
    try:
        yield
    finally:
        set_progress(None)
