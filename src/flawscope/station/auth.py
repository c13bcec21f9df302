"""API keys and roles: ``inspect`` (send images), ``review`` (records and reviews), ``admin``
(everything). A key comes as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``.

Keys are held only as SHA-256 digests and compared with :func:`hmac.compare_digest` against
every known key (no early exit), so neither the comparison time nor a memory dump gives a key
away; they are never logged (logs name the key's owner).

Keys file (``--keys FILE``), one key a line, ``#`` comments::

    # NAME       ROLES            KEY (at least 16 characters) or sha256:<hex of the key>
    camera-3     inspect          k7Jq2...
    anna         review           sha256:<the 64 hex digits of the key's SHA-256>
    ops          admin            ...
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path

from flawscope.errors import ConfigError

ROLES = ("inspect", "review", "admin")
MIN_KEY_LENGTH = 16
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_HASHED = re.compile(r"^sha256:([0-9a-fA-F]{64})$")


@dataclass(frozen=True)
class Principal:
    """Who a key belongs to and what it may do."""

    name: str
    roles: frozenset[str]

    def may(self, role: str) -> bool:
        return role in self.roles or "admin" in self.roles


@dataclass(frozen=True)
class _Entry:
    principal: Principal
    digest: bytes


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyRing:
    """The accepted keys. Empty: every request is allowed (no keys configured)."""

    def __init__(self, entries: list[tuple[str, frozenset[str], bytes]] = ()) -> None:
        self._entries = [_Entry(Principal(name, roles), digest)
                         for name, roles, digest in entries]

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    @classmethod
    def single(cls, key: str, name: str = "api-key") -> KeyRing:
        """``--api-key KEY``: one key with every role."""
        _check_key(key, "--api-key")
        return cls([(name, frozenset(ROLES), key_digest(key))])

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> KeyRing:
        """A keys file (see the module doc); errors name the file and line."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--keys {p}: cannot read ({exc.__class__.__name__}: "
                              f"{getattr(exc, 'strerror', None) or exc})") from None
        entries: list[tuple[str, frozenset[str], bytes]] = []
        names: set[str] = set()
        digests: set[bytes] = set()
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            where = f"--keys {p}, line {n}"
            parts = line.split()
            if len(parts) != 3:
                raise ConfigError(f"{where}: expected NAME ROLES KEY (3 fields), got "
                                  f"{len(parts)}")
            name, roles_text, key = parts
            if not _NAME.match(name):
                raise ConfigError(f"{where}: name {name!r}: letters, digits, _ . @ - only")
            if name in names:
                raise ConfigError(f"{where}: name {name!r} appears twice")
            roles = frozenset(r.strip() for r in roles_text.split(",") if r.strip())
            unknown = sorted(roles - set(ROLES))
            if unknown or not roles:
                raise ConfigError(f"{where}: roles {roles_text!r}: each one of "
                                  f"{', '.join(ROLES)}")
            m = _HASHED.match(key)
            if m:
                digest = bytes.fromhex(m.group(1))
            else:
                _check_key(key, where)
                digest = key_digest(key)
            if digest in digests:
                raise ConfigError(f"{where}: the same key as an earlier line")
            names.add(name)
            digests.add(digest)
            entries.append((name, roles, digest))
        if not entries:
            raise ConfigError(f"--keys {p}: no keys in the file")
        return cls(entries)

    def identify(self, presented: str | None) -> Principal | None:
        """The owner of ``presented``, or None. Compares against every key, in constant
        time per key."""
        if not presented:
            return None
        digest = key_digest(presented)
        found = None
        for entry in self._entries:
            if hmac.compare_digest(digest, entry.digest) and found is None:
                found = entry.principal
        return found


def _check_key(key: str, where: str) -> None:
    if len(key) < MIN_KEY_LENGTH:
        raise ConfigError(f"{where}: the key is shorter than {MIN_KEY_LENGTH} characters; use "
                          "a long random one, e.g. python -c \"import secrets; "
                          "print(secrets.token_urlsafe(32))\"")


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key of a request: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``."""
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return None
