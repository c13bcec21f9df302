"""The service's refusals: :class:`UploadError` and the JSON error body."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


class UploadError(Exception):
    """A request the service refuses: HTTP ``status``, a message, the upload's name."""

    def __init__(
        self, status: int, message: str, file: str | None = None, index: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.file = file
        self.index = index


def error_response(
    status: int, message: str, file: str | None = None, index: int | None = None,
    **headers: str,
) -> JSONResponse:
    content: dict[str, Any] = {"detail": message}
    if file is not None:
        content["file"] = file
    if index is not None:
        content["index"] = index
    return JSONResponse(content, status_code=status, headers=headers or None)


def mebibytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"

