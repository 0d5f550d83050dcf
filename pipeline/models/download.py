"""One weights path for every source: a file the user names, files already on disk, else a pinned download.

`fetch(remote, what)` returns the path of a weights file, looking in this order:

1. `explicit` (`--weights PATH`): used as given (the user vouches for it; the feature cache keys on its
   digest all the same).
2. Files already on disk: each folder of `$PIPELINE_WEIGHTS` (os.pathsep-separated), the torch hub cache
   (`$TORCH_HOME/hub/checkpoints`, default `~/.cache/torch/hub/checkpoints`), and for a Hugging Face hub
   file the hub cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`) in its
   layout `models--org--name/snapshots/<revision>/<file>`. A file whose SHA-256 does not match the pin is
   never used.
3. A download, unless `offline()`: streamed into a temporary file beside its place in the torch hub
   cache, hashed as it arrives, and renamed into place only when it is complete and its SHA-256 matches
   the pin; otherwise it is deleted. Progress goes to `on_progress(done, total)`.
4. Else one line of `BackboneError` naming the file, the URL and where to put it.

The pin is a full SHA-256, or a hex prefix of one (at least 8 digits: torchvision's weight files carry
the first digits of their SHA-256 in their names, and torch.hub checks exactly that). A hub file without
a pin of our own (`sha256=None`) is checked against the SHA-256 the hub states for the file at its
revision (the `X-Linked-Etag` of a large file); when the revision is a commit, a hub answering for another
commit is refused. Weights are never made up: no file, no backbone.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import BackboneError, first_line
from pipeline.core.hashing import file_sha256
from pipeline.core.io import make_folder

OFFLINE_ENV = "PIPELINE_OFFLINE"
HF_OFFLINE_ENV = "HF_HUB_OFFLINE"
WEIGHTS_ENV = "PIPELINE_WEIGHTS"
TIMEOUT_ENV = "PIPELINE_DOWNLOAD_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
_CHUNK = 1 << 20
_COMMIT = re.compile(r"[0-9a-f]{40}")
_HEX = re.compile(r"[0-9a-f]{8,64}")

Progress = Callable[[int, int], None]
ProgressFactory = Callable[["RemoteFile", str], AbstractContextManager[Progress]]
_progress_factory: ProgressFactory | None = None


@dataclass(frozen=True)
class RemoteFile:
    """A weights file we know how to get, and how to recognise."""

    url: str  # where to download it
    sha256: str | None  # the pin: a full SHA-256 or a hex prefix of >= 8 digits; None: the hub's stated hash
    size: int  # bytes, shown to the user
    file_name: str  # name in our cache (the torch hub cache, or a $PIPELINE_WEIGHTS folder)
    hub: tuple[str, str, str] | None = None  # (repo_id, revision, filename) to look up in the HF hub cache

    def __post_init__(self) -> None:
        if self.sha256 is not None and not _HEX.fullmatch(self.sha256):
            raise ValueError(f"pin {self.sha256!r} of {self.file_name} is not 8 to 64 lower-case hex digits")
        if self.sha256 is None and self.hub is None:
            raise ValueError(f"{self.file_name} has no SHA-256 pin: only a hub file may go without one")
        if not self.file_name or Path(self.file_name).name != self.file_name:
            raise ValueError(f"file name {self.file_name!r} must be a plain name")

    def matches(self, sha256: str) -> bool:
        """Whether a file's full SHA-256 satisfies the pin (always, for a hub file pinned by revision)."""
        return self.sha256 is None or sha256.startswith(self.sha256)


def set_progress(factory: ProgressFactory | None) -> None:
    """Report every download without its own `on_progress` through `factory(remote, what)`, a context
    manager giving a `(done, total)` callback (the CLI's progress bar); None: silent."""
    global _progress_factory
    _progress_factory = factory


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def offline() -> bool:
    """Downloads are forbidden: `--offline` (which sets PIPELINE_OFFLINE=1), PIPELINE_OFFLINE=1 or HF_HUB_OFFLINE=1."""
    return _flag(OFFLINE_ENV) or _flag(HF_OFFLINE_ENV)


def torch_hub_checkpoints() -> Path:
    """torch.hub's checkpoint folder, computed as torch does, without importing torch."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "torch")
    return Path(os.path.expanduser(torch_home)) / "hub" / "checkpoints"


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub computes it."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expanduser(explicit))
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(os.path.expanduser(hf_home)) / "hub"


def weights_dirs() -> list[Path]:
    """The folders of $PIPELINE_WEIGHTS (os.pathsep-separated), searched first for a file by its name."""
    return [Path(p) for p in os.environ.get(WEIGHTS_ENV, "").split(os.pathsep) if p]


def hub_path(hub: tuple[str, str, str]) -> Path | None:
    """Where the hub cache keeps `filename` of `repo_id` at `revision` (a commit, or a branch or tag
    resolved through the cache's `refs/`); None when that revision is not in the cache."""
    repo_id, revision, filename = hub
    repo = hf_hub_cache() / f"models--{repo_id.replace('/', '--')}"
    if not _COMMIT.fullmatch(revision):
        ref = repo / "refs" / revision
        if not ref.is_file():
            return None
        revision = ref.read_text().strip()
    return repo / "snapshots" / revision / filename


def candidates(remote: RemoteFile) -> list[Path]:
    """Every place a copy of `remote` may already be, in the order they are tried."""
    places = [folder / remote.file_name for folder in weights_dirs()]
    places.append(torch_hub_checkpoints() / remote.file_name)
    if remote.hub is not None:
        found = hub_path(remote.hub)
        if found is not None:
            places.append(found)
    return places


def on_disk(remote: RemoteFile) -> Path | None:
    """The first copy of `remote` on disk, by name only (no hashing: for listings)."""
    return next((path for path in candidates(remote) if path.is_file()), None)


def _verified(remote: RemoteFile, path: Path) -> bool:
    """A file on disk satisfies the pin. A hub cache file without a pin is trusted when its blob's
    name (the hub keeps large files under their SHA-256) is its SHA-256, or when the blob is not named
    by a hash at all (a small file, named by its git hash, which we cannot recompute cheaply)."""
    digest = file_sha256(path, memo=True)
    if remote.sha256 is not None:
        return remote.matches(digest)
    blob = path.resolve().name
    return digest == blob if len(blob) == 64 else True


def target_path(remote: RemoteFile) -> Path:
    """Where a download of `remote` goes: the torch hub cache."""
    return torch_hub_checkpoints() / remote.file_name


def _where_to_put(remote: RemoteFile) -> str:
    return (f"place {remote.file_name} ({remote.size / 1e6:.1f} MB, from {remote.url}) at {target_path(remote)} "
            f"or in a folder named by ${WEIGHTS_ENV}, or pass --weights PATH")


def fetch(remote: RemoteFile, what: str, explicit: str | os.PathLike | None = None,
          on_progress: Progress | None = None) -> Path:
    """The path of `remote`'s file for backbone `what`: explicit, on disk, or downloaded (see the module)."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise BackboneError(f"weights file for {what!r} not found: {path}")
        return path
    mismatched: list[Path] = []
    for path in candidates(remote):
        if path.is_file():
            if _verified(remote, path):
                return path
            mismatched.append(path)
    if offline():
        stale = f" ({', '.join(map(str, mismatched))} does not match its SHA-256 pin)" if mismatched else ""
        raise BackboneError(f"weights for {what!r} are not on disk and downloads are off (--offline, "
                            f"{OFFLINE_ENV} or {HF_OFFLINE_ENV}){stale}: {_where_to_put(remote)}")
    return download(remote, what, on_progress)


def _timeout() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        raise BackboneError(f"{TIMEOUT_ENV} must be a number of seconds, not "
                            f"{os.environ[TIMEOUT_ENV]!r}") from None


def download(remote: RemoteFile, what: str, on_progress: Progress | None = None) -> Path:
    """Download `remote` into the torch hub cache through a temporary file in the same folder, renamed
    into place only once complete and matching its pin; a failed or mismatched download leaves nothing."""
    target = target_path(remote)
    folder = make_folder(target.parent)
    tmp = folder / f".{remote.file_name}.{uuid.uuid4().hex[:8]}.part"
    if on_progress is None and _progress_factory is not None:
        reporting = _progress_factory(remote, what)
    else:
        reporting = nullcontext(on_progress)
    try:
        with reporting as callback:
            digest, expected = _stream(remote, what, tmp, callback)
        if not remote.matches(digest) or (expected is not None and digest != expected):
            pin = remote.sha256 or f"{expected} (the hub's for revision {remote.hub and remote.hub[1]})"
            raise BackboneError(f"download of {remote.url} for {what!r} has SHA-256 {digest}, not the pinned "
                                f"{pin}: refused and deleted")
        os.replace(tmp, target)
    finally:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
    return target


def _stream(remote: RemoteFile, what: str, tmp: Path, on_progress: Progress | None) -> tuple[str, str | None]:
    """Write the body of `remote.url` to `tmp`; (its SHA-256, the SHA-256 the hub vouches for or None)."""
    fail = f"cannot download weights for {what!r} from {remote.url}"
    request = urllib.request.Request(remote.url, headers={"User-Agent": "pipeline"})
    sha = hashlib.sha256()
    try:
        with urllib.request.urlopen(request, timeout=_timeout()) as response:  # noqa: S310 - pinned https URLs
            expected = _hub_expectation(remote, response.headers, fail)
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else remote.size
            done = 0
            with open(tmp, "wb") as fh:
                while chunk := response.read(_CHUNK):
                    fh.write(chunk)
                    sha.update(chunk)
                    done += len(chunk)
                    if on_progress is not None:
                        on_progress(done, total)
            if length and length.isdigit() and done != int(length):
                raise BackboneError(f"{fail}: the connection ended after {done} of {length} bytes; "
                                    f"nothing was kept, try again or {_where_to_put(remote)}")
    except BackboneError:
        raise
    except urllib.error.HTTPError as exc:
        raise BackboneError(f"{fail}: HTTP {exc.code} {exc.reason}; {_where_to_put(remote)}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
        reason = getattr(exc, "reason", None) or first_line(exc)
        if isinstance(exc, OSError) and exc.filename == str(tmp):
            raise BackboneError(f"{fail}: cannot write {tmp}: {exc.strerror}") from None
        raise BackboneError(f"{fail}: {reason} (timeout {_timeout():g} s, {TIMEOUT_ENV}); nothing was kept; "
                            f"{_where_to_put(remote)}") from None
    except Exception as exc:  # http.client.IncompleteRead and other protocol errors mid-body
        raise BackboneError(f"{fail}: {type(exc).__name__}: {first_line(exc)}; nothing was kept; "
                            f"{_where_to_put(remote)}") from None
    return sha.hexdigest(), expected


def _hub_expectation(remote: RemoteFile, headers, fail: str) -> str | None:
    """For a hub file pinned by revision only: the SHA-256 the hub states for it at that commit."""
    if remote.sha256 is not None:
        return None
    commit = headers.get("X-Repo-Commit")
    etag = (headers.get("X-Linked-Etag") or headers.get("ETag") or "").strip('W/"')
    if _COMMIT.fullmatch(remote.hub[1]) and commit != remote.hub[1]:
        raise BackboneError(f"{fail}: the hub answered for revision {commit or '(none stated)'}, not the pinned "
                            f"{remote.hub[1]}")
    if not re.fullmatch(r"[0-9a-f]{64}", etag):
        raise BackboneError(f"{fail}: the hub states no SHA-256 for it (ETag {etag or 'missing'}), and it has "
                            "no pin of its own")
    return etag
