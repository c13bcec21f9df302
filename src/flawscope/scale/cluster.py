"""Connecting to Ray: a running cluster (``--address``) or a local instance started here."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

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
    """
    require_ray()
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        yield
        return
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise ConfigError(f"--address {address}: no Ray cluster there ({exc})") from None
    try:
        yield
    finally:
        ray.shutdown()


def quiet_ray_data() -> None:
    """No progress bars or per-operator log lines from Ray Data: flawscope prints progress."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    for name in ("ray.data", "ray.data._internal"):
        logging.getLogger(name).setLevel(logging.WARNING)


def cluster_cpus() -> int:
    """CPUs of the connected cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
