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

**Micro-batching.** A job may yield a :class:`Batch` instead of a lane name: a piece of work
(e.g. "score these 2 images") that can share one call with the waiting pieces of other
requests. The lane thread that takes it also takes every other waiting :class:`Batch` of the
same ``key`` from its queue (up to ``limit`` items together, in queue order), runs them in
one call and sends each job its own part of the result. Nothing waits for a batch to fill: a
request alone is scored at once, and under load the queue that builds up while the model
works is what forms the batches (16 clients sending one image each are scored 8 at a time,
not one by one). If the shared call fails, each part is run alone, so one request's bad
input fails only that request.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Generator, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
PREPARE, SCORE = "prepare", "score"


@dataclass(eq=False)
class Batch:
    """A piece of work that may share one call with other jobs' pieces of the same ``key``.

    ``run`` takes the parts of several batches and returns their results in order (one
    call: e.g. their images stacked into one model batch); the job is sent its own result.
    ``size``: how many items ``part`` holds; ``limit``: most items in one shared call."""

    lane: str
    key: Hashable
    part: Any
    size: int
    limit: int
    run: Callable[[Sequence[Any]], list[Any]]


#: a job yields the lane of its next piece (and is sent whether others wait there) or a
#: :class:`Batch` (and is sent its result)
Job = Generator[str | Batch, Any, T]
#: a queued job: the job, its future, whether it has started and what it yielded last
_Item = tuple[Job[Any], Future[Any], bool, "str | Batch | None"]


def _lane(pending: str | Batch | None, default: str) -> str:
    return pending.lane if isinstance(pending, Batch) else (pending or default)


class FairScheduler:
    """``lanes``: threads per lane, e.g. ``{"prepare": 2, "score": 1}``."""

    def __init__(self, lanes: dict[str, int], name: str = "flawscope") -> None:
        self._cond = threading.Condition()
        self._ready: dict[str, deque[_Item]] = {lane: deque() for lane in lanes}
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
            self._ready[lane].append((job, fut, False, None))
            self._cond.notify_all()
        return fut

    @property
    def waiting(self) -> int:
        """Jobs waiting for their next piece, all lanes (not counting those running)."""
        return sum(len(q) for q in self._ready.values())

    def waiting_in(self, lane: str) -> int:
        """Jobs waiting for their next piece in ``lane``."""
        with self._cond:
            return len(self._ready[lane])

    def shutdown(self) -> None:
        """Stop taking pieces; unfinished jobs get a cancelled future or an error."""
        with self._cond:
            self._closed = True
            pending = [item for q in self._ready.values() for item in q]
            for q in self._ready.values():
                q.clear()
            self._cond.notify_all()
        for job, fut, started, _ in pending:
            _abandon(job, fut, started)

    def _loop(self, lane: str) -> None:
        queue = self._ready[lane]
        while True:
            with self._cond:
                while not queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                group = [queue.popleft()]
                if isinstance(group[0][3], Batch):
                    group += _take_batchable(queue, group[0][3])
                contended = bool(queue)
            if isinstance(group[0][3], Batch):
                values = _run_batches([item[3] for item in group])
            else:
                values = [(contended, None)]
            for k, ((job, fut, started, _), (value, error)) in enumerate(zip(group, values)):
                if not self._advance(job, fut, started, value, error):
                    for later, lfut, lstarted, _ in group[k + 1:]:  # shut down meanwhile
                        _abandon(later, lfut, lstarted)
                    return

    def _advance(self, job: Job[Any], fut: Future[Any], started: bool, value: Any,
                 error: BaseException | None) -> bool:
        """Run the job's next piece (sending ``value``, or throwing ``error`` into it) and
        queue it for the piece after; False once the scheduler is shut down."""
        if not started and not fut.set_running_or_notify_cancel():
            job.close()
            return True
        try:
            if error is not None:
                nxt = job.throw(error)
            else:
                nxt = job.send(value) if started else next(job)
        except StopIteration as stop:
            fut.set_result(stop.value)
            return True
        except BaseException as exc:  # noqa: BLE001 - handed to the request
            fut.set_exception(exc)
            return True
        with self._cond:
            if self._closed:
                _abandon(job, fut, True)
                return False
            self._ready[_lane(nxt, PREPARE)].append((job, fut, True, nxt))
            self._cond.notify_all()
        return True


def _take_batchable(queue: deque[_Item], first: Batch) -> list[_Item]:
    """Remove from ``queue`` the waiting batches that can share ``first``'s call (same key,
    up to ``first.limit`` items together, in queue order); the rest keep their places."""
    taken, kept = [], []
    size = first.size
    while queue and size < first.limit:
        item = queue.popleft()
        pending = item[3]
        if isinstance(pending, Batch) and pending.key == first.key and \
                size + pending.size <= first.limit:
            taken.append(item)
            size += pending.size
        else:
            kept.append(item)
    queue.extendleft(reversed(kept))
    return taken


def _run_batches(batches: Sequence[Batch]) -> list[tuple[Any, BaseException | None]]:
    """``(result, None)`` per batch from one shared call; if that call fails, each batch is
    run alone and a failing one gets ``(None, its error)``."""
    try:
        results = batches[0].run([b.part for b in batches])
    except Exception as exc:  # noqa: BLE001 - handed to the job, or retried alone below
        if len(batches) == 1:
            return [(None, exc)]
    else:
        return [(r, None) for r in results]
    out: list[tuple[Any, BaseException | None]] = []
    for b in batches:
        try:
            out.append((b.run([b.part])[0], None))
        except Exception as exc:  # noqa: BLE001 - handed to that job only
            out.append((None, exc))
    return out


def _abandon(job: Job[Any], fut: Future[Any], started: bool) -> None:
    if not started:
        fut.cancel()
    elif not fut.done():
        fut.set_exception(RuntimeError("the service is shutting down"))
    job.close()


def run_to_end(job: Job[T]) -> T:
    """Run a job in the calling thread, uncontended (no other request waits)."""
    try:
        pending = next(job)
        while True:
            if isinstance(pending, Batch):
                [(value, error)] = _run_batches([pending])
                pending = job.throw(error) if error is not None else job.send(value)
            else:
                pending = job.send(False)
    except StopIteration as stop:
        return stop.value
