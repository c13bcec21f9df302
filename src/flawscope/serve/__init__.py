"""Inspection service: JSON API + inspection web page (FastAPI), see :mod:`.app`.

``create_app`` is imported lazily, so :mod:`flawscope.serve.limits` works without FastAPI.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from flawscope.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'flawscope.serve' has no attribute {name!r}")
