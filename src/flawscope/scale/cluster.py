"""Connecting to Ray: a running cluster (``--address``) or a local instance started here."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import flawscope
from flawscope.errors import ConfigError


def require_ray() -> None:
    """Import Ray Data, or raise :class:`ConfigError` with the install hint."""
    try:
        import pyarrow  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"the Ray engine needs Ray Data ({exc}): "
                          'pip install "flawscope[ray]"') from None


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Use Ray inside the block.

    Already initialised (e.g. by a caller or a test): used as it is. ``address`` (``auto``,
    ``ray://host:10001``, ``host:6379``): connect to that cluster. Neither: start a local
    instance with ``num_cpus`` (default: all cores) and shut it down after the block.
    Either way this process's flawscope package is shipped to the workers (Ray
    ``runtime_env`` ``py_modules``).
    """
    require_ray()
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        yield
        return
    if address:
        check_reachable(address)
    # this flawscope travels with the job: workers run the driver's code, whatever version
    # (if any) the nodes have installed; they need its dependencies
    code = {"py_modules": [str(Path(flawscope.__file__).parent)]}
    try:
        if address:
            ray.init(address=address, runtime_env=code, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=code,
                     logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise ConfigError(f"--address {address}: no Ray cluster there ({exc})") from None
    try:
        yield
    finally:
        ray.shutdown()


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail at once, in one line, when nothing answers at a ``HOST:PORT`` or
    ``ray://HOST:PORT`` address (Ray itself retries for minutes); ``auto`` is left to Ray."""
    import socket

    hostport = address.removeprefix("ray://").rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"--address {address}: no Ray cluster answers there "
                          f"({exc.strerror or exc})") from None


def quiet_ray_data() -> None:
    """No progress bars or per-operator log lines from Ray Data: flawscope prints progress."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # "Progress bars disabled": we know, flawscope prints its own
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def cluster_cpus() -> int:
    """CPUs of the connected cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
