"""Atomic writes: file mode from the umask, stale temporaries removed, early writability."""

from __future__ import annotations

import os
import time

import pytest

from flawscope.errors import ConfigError
from flawscope.io import atomic_write_bytes, check_writable, remove_stale_temporaries


def test_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write_bytes(tmp_path / "model.safetensors", b"x")
        assert (p.stat().st_mode & 0o777) == 0o644  # readable by a service account
        os.umask(0o077)
        q = atomic_write_bytes(tmp_path / "private.bin", b"x")
        assert (q.stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old)


def test_stale_temporaries_of_killed_writes_are_removed(tmp_path):
    target = tmp_path / "m.safetensors"
    stale = tmp_path / ".m.safetensors.abc123.tmp"
    fresh = tmp_path / ".m.safetensors.def456.tmp"  # maybe another process writing now
    other = tmp_path / ".other.abc.tmp"
    for p in (stale, fresh, other):
        p.write_bytes(b"half")
    hour_ago = time.time() - 7200
    os.utime(stale, (hour_ago, hour_ago))
    os.utime(other, (hour_ago, hour_ago))
    atomic_write_bytes(target, b"whole")
    assert target.read_bytes() == b"whole"
    assert not stale.exists() and fresh.exists() and other.exists()
    assert remove_stale_temporaries(target, older_than=-1) == [fresh]


def test_check_writable_names_the_path(tmp_path):
    assert check_writable(tmp_path / "new" / "m.safetensors").parent.is_dir()
    with pytest.raises(ConfigError, match="is a folder"):
        check_writable(tmp_path)
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=r"plain.txt/m.safetensors: cannot be written"):
        check_writable(a_file / "m.safetensors")  # its "folder" is a file (even root fails)
