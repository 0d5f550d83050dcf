"""`pipeline serve`: a real uvicorn server on 127.0.0.1 (a free port), asked by a real HTTP client (httpx)."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

from pipeline.deploy.server import Predictor, bound_socket, create_app
from pipeline.deploy.settings import ServeSettings
from pipeline.heads.bundle import load_bundle
from pipeline.heads.predict import feature_options, predict_with

from .conftest import TINY, TINY_WIDE, make_folder
from .test_export import REJECT, fitted_heads

CLASSES = ["class0", "class1", "class2"]
LIMITS = ServeSettings(max_batch=8, max_wait_ms=30.0, max_request_mb=0.05, max_images=4)


class RunningServer:
    """A uvicorn server in a thread, on a free port of 127.0.0.1, stopped by `stop`."""

    def __init__(self, model: Path, settings: ServeSettings) -> None:
        self.predictor = Predictor(model)
        self.sock = bound_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.predictor, settings), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    paths = fitted_heads(root, {"fusion": ("pca_fusion", [f"{TINY}:head", f"{TINY_WIDE}:head"],
                                           {"components": 4, "C": 1.0}), **REJECT})
    test = make_folder(root / "test", classes=3, per_class=3, start_seed=200)
    server = RunningServer(paths["fusion"], LIMITS)
    yield root, paths, test, server
    server.stop()


def expected_probabilities(model: Path, data: Path, cache: Path) -> tuple[list[Path], np.ndarray]:
    bundle = load_bundle(model)
    result = predict_with(bundle, data, cache_dir=cache, progress=False, **feature_options(bundle, model))
    return result.features.paths, result.proba


def rows(answer: dict) -> np.ndarray:
    return np.array([[p["probabilities"][c] for c in CLASSES] for p in answer["predictions"]])


def test_health_and_model_describe_the_head(served):
    _root, paths, _test, server = served
    model = paths["fusion"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    described = httpx.get(f"{server.url}/model").json()
    assert described["classes"] == CLASSES and described["head"] == {"name": "fusion", "type": "pca_fusion"}
    assert [b["backbone"] for b in described["backbones"]] == [TINY, TINY_WIDE]
    assert described["inputs"]["images"]["center_crop"] == 32 and described["precision"] == "fp32"
    assert described["limits"]["max_images"] == 4 and described["model"] == str(model)
    assert {"scikit-learn", "torch"} <= set(described["versions"]["fitted with"])
    assert {"transfer-pipeline", "fastapi", "uvicorn", "openvino"} <= set(described["versions"]["serving with"])
    # fitted on OpenVINO features (the runtime `auto` picks on a CPU), so served by OpenVINO
    assert [s["runtime"] for s in described["backbones"]] == ["openvino", "openvino"]
    assert described["runtime"] == {TINY: "openvino", TINY_WIDE: "openvino"}


def test_a_head_fitted_on_torch_features_is_served_by_torch(tmp_path):
    """The server computes features with the runtime the head was fitted on (OpenVINO's differ from
    torch's in the last bits), so a torch head is served by torch and answers as `pipeline predict`."""
    model = fitted_heads(tmp_path, {"probe": ("logistic_regression", [f"{TINY}:head"], {})}, runtime="torch")["probe"]
    test = make_folder(tmp_path / "test", classes=3, per_class=2, start_seed=300)
    paths, expected = expected_probabilities(model, test, tmp_path / "cache")
    predictor = Predictor(model)
    assert predictor.network.runtimes == {TINY: "torch"}
    assert predictor.describe(LIMITS)["runtime"] == {TINY: "torch"}
    got = predictor.probabilities([predictor.decode(p.read_bytes()) for p in paths])
    assert np.abs(np.array(got) - expected).max() <= 1e-6


def test_multipart_and_raw_bytes_answer_as_pipeline_predict_does(served):
    root, models, test, server = served
    model = models["fusion"]
    paths, expected = expected_probabilities(model, test, root / "cache")
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths[:4]]
    answer = httpx.post(f"{server.url}/predict", files=files)
    assert answer.status_code == 200, answer.text
    assert [p["name"] for p in answer.json()["predictions"]] == [p.name for p in paths[:4]]
    assert np.abs(rows(answer.json()) - expected[:4]).max() <= 1e-5
    assert [p["class"] for p in answer.json()["predictions"]] == [CLASSES[i] for i in expected[:4].argmax(1)]
    assert all("top_class" not in p for p in answer.json()["predictions"])  # no reject threshold
    raw = httpx.post(f"{server.url}/predict", content=paths[5].read_bytes(),
                     headers={"content-type": "image/jpeg"}).json()
    assert raw["predictions"][0]["name"] is None and np.abs(rows(raw)[0] - expected[5]).max() <= 1e-5


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(served):
    root, models, test, server = served
    paths, expected = expected_probabilities(models["fusion"], test, root / "cache")
    before = httpx.get(f"{server.url}/health").json()

    def ask(i: int) -> np.ndarray:
        answer = httpx.post(f"{server.url}/predict", content=paths[i % len(paths)].read_bytes(), timeout=60)
        assert answer.status_code == 200, answer.text
        return rows(answer.json())[0]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(16)))
    assert np.abs(np.array(got) - expected[[i % len(paths) for i in range(16)]]).max() <= 1e-5
    after = httpx.get(f"{server.url}/health").json()
    assert after["images"] - before["images"] == 16
    assert after["batches"] - before["batches"] < 16  # some requests shared a forward pass


def test_a_head_with_reject_answers_unknown_with_the_top_class_and_probability_beside_it(served):
    """The server decides as `pipeline predict` does (`HeadBundle.decide`): below the reject threshold the
    class is unknown, and every answer of such a head gives the top class and its probability."""
    root, models, test, _server = served
    paths, expected = expected_probabilities(models["reject"], test, root / "cache")
    bundle = load_bundle(models["reject"])
    decisions = bundle.decide(expected)
    server = RunningServer(models["reject"], LIMITS)
    try:
        described = httpx.get(f"{server.url}/model").json()
        assert described["decision"]["reject_threshold"] == bundle.decision.reject_threshold is not None
        answers = []
        for start in range(0, len(paths), LIMITS.max_images):
            files = [("f", (p.name, p.read_bytes(), "image/jpeg")) for p in paths[start:start + LIMITS.max_images]]
            answer = httpx.post(f"{server.url}/predict", files=files, timeout=60)
            assert answer.status_code == 200, answer.text
            answers += answer.json()["predictions"]
    finally:
        server.stop()
    assert [a["class"] for a in answers] == decisions.answers(CLASSES)
    assert 0 < sum(a["class"] == "unknown" for a in answers) < len(answers)  # both kinds of answer
    assert [a["top_class"] for a in answers] == [CLASSES[i] for i in decisions.label]
    assert np.abs(np.array([a["top_probability"] for a in answers]) - decisions.top_probability).max() <= 1e-5
    assert np.abs(rows({"predictions": answers}) - expected).max() <= 1e-5


def _bomb() -> bytes:
    """A 17 kB PNG of 144 megapixels (over Pillow's limit of about 89): a decompression bomb."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_requests_are_answered_400_or_413_with_the_reason(served):
    _root, _models, test, server = served
    good = next(test.rglob("*.jpg")).read_bytes()
    cases = {
        "not an image": ([("f", ("a.jpg", good, "image/jpeg")), ("f", ("notes.jpg", b"hello", "image/jpeg"))],
                         400, "image 2 (notes.jpg): not an image (unknown format)"),
        "bomb": ([("f", ("huge.png", _bomb(), "image/png"))], 400,
                 "image 1 (huge.png): refused: decompression bomb"),
        "truncated": ([("f", ("cut.jpg", good[: len(good) // 3], "image/jpeg"))], 400, "image 1 (cut.jpg): corrupt"),
        "too many": ([("f", (f"{i}.jpg", good, "image/jpeg")) for i in range(5)], 400,
                     "5 images in one request, over the limit of 4"),
        "too large": ([("f", ("big.jpg", good + bytes(60_000), "image/jpeg"))], 413, "over the limit of 52428 bytes"),
    }
    for case, (files, status, reason) in cases.items():
        answer = httpx.post(f"{server.url}/predict", files=files)
        assert answer.status_code == status, (case, answer.text)
        assert reason in answer.json()["detail"], (case, answer.text)
    empty = httpx.post(f"{server.url}/predict", content=b"")
    assert empty.status_code == 400 and "no image in the request" in empty.json()["detail"]
    chunked = httpx.post(f"{server.url}/predict", content=iter([good, bytes(60_000)]))  # no Content-Length
    assert chunked.status_code == 413
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # and the server goes on


def test_the_serve_command_listens_answers_and_stops_on_ctrl_c(served):
    _root, paths, test, _server = served
    model = paths["fusion"]
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--model", str(model), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith(f"serving {model} on http://127.0.0.1:"), line + process.stderr.read()
        url = line.split(" on ")[1].split(" ")[0]
        image = next(test.rglob("*.jpg")).read_bytes()
        assert httpx.post(f"{url}/predict", content=image, timeout=60).json()["predictions"][0]["class"] in CLASSES
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)
    assert process.returncode == 0, process.stderr.read()
    assert process.stdout.read() == "stopped\n"


def test_serve_refuses_bad_settings_and_a_taken_port_in_one_line(served):
    from pipeline.cli.main import main

    _root, paths, _test, server = served
    model = paths["fusion"]
    port = server.url.rsplit(":", 1)[1]
    stderr = io.StringIO()
    sys_stderr, sys.stderr = sys.stderr, stderr
    try:
        assert main(["serve", "--model", str(model), "--max-batch", "0"]) == 2
        assert main(["serve", "--model", str(model), "--port", port]) == 2
    finally:
        sys.stderr = sys_stderr
    lines = stderr.getvalue().splitlines()
    assert lines[0] == "error: --max-batch must be a positive integer, not 0"
    assert lines[1].startswith(f"error: cannot listen on 127.0.0.1:{port}")
