"""Structured logs: one JSON object a line, with the request id of the request being served.

:func:`request_id_var` holds the id while a request is handled (set by the service's
middleware), so any log line written for it carries ``request_id``.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from datetime import datetime, timezone

request_id_var: ContextVar[str | None] = ContextVar("flawscope_request_id", default=None)

#: one line per request, and the reviews / prunes (who did what): like uvicorn's access log,
#: they do not propagate to the root logger; :func:`configure` gives them a handler
access_log = logging.getLogger("flawscope.access")
audit_log = logging.getLogger("flawscope.audit")
for _logger in (access_log, audit_log):
    _logger.propagate = False
    _logger.addHandler(logging.NullHandler())
    _logger.setLevel(logging.INFO)

#: ``LogRecord`` attributes that are not extra fields
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", "request_id", ...extra fields}``."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id_var.get()
        if rid:
            out["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class StderrHandler(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment (not the one at set-up, which a test
    harness may have replaced and closed since)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # noqa: D102
        import sys

        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure(level: str = "info", fmt: str = "json") -> None:
    """Route the ``flawscope`` (with its access and audit logs) and ``hypercorn`` loggers to
    stderr as JSON (or plain text)."""
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("flawscope", "flawscope.access", "flawscope.audit", "hypercorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
