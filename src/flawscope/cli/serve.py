"""``flawscope serve | export``: the inspection service and ONNX export."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
from pathlib import Path

from flawscope.cli.common import RUNTIMES, add_legacy_option, check_model_path, check_paths
from flawscope.errors import ConfigError

#: the record database ``flawscope serve`` writes by default (in the working directory)
DEFAULT_DB = "flawscope-records.db"


def add_commands(sub: argparse._SubParsersAction) -> None:
    from flawscope.serve.limits import Limits

    limits = Limits()  # the service's defaults

    srv = sub.add_parser(
        "serve", help="HTTP inspection service and web page for a model",
        description="Serve MODEL (a flawscope model file or an exported .onnx): POST "
        "/v1/predict, GET /v1/model, GET /healthz, the inspection page at / and the API docs "
        "at /docs. Every verdict is recorded (--db) before it is answered; the review page is "
        "at /review, metrics at /metrics. With --classifier, every image is also given a "
        "class + state label.",
    )
    srv.add_argument("model", metavar="MODEL")
    add_legacy_option(srv)
    srv.add_argument("--classifier", metavar="CLASSIFIER",
                     help="a class + state classifier (`flawscope classify fit` model file or "
                     "its `classify export` .onnx) run on every image next to MODEL: each "
                     "result gains 'classification' (label, class, state, probability)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                     "127.0.0.1; 0.0.0.0 for every interface)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max-upload-mb", type=float, default=limits.max_upload_bytes / 2**20,
                     help="largest request body in MiB (default %(default)g)")
    srv.add_argument("--max-pixels", type=int, default=limits.max_pixels,
                     help="largest image, width x height (default %(default)d)")
    srv.add_argument("--max-files", type=int, default=limits.max_files,
                     help="most images per request (default %(default)d)")
    srv.add_argument("--workers", type=int, default=limits.workers,
                     help="inference threads (default %(default)d)")
    srv.add_argument("--max-queue", type=int, default=limits.max_queue,
                     help="requests allowed to wait for a worker before 503 (default "
                     "%(default)d)")
    srv.add_argument("--max-request-pixels", type=int, default=limits.max_request_pixels,
                     help="most pixels of all images in one request together, 413 beyond "
                     "(default %(default)d)")
    srv.add_argument("--request-timeout", type=float, default=limits.request_timeout,
                     help="seconds one request may use the worker, 504 beyond (default "
                     "%(default)g)")
    srv.add_argument("--body-timeout", type=float, default=limits.body_timeout,
                     help="seconds a client may take to send a request body, 408 beyond "
                     "(default %(default)g)")
    srv.add_argument("--micro-batch", type=int, default=limits.micro_batch, metavar="N",
                     help="most images of concurrent requests scored in one model call "
                     "(default %(default)d; 1: each request alone)")
    srv.add_argument("--header-timeout", type=float, default=10.0,
                     help="seconds a connection may stay open without a complete request "
                     "(headers sent slowly or not at all, or idle between requests) before "
                     "it is closed (default %(default)g)")
    rec = srv.add_argument_group("records (docs/station.md)")
    rec.add_argument("--db", default=DEFAULT_DB, metavar="DB",
                     help="record every verdict in DB before answering: a SQLite file "
                     "(default %(default)s in the working directory) or "
                     "postgresql://USER@HOST/NAME; 'off': record nothing")
    rec.add_argument("--images", metavar="DIR",
                     help="folder of the kept images (default: next to a SQLite DB, "
                     "DB-stem.images/)")
    rec.add_argument("--keep-goods", type=float, default=0.01, metavar="SHARE",
                     help="share of OK images kept for review (every defect image is kept; "
                     "default %(default)g)")
    rec.add_argument("--retain-days", type=float, metavar="DAYS",
                     help="delete kept images older than DAYS, except reviewed records'")
    rec.add_argument("--retain-gb", type=float, metavar="GB",
                     help="keep the image folder under GB gigabytes (oldest first), except "
                     "reviewed records' images")
    sec = srv.add_argument_group("access")
    sec.add_argument("--api-key", metavar="KEY",
                     help="require this key (every role) on every endpoint but /healthz; "
                     "the environment variable FLAWSCOPE_API_KEY does the same without "
                     "showing the key in the process list")
    sec.add_argument("--keys", metavar="FILE",
                     help="keys file: NAME ROLES KEY per line, roles inspect, review, admin "
                     "(docs/station.md)")
    srv.add_argument("--log-format", default="json", choices=["json", "text"],
                     help="log lines as JSON objects with the request id (default) or text")
    srv.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    srv.add_argument(
        "--runtime", choices=RUNTIMES, default="auto",
        help="what scores the images: auto (default) = the model's cached onnxruntime graph "
        "when the model runs on the CPU and onnxruntime is installed; without one (a model "
        "not written by fit or calibrate) the service starts in PyTorch, exports the model in "
        "the background and switches when it is ready (once per model file); onnxruntime = "
        "export before starting if needed; torch")
    srv.add_argument("--log-level", default="info",
                     choices=["critical", "error", "warning", "info", "debug"])
    srv.set_defaults(func=cmd_serve)

    exp = sub.add_parser(
        "export", help="export a model to ONNX (threshold and preprocessing inside)",
        description="Export MODEL to ONNX: input uint8 N x C x H x W pixels at the model's "
        "input size; outputs score, normalized_score, anomaly_map, is_defect; threshold, "
        "normalisation, input size and flawscope version in the metadata. The file is written "
        "only if onnxruntime reproduces the PyTorch scores within 1e-4.",
    )
    exp.add_argument("model", metavar="MODEL")
    add_legacy_option(exp)
    exp.add_argument("--format", default="onnx", choices=["onnx"])
    exp.add_argument("-o", "--output", required=True, metavar="FILE")
    exp.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "torchscript"],
                     help="torch.onnx exporter (auto: dynamo, falling back to torchscript)")
    exp.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    exp.add_argument("--check-images", metavar="IMAGE_OR_DIR", nargs="+",
                     help="real images to add to the parity check")
    exp.set_defaults(func=cmd_export)


def _has_serve_deps() -> bool:
    try:
        import fastapi  # noqa: F401
        import hypercorn  # noqa: F401
        import prometheus_client  # noqa: F401
        import sqlalchemy  # noqa: F401
    except ImportError:
        return False
    try:
        import python_multipart  # noqa: F401
    except ImportError:  # python-multipart before 0.0.13
        try:
            import multipart  # noqa: F401
        except ImportError:
            return False
    return True


def _check_bind(host: str, port: int) -> None:
    """Fail early, in one line, when the address cannot be listened on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: cannot resolve ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            why = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise ConfigError(f"cannot listen on {host}:{port}: {why}") from None


def _keys(args: argparse.Namespace):
    from flawscope.station.auth import KeyRing

    key = args.api_key or os.environ.get("FLAWSCOPE_API_KEY") or None
    if key and args.keys:
        raise ConfigError("--api-key and --keys: give one of them")
    if args.keys:
        return KeyRing.from_file(args.keys)
    return KeyRing.single(key) if key else KeyRing()


def cmd_serve(args: argparse.Namespace) -> int:
    check_model_path(args.model)  # before torch is imported
    check_model_path(args.classifier, "--classifier")
    if not _has_serve_deps():
        raise ConfigError("flawscope serve needs the serve extra: pip install 'flawscope[serve]'")
    import asyncio

    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    from flawscope.serve import create_app
    from flawscope.station.logs import configure
    from flawscope.station.store import Retention

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: must be 0-65535")
    if args.max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb {args.max_upload_mb}: must be positive")
    if not args.header_timeout > 0:
        raise ConfigError(f"--header-timeout {args.header_timeout}: must be positive")
    keys = _keys(args)
    retention = Retention(args.retain_days, None if args.retain_gb is None
                          else int(args.retain_gb * 1e9))
    db = None if args.db.strip().lower() in ("off", "none", "") else args.db
    if db is None and (args.images or retention.active):
        raise ConfigError("--images / --retain-*: need a database (--db is off)")
    _check_bind(args.host, args.port)
    app = create_app(
        args.model, max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels,
        max_files=args.max_files, workers=args.workers, max_queue=args.max_queue,
        max_request_pixels=args.max_request_pixels, request_timeout=args.request_timeout,
        body_timeout=args.body_timeout, micro_batch=args.micro_batch,
        device=args.device, runtime=args.runtime, classifier=args.classifier,
        db=db, images=args.images, keep_goods=args.keep_goods, retention=retention,
        keys=keys,
    )
    service, store = app.state.service, app.state.store
    shown = f"[{args.host}]" if ":" in args.host else args.host
    clf = "" if service.classifier is None else (
        f" with classifier {args.classifier} ({len(service.classifier.labels)} labels)")
    print(f"serving {args.model} ({service.inspector.metadata()['model']}, {service.runtime})"
          f"{clf} at http://{shown}:{args.port}/  (API docs: /docs)", file=sys.stderr,
          flush=True)
    if store is None:
        print("recording nothing (--db off)", file=sys.stderr, flush=True)
    else:
        print(f"recording every verdict in {store.display_url} (images: {store.images.root}, "
              f"{args.keep_goods:.2%} of OK parts kept); review page: "
              f"http://{shown}:{args.port}/review", file=sys.stderr, flush=True)
    if not keys.enabled and not _is_loopback(args.host):
        print(f"warning: listening on {args.host} without API keys: anyone who can reach it "
              "may send images and read records; use --keys or --api-key", file=sys.stderr,
              flush=True)
    configure(args.log_level, args.log_format)  # only now: a failed start changes nothing
    config = Config()
    config.bind = [f"{shown}:{args.port}"]
    config.keep_alive_timeout = args.header_timeout  # also closes half-sent requests
    config.graceful_timeout = 5
    config.accesslog = None  # one JSON line per request comes from the app
    config.errorlog = logging.getLogger("hypercorn.error")  # JSON, as set by configure()
    asyncio.run(serve(app, config))
    return 0


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_export(args: argparse.Namespace) -> int:
    check_model_path(args.model)  # before torch is imported
    check_paths(args.check_images, "--check-images")
    from flawscope.data.images import expand_images
    from flawscope.errors import ModelFileError
    from flawscope.export import export_onnx
    from flawscope.runtime import is_classifier_file

    out = Path(args.output)
    check = expand_images(args.check_images) if args.check_images else None
    try:
        path, report = export_onnx(args.model, out, exporter=args.exporter, opset=args.opset,
                                   check_images=check)
    except ModelFileError:
        if is_classifier_file(args.model):
            raise ModelFileError(
                f"{args.model}: is a class + state classifier, not an anomaly detector: use "
                f"`flawscope classify export {args.model} -o {args.output}`") from None
        raise
    print(f"parity checked on {report.images} images: max |score difference| "
          f"{report.max_abs:.3g}, verdicts identical", file=sys.stderr)
    print(f"ONNX model written to {path}")
    return 0
