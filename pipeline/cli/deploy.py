"""`pipeline export` and `pipeline serve`: a saved head as one ONNX model, or behind an HTTP server."""

from __future__ import annotations

import argparse

from pipeline.cli.main import TRUST_PICKLE_HELP
from pipeline.heads.spec import HEAD_SUFFIX


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.deploy.export import export_onnx

    result = export_onnx(args.head, args.out, trust_pickle=args.trust_pickle)
    for name, geometry in result.inputs.items():
        print(f"input {name}: uint8 RGB, N x {geometry['center_crop']} x {geometry['center_crop']} x 3 (shorter side "
              f"resized to {geometry['resize_shorter_side']} {geometry['interpolation']}, centre crop)")
    print(f"output probabilities: N x {len(result.classes)} ({', '.join(result.classes)})")
    print(f"wrote {result.path} ({result.bytes / 2**20:.1f} MiB, {result.seconds:.1f} s); onnxruntime agrees with "
          f"the torch path to {result.check_max_abs_diff:.1e} on random images")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.deploy.server import serve
    from pipeline.deploy.settings import ServeSettings

    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                             max_request_mb=args.max_request_mb, max_images=args.max_images)
    serve(args.model, args.host, args.port, settings, device=args.device, trust_pickle=args.trust_pickle,
          on_ready=lambda url: print(f"serving {args.model} on {url} (POST /predict, GET /health, GET /model; "
                                     "Ctrl-C stops)", flush=True))
    print("stopped")
    return 0


def add_deploy_parsers(sub: argparse._SubParsersAction) -> None:
    from pipeline.deploy.settings import ServeSettings
    from pipeline.features.settings import DEVICES

    export = sub.add_parser(
        "export", help="write a saved head and its backbone(s) as one ONNX model (images -> probabilities)",
        description="Write a saved head with its backbone(s), their pooling and layers, and the head's "
                    "standardisation, PCA, classifier and calibration as one ONNX model: input a batch of uint8 "
                    "RGB images (N x crop x crop x 3, after resizing the shorter side and centre-cropping; the "
                    "normalisation is inside), output the class probabilities. The class names, the preprocessing "
                    "and the head's decision rule (reject and two-class thresholds) are in the model's metadata. "
                    "The model is computed in fp32 and checked against the torch path before it "
                    "is written. See docs/guide/deploy.md.")
    export.add_argument("--head", required=True, metavar="FILE", help=f"a saved head ({HEAD_SUFFIX})")
    export.add_argument("--out", required=True, metavar="FILE", help="the ONNX model to write (.onnx)")
    export.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)
    export.set_defaults(func=cmd_export)

    serve = sub.add_parser(
        "serve", help="serve a saved head over HTTP (POST /predict, GET /health, GET /model)",
        description="Serve a saved head over HTTP with FastAPI and uvicorn, computing features with the runtime "
                    "(OpenVINO or torch) and precision the head's features came from, as `pipeline predict` does "
                    "(GET /model says which runtime). POST /predict takes one or several images "
                    "(multipart form fields, or the raw bytes of one image as the body) and answers the classes and "
                    "probabilities per image; concurrent requests are batched. See docs/guide/deploy.md.")
    serve.add_argument("--model", required=True, metavar="FILE", help=f"a saved head ({HEAD_SUFFIX})")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    defaults = ServeSettings()
    serve.add_argument("--max-batch", type=int, default=defaults.max_batch, metavar="N",
                       help="most images per forward pass (default: %(default)s)")
    serve.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms, metavar="MS",
                       help="how long a batch waits for more images before it runs (default: %(default)s)")
    serve.add_argument("--max-request-mb", type=float, default=defaults.max_request_mb, metavar="MB",
                       help="largest request body accepted, in MiB (default: %(default)s)")
    serve.add_argument("--max-images", type=int, default=defaults.max_images, metavar="N",
                       help="most images in one request (default: %(default)s)")
    serve.add_argument("--device", default="cpu", choices=DEVICES, help="where the network runs (default: cpu)")
    serve.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)
    serve.set_defaults(func=cmd_serve)
