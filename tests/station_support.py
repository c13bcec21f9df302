"""Helpers of the station tests: a PostgreSQL server, `flawscope serve` subprocesses, load.

PostgreSQL: ``$FLAWSCOPE_TEST_POSTGRES`` (a URL, as ``.ci/run`` exports it), else a throwaway
cluster started here with Debian's ``initdb`` / ``pg_ctl`` (as the ``postgres`` user when run
as root); :func:`postgres_url` says why when neither works, and the tests skip with it.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"

#: a tiny NCAE that fits in seconds: the model behind the service tests
TINY = {"image_size": 32, "widths": [8, 16], "latent_channels": 8, "batch_size": 8,
        "epochs": 1, "progress": False, "device": "cpu"}


def tiny_model(data: Path, folder: Path) -> Path:
    """Fit :data:`TINY` on the good images of ``data`` and save it in ``folder``."""
    from flawscope.data.dataset import open_dataset
    from flawscope.pipeline import Inspector

    inspector = Inspector.train(open_dataset(data), "ncae", **TINY)
    return inspector.save(folder / "tile.safetensors")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- PostgreSQL
def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                  key=lambda d: int(Path(d).parent.name) if Path(d).parent.name.isdigit() else 0)
    return Path(dirs[-1]) if dirs else None


@contextmanager
def throwaway_cluster():
    """A PostgreSQL cluster in a temporary folder, on a Unix socket there; yields its URL
    (database ``postgres``, trust auth) or raises RuntimeError saying why it cannot."""
    pg = _pg_bin()
    if pg is None or not (pg / "initdb").exists():
        raise RuntimeError("no PostgreSQL server programs (initdb, pg_ctl): apt-get install "
                           "postgresql, or set FLAWSCOPE_TEST_POSTGRES to a database URL")
    root = Path(tempfile.mkdtemp(prefix="flawscope-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root
        if shutil.which("runuser") is None:
            raise RuntimeError("running as root and no runuser to start PostgreSQL as postgres")
        shutil.chown(root, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    try:
        subprocess.run([*run_as, str(pg / "initdb"), "-D", str(data), "-A", "trust",
                        "-U", "flawscope", "--no-sync"], check=True, capture_output=True,
                       timeout=120)
        subprocess.run([*run_as, str(pg / "pg_ctl"), "-D", str(data), "-l", str(root / "log"),
                        "-w", "-t", "60", "-o",
                        f"-k {root} -p {port} -c listen_addresses='' -c fsync=off "
                        "-c max_connections=200", "start"],
                       check=True, capture_output=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        out = getattr(exc, "stderr", b"") or b""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"could not start PostgreSQL ({exc}): "
                           f"{out.decode(errors='replace').strip()[-300:]}") from None
    try:
        yield f"postgresql://flawscope@/postgres?host={root}&port={port}"
    finally:
        subprocess.run([*run_as, str(pg / "pg_ctl"), "-D", str(data), "-m", "immediate",
                        "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(server_url: str) -> str:
    """A new, empty database on the server of ``server_url``; its URL."""
    import sqlalchemy as sa

    from flawscope.station.db import database_url

    name = "flawscope_test_" + uuid.uuid4().hex[:10]
    url = database_url(server_url)
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return url.set(database=name).render_as_string(hide_password=False).replace(
        "postgresql+psycopg://", "postgresql://")


# ---------------------------------------------------------------------------- servers
class Server:
    """`flawscope serve` in a subprocess on a free loopback port."""

    def __init__(self, model: Path, *args: str, env: dict[str, str] | None = None,
                 log: Path | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log or Path(tempfile.mkstemp(prefix="flawscope-serve-", suffix=".log")[1])
        self._out = open(self.log, "wb")  # noqa: SIM115 - open while the server runs
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flawscope", "serve", str(model), "--host", "127.0.0.1",
             "--port", str(self.port), "--device", "cpu", "--log-level", "warning", *args],
            env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1",
                 **(env or {})},
            stdout=self._out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> Server:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flawscope serve exited with {self.proc.returncode}: "
                                   f"{self.output()[-2000:]}")
            try:
                if httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"flawscope serve did not answer within {timeout} s")
            time.sleep(0.2)

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


def hammer(base: str, files: list[tuple[str, bytes]], clients: int, stop: threading.Event,
           acknowledged: list[int], answered: list[int], errors: list[str],
           per_request: int = 2) -> list[threading.Thread]:
    """``clients`` threads posting ``per_request`` images at a time until ``stop``; the
    record ids of every 200 answer go to ``acknowledged`` (``answered`` counts images)."""
    import httpx

    lock = threading.Lock()

    def run(k: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as http:
            i = k
            while not stop.is_set():
                batch = [files[(i + j) % len(files)] for j in range(per_request)]
                i += per_request
                try:
                    r = http.post("/v1/predict?heatmap=false", files=[
                        ("files", (name, data, "image/png")) for name, data in batch],
                        data={"station": f"client-{k}"})
                except httpx.TransportError:
                    if stop.is_set():
                        return
                    continue  # the server is gone (killed): nothing was acknowledged
                if r.status_code == 200:
                    ids = [x["record_id"] for x in r.json()["results"]]
                    with lock:
                        acknowledged.extend(ids)
                        answered.append(len(ids))
                elif r.status_code != 503:
                    with lock:
                        errors.append(f"{r.status_code}: {r.text[:200]}")

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    return threads
