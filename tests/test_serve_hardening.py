"""The service under abuse (issue 29): a large request does not starve a small one, and
half-sent request headers do not hold a connection."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("hypercorn")

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from flawscope.serve import create_app  # noqa: E402
from flawscope.serve.scheduler import PREPARE, SCORE, Batch, FairScheduler  # noqa: E402
from station_support import Server, free_port, tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def model_path(synthetic_root, tmp_path_factory) -> Path:
    return tiny_model(synthetic_root / "tile", tmp_path_factory.mktemp("hardening"))


# ---------------------------------------------------------------------------- fairness
def test_the_scheduler_serves_waiting_requests_in_turn():
    order: list[str] = []
    first_piece = threading.Event()
    small_waiting = threading.Event()

    def job(name: str, pieces: int):
        for i in range(pieces):
            if name == "big" and i == 0:
                first_piece.set()
                small_waiting.wait(5)  # the small request arrives during the first piece
            order.append(f"{name}{i}")
            yield PREPARE
        return name

    sched = FairScheduler({PREPARE: 1, SCORE: 1})
    big = sched.submit(job("big", 6))
    assert first_piece.wait(5)
    small = sched.submit(job("small", 2))
    small_waiting.set()
    assert (big.result(5), small.result(5)) == ("big", "small")
    sched.shutdown()
    # one piece of the large request, then they alternate: not all of the large one first
    assert order[:4] == ["big0", "small0", "big1", "small1"], order


def test_a_job_is_told_whether_others_wait_in_its_lane():
    seen: list[tuple[str, bool]] = []
    hold = threading.Event()

    def job(tag: str):
        if tag == "a":
            hold.wait(5)  # b arrives meanwhile
        busy = yield SCORE
        seen.append((tag, busy))
        return tag

    sched = FairScheduler({PREPARE: 1, SCORE: 1})
    a = sched.submit(job("a"), lane=SCORE)
    b = sched.submit(job("b"), lane=SCORE)
    hold.set()
    assert (a.result(5), b.result(5)) == ("a", "b")
    sched.shutdown()
    # a scores again while b waits (so: one image at a time); b is then alone (all at once)
    assert seen == [("a", True), ("b", False)]


# ---------------------------------------------------------------------------- micro-batching
def _batched_jobs(parts, *, limit: int, run, keys=None):
    """Score-lane jobs, one per part, queued while the lane is held; returns the futures."""
    hold, holding = threading.Event(), threading.Event()

    def blocker():
        holding.set()
        hold.wait(5)
        return "blocker"
        yield  # a generator

    def job(i, part):
        got = yield Batch(SCORE, keys[i] if keys else "k", part, 1, limit, run)
        return got

    sched = FairScheduler({PREPARE: 1, SCORE: 1})
    first = sched.submit(blocker(), lane=SCORE)
    assert holding.wait(5)
    futures = [sched.submit(job(i, part)) for i, part in enumerate(parts)]
    deadline = time.monotonic() + 5
    while sched.waiting_in(SCORE) < len(parts):  # each waits there with its batch
        assert time.monotonic() < deadline
        time.sleep(0.01)
    hold.set()
    assert first.result(5) == "blocker"
    return sched, futures


def test_waiting_batches_share_one_call_up_to_the_limit():
    calls = []

    def run(parts):
        calls.append(list(parts))
        return [p * 10 for p in parts]

    sched, futures = _batched_jobs([0, 1, 2, 3, 4], limit=3, run=run)
    assert [f.result(5) for f in futures] == [0, 10, 20, 30, 40]  # each gets its own part
    sched.shutdown()
    assert calls == [[0, 1, 2], [3, 4]]  # in queue order, at most 3 items per call


def test_batches_of_other_keys_are_not_mixed():
    calls = []

    def run(parts):
        calls.append(list(parts))
        return list(parts)

    sched, futures = _batched_jobs([0, 1, 2, 3], limit=8, run=run, keys=["a", "b", "a", "b"])
    assert [f.result(5) for f in futures] == [0, 1, 2, 3]
    sched.shutdown()
    assert calls == [[0, 2], [1, 3]]


def test_a_failing_part_fails_only_its_own_request():
    calls = []

    def run(parts):
        calls.append(list(parts))
        if "bad" in parts:
            raise ValueError("bad image")
        return [p.upper() for p in parts]

    sched, futures = _batched_jobs(["a", "bad", "c"], limit=8, run=run)
    assert futures[0].result(5) == "A" and futures[2].result(5) == "C"
    with pytest.raises(ValueError, match="bad image"):
        futures[1].result(5)
    sched.shutdown()
    assert calls == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]  # shared, then each alone


def test_concurrent_requests_are_scored_together_with_the_same_answers(model_path,
                                                                       synthetic_root):
    """Six one-image requests waiting together are scored in one model call of six images
    (limit 8), and each gets the answer it gets alone."""
    from flawscope.runtime import load_any_model
    from flawscope.serve.limits import Limits
    from flawscope.serve.scheduler import run_to_end
    from flawscope.serve.service import Service

    paths = sorted((synthetic_root / "tile" / "test").rglob("*.png"))[:6]
    service = Service(load_any_model(model_path, device="cpu"), Limits(micro_batch=8))
    alone = [service.run([(p.name, p.read_bytes())], heatmap=True, overlay=False)
             for p in paths]
    sizes: list[int] = []
    predict = service.inspector.predict

    def counting(images, **kw):
        sizes.append(len(images))
        return predict(images, **kw)

    service.inspector.predict = counting
    hold = threading.Event()

    def blocker():
        hold.wait(5)
        return None
        yield  # a generator

    try:
        service.scheduler.submit(blocker(), lane=SCORE)
        futures = [service.scheduler.submit(service.steps([(p.name, p.read_bytes())],
                                                          heatmap=True, overlay=False))
                   for p in paths]
        deadline = time.monotonic() + 10
        while service.scheduler.waiting_in(SCORE) < len(paths):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        hold.set()
        together = [f.result(30)[0] for f in futures]
    finally:
        service.scheduler.shutdown()
    assert sizes == [6]
    for a, b in zip(alone, together):
        ra, rb = a["results"][0], b["results"][0]
        assert ra["verdict"] == rb["verdict"] and ra["regions"] == rb["regions"]
        assert abs(ra["score"] - rb["score"]) <= 1e-5 * max(1.0, abs(ra["score"]))
        assert ra["heatmap_png"] is not None and rb["heatmap_png"] is not None
    # run_to_end (the synchronous path) runs a batch alone
    assert run_to_end(service.steps([(paths[0].name, paths[0].read_bytes())], heatmap=False,
                                    overlay=False))[0]["results"][0]["verdict"] == \
        alone[0]["results"][0]["verdict"]


def _jpeg(rng, w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.slow
def test_a_small_request_is_not_starved_by_a_large_one(model_path, synthetic_root):
    """16 large images in one request; a one-image request sent meanwhile is answered
    before it, and far sooner (the speed target itself is in benchmarks/bench_station.py)."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    rng = np.random.default_rng(0)
    large = [("files", (f"big{i}.jpg", _jpeg(rng, 1600, 1200), "image/jpeg"))
             for i in range(16)]
    small = [("files", ("small.png", (synthetic_root / "tile" / "test" / "good" / "000.png")
                        .read_bytes(), "image/png"))]
    app = create_app(model_path, device="cpu", max_upload_bytes=256 * 2**20,
                     max_request_pixels=10**9)
    config = Config()
    port = free_port()
    config.bind = [f"127.0.0.1:{port}"]
    loop_box: dict = {}

    def run() -> None:
        async def main() -> None:
            loop_box["stop"] = asyncio.Event()
            loop_box["loop"] = asyncio.get_running_loop()
            await serve(app, config, shutdown_trigger=loop_box["stop"].wait)

        asyncio.run(main())

    server = threading.Thread(target=run, daemon=True)
    server.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.1)
        done: dict[str, float] = {}

        def big() -> None:
            r = httpx.post(base + "/v1/predict?heatmap=false", files=large, timeout=120)
            assert r.status_code == 200 and len(r.json()["results"]) == 16
            done["big"] = time.perf_counter()

        t0 = time.perf_counter()
        thread = threading.Thread(target=big)
        thread.start()
        service = app.state.service
        while service.pending == 0 and thread.is_alive():  # the large one is being worked on
            time.sleep(0.005)
        started = time.perf_counter()
        r = httpx.post(base + "/v1/predict?heatmap=false", files=small, timeout=120)
        done["small"] = time.perf_counter()
        assert r.status_code == 200
        thread.join(120)
        assert "big" in done, "the large request failed"
        assert done["small"] < done["big"], "the small request waited for the large one"
        assert done["small"] - started < (done["big"] - t0) / 2
    finally:
        loop_box["loop"].call_soon_threadsafe(loop_box["stop"].set)
        server.join(15)


# ---------------------------------------------------------------------------- headers
def _closed_by_peer(s: socket.socket) -> bool:
    s.settimeout(0.05)
    try:
        return s.recv(64) == b""
    except TimeoutError:
        return False
    except OSError:  # reset
        return True


@pytest.mark.slow
def test_half_sent_headers_do_not_hold_connections(model_path):
    srv = Server(model_path, "--db", "off", "--header-timeout", "1").wait_ready()
    try:
        socks = []
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multi")
            socks.append(s)
        silent = socket.create_connection(("127.0.0.1", srv.port))  # sends nothing at all
        trickle = socket.create_connection(("127.0.0.1", srv.port))
        trickle.sendall(b"GET /healthz HTTP/1.1\r\n")
        t0 = time.monotonic()
        cut = None
        while time.monotonic() - t0 < 6:  # one header line every 0.2 s: never complete
            try:
                trickle.sendall(b"X-Slow: 1\r\n")
            except OSError:
                cut = time.monotonic() - t0
                break
            if _closed_by_peer(trickle):
                cut = time.monotonic() - t0
                break
            time.sleep(0.2)
        assert cut is not None and cut < 4, "a trickled header kept its connection"
        time.sleep(0.5)
        assert sum(_closed_by_peer(s) for s in socks) == 50
        assert _closed_by_peer(silent)
        for s in (*socks, silent, trickle):
            s.close()
        # complete requests are served as before, also on a kept-alive connection
        with httpx.Client(base_url=srv.base, timeout=10) as http:
            assert http.get("/healthz").status_code == 200
            assert http.get("/healthz").status_code == 200
    finally:
        srv.stop()


def test_scoring_pieces_are_one_image_while_others_wait(model_path, synthetic_root):
    """Alone, a request is scored in few pieces (a fast model: one measured image, then
    batches of about 0.1 s); while others wait, one image per piece."""
    from flawscope.runtime import load_any_model
    from flawscope.serve.limits import Limits
    from flawscope.serve.service import Service

    paths = sorted((synthetic_root / "tile" / "test").rglob("*.png"))[:8]
    uploads = [(p.name, p.read_bytes()) for p in paths]
    service = Service(load_any_model(model_path, device="cpu"), Limits())
    try:
        for busy in (False, True):
            service._seconds_per_image = None  # as a fresh service
            job = service.steps(uploads, heatmap=False, overlay=False)
            batches, nxt = [], next(job)
            try:
                while True:
                    if isinstance(nxt, Batch):  # a scoring piece: run it as the lane would
                        batches.append(nxt.size)
                        nxt = job.send(nxt.run([nxt.part])[0])
                    else:
                        nxt = job.send(busy)
            except StopIteration as stop:
                answer, rows = stop.value
            # scoring pieces: one image each while others wait; alone, batches
            assert sum(batches) == 8
            assert (batches == [1] * 8) if busy else (len(batches) < 8), batches
            assert [r["file"] for r in answer["results"]] == [p.name for p in paths]
            assert rows == []
    finally:
        service.scheduler.shutdown()
