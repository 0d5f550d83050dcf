"""`pipeline serve`: a saved head behind an HTTP server (FastAPI on uvicorn).

- `POST /predict`: one or several images as multipart form files (any field names), or the bytes of one
  image as the body. Answers `{"predictions": [{"name", "class", "probabilities": {class: p}}]}`, one per
  image in request order; `class` is decided by the head's rule (`unknown` below a reject threshold, with
  `top_class` and `top_probability` beside it for such a head). A body over the size limit is answered
  413, too many images or an image that cannot be decoded 400, with the reason (and which image) in
  `detail`.
- `GET /health`: `{"status": "ok", ...}` with the queue and batch counters.
- `GET /model`: the head (name, type, classes, sources, precision, metrics), the runtime of each backbone,
  what each input expects, the limits and batching, and the library versions.

Features come from the runtime the head's features came from, at the head's precision (`HeadNetwork.features`
with runtime auto, the code extraction runs: OpenVINO for a head fitted on OpenVINO features, torch where
OpenVINO cannot run), so answers match `pipeline predict`; `GET /model` says which runtime runs each
backbone. Decoding runs in the request's worker thread; the network runs in batches collected across
requests (`Batcher`).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from pipeline.deploy.batching import Batcher
from pipeline.deploy.network import HeadNetwork
from pipeline.deploy.settings import ServeSettings
from pipeline.heads.bundle import HeadBundle, load_bundle
from pipeline.images.decode import decode_bytes


class Predictor:
    """A loaded head and its backbones: decoded images -> probabilities -> answers."""

    def __init__(self, model: str | os.PathLike, device: str = "cpu", trust_pickle: bool = False) -> None:
        self.model = str(model)
        self.bundle: HeadBundle = load_bundle(model, trust_pickle)
        self.network = HeadNetwork(self.bundle, model, device, runtime="auto")
        self.classes = [self.bundle.classes[int(i)] for i in self.bundle.pipeline.classes_]
        self.geometries = {name: self.network.preprocess_for(name) for name in self.network.inputs}

    def decode(self, data: bytes) -> dict[str, np.ndarray] | str:
        """One image's network inputs (one per input geometry), or why it cannot be used."""
        inputs = {}
        for name, pre in self.geometries.items():
            image = decode_bytes(data, pre)
            if isinstance(image, str):
                return image
            inputs[name] = image
        return inputs

    def probabilities(self, images: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        """Decoded images -> one probability row each (a batch: one forward pass per backbone)."""
        batches = {name: np.stack([image[name] for image in images]) for name in self.geometries}
        return list(self.bundle.pipeline.predict_proba(self.network.features(batches)))

    def answer(self, row: np.ndarray, name: str | None) -> dict[str, Any]:
        """One image's answer, decided by the head's rule (`HeadBundle.decide`, as `pipeline predict`): `class`
        is the chosen class or `unknown` below a reject threshold, and a head with one also gives
        `top_class` and `top_probability` (what it would have said); the probabilities are unchanged."""
        decision = self.bundle.decide(row[np.newaxis])
        label = int(decision.label[0])
        answer: dict[str, Any] = {"name": name, "class": decision.answers(self.classes)[0]}
        if self.bundle.decision.reject_threshold is not None:
            answer.update(top_class=self.classes[label], top_probability=float(decision.top_probability[0]))
        return {**answer, "probabilities": {c: float(p) for c, p in zip(self.classes, row, strict=True)}}

    def describe(self, settings: ServeSettings) -> dict[str, Any]:
        import pipeline

        bundle = self.bundle
        libraries = {name: importlib.metadata.version(name) for name in ("torch", "fastapi", "uvicorn")}
        if "openvino" in self.network.runtimes.values():
            libraries["openvino"] = importlib.metadata.version("openvino")
        return {"model": self.model, "head": {"name": bundle.head.name, "type": bundle.head.type},
                "classes": self.classes, "backbones": [s.model_dump() for s in bundle.sources],
                "precision": self.network.precision, "device": self.network.device, "runtime": self.network.runtimes,
                "inputs": {name: g.describe() for name, g in self.network.inputs.items()},
                "metrics": bundle.metrics.model_dump(), "decision": bundle.decision.model_dump(),
                "limits": asdict(settings),
                "versions": {"fitted with": bundle.versions,
                             "serving with": {"transfer-pipeline": pipeline.__version__, **libraries}}}


async def _read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused (413) as soon as it passes `limit` bytes, whatever Content-Length says."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {int(declared)} bytes is over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"request body is over the limit of {limit} bytes")
    return bytes(body)


async def _images(request: Request, settings: ServeSettings) -> list[tuple[str | None, bytes]]:
    """(name, bytes) of each image of the request: the multipart form's files, or the whole body."""
    body = await _read_body(request, settings.max_request_bytes)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return [(None, body)] if body else []

    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=settings.max_images + 1,
                                     max_fields=settings.max_images + 1).parse()
    except MultiPartException as exc:
        raise HTTPException(400, f"cannot read the multipart body: {exc.message}") from None
    files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
    return [(upload.filename, await upload.read()) for upload in files]


def create_app(predictor: Predictor, settings: ServeSettings) -> FastAPI:
    batcher: Batcher = Batcher(predictor.probabilities, settings.max_batch, settings.max_wait_ms / 1000)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="transfer-pipeline", summary=f"predictions of head {predictor.bundle.head.name!r}",
                  lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "queued": batcher.queued, "batches": batcher.batches, "images": batcher.images}

    @app.get("/model")
    async def model() -> dict:
        return predictor.describe(settings)

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        images = await _images(request, settings)
        if not images:
            raise HTTPException(400, "no image in the request: send image files as multipart form fields, or the "
                                     "bytes of one image as the body")
        if len(images) > settings.max_images:
            raise HTTPException(400, f"{len(images)} images in one request, over the limit of {settings.max_images}")
        decoded = await run_in_threadpool(lambda: [predictor.decode(data) for _, data in images])
        bad = [f"image {i + 1}{f' ({name})' if name else ''}: {result}"
               for i, ((name, _), result) in enumerate(zip(images, decoded, strict=True)) if isinstance(result, str)]
        if bad:
            raise HTTPException(400, "; ".join(bad))
        rows = await batcher.submit(decoded)
        return {"predictions": [predictor.answer(row, name) for (name, _), row in zip(images, rows, strict=True)]}

    return app


def bound_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        from pipeline.core.errors import ConfigError

        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    return sock


def serve(model: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
          settings: ServeSettings | None = None, device: str = "cpu", trust_pickle: bool = False,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Load the head, listen on (host, port) and serve until Ctrl-C or SIGTERM; `on_ready(url)` once listening."""
    import uvicorn

    settings = settings or ServeSettings()
    app = create_app(Predictor(model, device, trust_pickle), settings)
    sock = bound_socket(host, port)
    address = sock.getsockname()
    url = f"http://{f'[{address[0]}]' if ':' in address[0] else address[0]}:{address[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    if on_ready:
        on_ready(url)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    except KeyboardInterrupt:  # uvicorn shuts down gracefully on Ctrl-C, then raises it again: a normal stop
        pass
    finally:
        sock.close()
