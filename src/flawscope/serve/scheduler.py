"""Fair scheduling of requests over two lanes of threads: preparing and scoring.

A request's work is a generator that does one bounded piece between ``yield``\\ s: decode one
image, score a chunk, render one result. Each ``yield`` names the lane of the next piece:
``"prepare"`` (decoding, rendering, writing images: Pillow and numpy, which release the GIL)
or ``"score"`` (the model). Each lane serves its waiting requests one piece each in turn
(round robin), and a request is only ever in one lane, so:

- a small request waits for at most one piece of a large one in each lane, not for all of it;
- while a large request decodes its images in the prepare lane, a small one is scored in the
  score lane (and decoded by the prepare lane's other thread);
- the score lane keeps ``workers`` threads (default 1: the model already uses every core).

The generator is sent whether other requests wait in the lane it runs in, so a request alone
can score its images in one batch, and in small chunks only when others wait.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Generator
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
PREPARE, SCORE = "prepare", "score"
#: a job yields the lane of its next piece and is sent whether others wait there
Job = Generator[str, bool, T]


class FairScheduler:
    """``lanes``: threads per lane, e.g. ``{"prepare": 2, "score": 1}``."""

    def __init__(self, lanes: dict[str, int], name: str = "flawscope") -> None:
        self._cond = threading.Condition()
        self._ready: dict[str, deque[tuple[Job[Any], Future[Any], bool]]] = {
            lane: deque() for lane in lanes}
        self._closed = False
        self._threads = [
            threading.Thread(target=self._loop, args=(lane,), name=f"{name}-{lane}-{i}",
                             daemon=True)
            for lane, n in lanes.items() for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, job: Job[T], lane: str = PREPARE) -> Future[T]:
        """Run ``job`` to its ``return``, its first piece in ``lane``; its future."""
        fut: Future[T] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is shut down")
            self._ready[lane].append((job, fut, False))
            self._cond.notify_all()
        return fut

    @property
    def waiting(self) -> int:
        """Jobs waiting for their next piece, all lanes (not counting those running)."""
        return sum(len(q) for q in self._ready.values())

    def shutdown(self) -> None:
        """Stop taking pieces; unfinished jobs get a cancelled future or an error."""
        with self._cond:
            self._closed = True
            pending = [item for q in self._ready.values() for item in q]
            for q in self._ready.values():
                q.clear()
            self._cond.notify_all()
        for job, fut, started in pending:
            _abandon(job, fut, started)

    def _loop(self, lane: str) -> None:
        queue = self._ready[lane]
        while True:
            with self._cond:
                while not queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job, fut, started = queue.popleft()
                contended = bool(queue)
            if not started and not fut.set_running_or_notify_cancel():
                job.close()
                continue
            try:
                nxt = job.send(contended) if started else next(job)
            except StopIteration as stop:
                fut.set_result(stop.value)
                continue
            except BaseException as exc:  # noqa: BLE001 - handed to the request
                fut.set_exception(exc)
                continue
            with self._cond:
                if self._closed:
                    _abandon(job, fut, True)
                    return
                self._ready[nxt].append((job, fut, True))
                self._cond.notify_all()


def _abandon(job: Job[Any], fut: Future[Any], started: bool) -> None:
    if not started:
        fut.cancel()
    elif not fut.done():
        fut.set_exception(RuntimeError("the service is shutting down"))
    job.close()


def run_to_end(job: Job[T]) -> T:
    """Run a job in the calling thread, uncontended (no other request waits)."""
    try:
        next(job)
        while True:
            job.send(False)
    except StopIteration as stop:
        return stop.value
