"""Service limits and their defaults (no FastAPI import, so the CLI can show them)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_UPLOAD_BYTES = 64 * 2**20
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_FILES = 64
DEFAULT_WORKERS = 1
DEFAULT_MAX_QUEUE = 16
DEFAULT_MAX_REQUEST_PIXELS = 100_000_000
DEFAULT_REQUEST_TIMEOUT = 60.0
DEFAULT_BODY_TIMEOUT = 30.0
#: most images of concurrent requests scored in one model call: onnxruntime's fastest batch
#: (flawscope.runtime.DEFAULT_ONNX_BATCH)
DEFAULT_MICRO_BATCH = 8


@dataclass(frozen=True)
class Limits:
    """``max_upload_bytes``: largest request body; ``max_pixels``: largest image (w x h);
    ``max_files``: most images per request; ``workers``: inference threads; ``max_queue``:
    most requests waiting for a worker before 503; ``max_request_pixels``: most pixels of
    all images of one request together (413 beyond: one request cannot hold the worker for
    long); ``request_timeout``: seconds a request may take in the worker before it is
    abandoned with 504; ``body_timeout``: seconds a client may take to send its request body
    (408 beyond: slow clients cannot hold connections); ``micro_batch``: most images of
    concurrent requests scored in one model call (1: each request alone)."""

    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_files: int = DEFAULT_MAX_FILES
    workers: int = DEFAULT_WORKERS
    max_queue: int = DEFAULT_MAX_QUEUE
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    micro_batch: int = DEFAULT_MICRO_BATCH
