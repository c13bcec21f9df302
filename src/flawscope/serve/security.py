"""Who may call what: a FastAPI dependency per role over :class:`~flawscope.station.auth.KeyRing`.

No key configured: everything is allowed (the service binds to localhost by default). With
keys, every endpoint but ``/healthz`` and the static page files needs one: missing or unknown
401 (``WWW-Authenticate: Bearer``), known but without the role 403.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request

from flawscope.serve.errors import UploadError
from flawscope.station.auth import KeyRing, Principal, presented_key


class AuthError(UploadError):
    """401 / 403 (an :class:`UploadError`: the same JSON error body)."""


def requirement(keys: KeyRing, role: str | None) -> Callable[[Request], Any]:
    """A dependency admitting requests whose key has ``role`` (None: any valid key)."""

    async def check(request: Request) -> Principal | None:
        if not keys.enabled:
            return None
        key = presented_key(request.headers.get("authorization"),
                            request.headers.get("x-api-key"))
        if key is None:
            raise AuthError(401, "an API key is required: send 'Authorization: Bearer KEY' "
                            "or 'X-API-Key: KEY'")
        who = keys.identify(key)
        if who is None:
            raise AuthError(401, "unknown API key")
        request.state.key_name = who.name
        if role is not None and not who.may(role):
            raise AuthError(403, f"the key of {who.name!r} lacks the role {role!r} needed "
                            f"here (it has: {', '.join(sorted(who.roles))})")
        return who

    return check
