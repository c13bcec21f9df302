"""Fair scheduling of requests over the inference threads.

A request's work is a generator that does one bounded piece (decode one image, score a chunk,
render one result) between ``yield``\\ s. :class:`FairScheduler` runs one piece of each waiting
request in turn (round robin), so a small request waits for at most one piece of a large one,
not for all of it. At each ``yield`` the generator is sent whether other requests are waiting,
so a request alone can score its images in one batch, and in small chunks only when others
wait.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Generator
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
Job = Generator[None, bool, T]


class FairScheduler:
    """``workers`` threads taking turns over the submitted jobs, one piece each."""

    def __init__(self, workers: int, name: str = "flawscope-worker") -> None:
        self._cond = threading.Condition()
        self._ready: deque[tuple[Job[Any], Future[Any], bool]] = deque()
        self._closed = False
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, job: Job[T]) -> Future[T]:
        """Run ``job`` (a started-or-not generator) to its ``return``; its future."""
        fut: Future[T] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is shut down")
            self._ready.append((job, fut, False))
            self._cond.notify()
        return fut

    @property
    def waiting(self) -> int:
        """Jobs waiting for their next piece (not counting those running now)."""
        return len(self._ready)

    def shutdown(self) -> None:
        """Stop taking pieces; jobs not finished get a cancelled future."""
        with self._cond:
            self._closed = True
            pending = list(self._ready)
            self._ready.clear()
            self._cond.notify_all()
        for job, fut, started in pending:
            _abandon(job, fut, started)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job, fut, started = self._ready.popleft()
                contended = bool(self._ready)
            if not started and not fut.set_running_or_notify_cancel():
                job.close()
                continue
            try:
                if started:
                    job.send(contended)
                else:
                    next(job)
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
                self._ready.append((job, fut, True))
                self._cond.notify()


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
