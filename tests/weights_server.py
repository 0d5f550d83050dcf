"""A real HTTP server on 127.0.0.1 for the download tests: serves files from memory, with the hub's
headers when asked, and misbehaves on request (cuts the body short, stalls, answers 404)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Served:
    body: bytes
    truncate: bool = False  # announce the whole length, send half, close
    stall_s: float = 0.0  # wait this long before answering
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class WeightsServer:
    port: int
    files: dict[str, Served] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def serve(self, path: str, body: bytes, **options) -> str:
        self.files[path] = Served(body, **options)
        return self.url(path)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def downloads_allowed(monkeypatch, root: Path) -> Path:
    """Empty torch and Hugging Face caches under `root`, no weights folder, downloads allowed (conftest
    turns them off for every other test); monkeypatch restores it all."""
    for name in ("PIPELINE_OFFLINE", "HF_HUB_OFFLINE", "PIPELINE_WEIGHTS", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(root / "torch"))
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    return root


def checkpoints(root: Path) -> list[str]:
    """The files in the torch hub cache of `downloads_allowed(root)`."""
    folder = root / "torch" / "hub" / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@contextmanager
def weights_server() -> Iterator[WeightsServer]:
    state = WeightsServer(0)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.lstrip("/")
            state.requests.append(path)
            served = state.files.get(path)
            if served is None:
                self.send_error(404, "Not Found")
                return
            time.sleep(served.stall_s)
            self.send_response(200)
            self.send_header("Content-Length", str(len(served.body)))
            for key, value in served.headers.items():
                self.send_header(key, value)
            self.end_headers()
            body = served.body[: len(served.body) // 2] if served.truncate else served.body
            self.wfile.write(body)
            self.wfile.flush()
            if served.truncate:
                self.close_connection = True

        def log_message(self, *_args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
