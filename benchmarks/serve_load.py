"""A bounded load test of `pipeline serve` on 127.0.0.1: latency on an idle server, throughput under 8 clients.

    python benchmarks/serve_load.py --head runs/bench/logreg.skops [--rounds 3]

Starts `pipeline serve --model HEAD --port 0` in its own process and, `--rounds` times, alternates:
(a) idle: one client sends `--idle` single-image requests one after the other (a 224 px JPEG of flowers12's
test split each time), p50 and p99 latency; (b) load: `--clients` clients (threads, each with its own
HTTP connection) send `--requests` single-image requests each as fast as answers come, throughput in
images/s and p50/p99 latency; (c) the runtime alone: the server's computation (`Predictor.probabilities`,
at the head's precision on the runtime the server uses, OpenVINO for a head fitted on OpenVINO features) on
decoded images in memory, batches of 32, in this process while the server is idle. The load's throughput is
compared with (c). Every loop is bounded; the server is stopped at the end. Prints medians and writes
runs/bench/serve_load.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from pipeline.deploy.server import Predictor
from pipeline.images.data import scan

ROOT = Path(__file__).resolve().parents[1]


def start_server(head: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--model", head, "--port", "0"],
                               stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if " on http://" not in line:
        process.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return process, line.split(" on ")[1].split(" ")[0]


def timed_requests(url: str, photos: list[bytes], count: int, offset: int = 0) -> list[float]:
    times = []
    with httpx.Client(timeout=60) as client:
        for i in range(count):
            started = time.perf_counter()
            answer = client.post(f"{url}/predict", content=photos[(offset + i) % len(photos)])
            answer.raise_for_status()
            times.append((time.perf_counter() - started) * 1000)
    return times


def load(url: str, photos: list[bytes], clients: int, requests: int) -> tuple[float, list[float]]:
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        per_client = list(pool.map(lambda c: timed_requests(url, photos, requests, c * 7), range(clients)))
    elapsed = time.perf_counter() - started
    return clients * requests / elapsed, [t for times in per_client for t in times]


def runtime_alone(predictor: Predictor, decoded: list[dict], batch: int = 32) -> float:
    started = time.perf_counter()
    for start in range(0, len(decoded) - batch + 1, batch):
        predictor.probabilities(decoded[start:start + batch])
    return (len(decoded) // batch * batch) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head", required=True, help="a saved head (.skops)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/flowers12/test"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=int, default=100, help="sequential requests per round on the idle server")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=24, help="requests per client per round under load")
    parser.add_argument("--out", default="runs/bench/serve_load.json")
    args = parser.parse_args()

    photos = [p.read_bytes() for p in scan(args.data).paths[:96]]
    predictor = Predictor(args.head)
    decoded = [predictor.decode(data) for data in photos]
    process, url = start_server(args.head)
    rounds: dict[str, list[float]] = {key: [] for key in ("idle_p50_ms", "idle_p99_ms", "load_images_per_s",
                                                          "load_p50_ms", "load_p99_ms", "runtime_alone_per_s")}
    try:
        timed_requests(url, photos, 10)  # warm-up
        runtime_alone(predictor, decoded)
        for _ in range(args.rounds):
            idle = timed_requests(url, photos, args.idle)
            rounds["idle_p50_ms"].append(float(np.percentile(idle, 50)))
            rounds["idle_p99_ms"].append(float(np.percentile(idle, 99)))
            rate, times = load(url, photos, args.clients, args.requests)
            rounds["load_images_per_s"].append(rate)
            rounds["load_p50_ms"].append(float(np.percentile(times, 50)))
            rounds["load_p99_ms"].append(float(np.percentile(times, 99)))
            rounds["runtime_alone_per_s"].append(runtime_alone(predictor, decoded))
            print(", ".join(f"{key} {values[-1]:.1f}" for key, values in rounds.items()), flush=True)
        health = httpx.get(f"{url}/health").json()
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)
    summary = {key: statistics.median(values) for key, values in rounds.items()}
    ratio = summary["load_images_per_s"] / summary["runtime_alone_per_s"]
    print(f"idle server, one {len(photos[0]) // 1024} kB JPEG a request: p50 {summary['idle_p50_ms']:.1f} ms, "
          f"p99 {summary['idle_p99_ms']:.1f} ms")
    print(f"{args.clients} clients: {summary['load_images_per_s']:.1f} images/s (p50 {summary['load_p50_ms']:.1f} ms, "
          f"p99 {summary['load_p99_ms']:.1f} ms); runtime alone {summary['runtime_alone_per_s']:.1f} images/s; "
          f"ratio {ratio:.2f}")
    print(f"runtime: {predictor.network.runtimes}, precision {predictor.network.precision}")
    print(f"server batches: {health['batches']} for {health['images']} images "
          f"({health['images'] / max(health['batches'], 1):.1f} a batch)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"head": args.head, "precision": predictor.network.precision,
                               "runtime": predictor.network.runtimes,
                               "machine": platform.processor() or platform.machine(), "summary": summary,
                               "ratio": ratio, "rounds": rounds, "server": health}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
