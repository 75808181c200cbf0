"""One ordered process pool for the stages that work in parallel (extract parses, tokenize encodes).

Work units are submitted in order and their results yielded in that same order, so a stage's
output is identical whatever the worker count; at most two units per worker are in flight, which
bounds memory however large the input. With one worker everything runs in this process: no
pickling, and a profiler or debugger sees the real work.

Interrupts are the parent's alone. A Ctrl-C reaches the whole process group, and a worker that dies
of it mid-task (holding a queue lock, or half-way through sending a result) leaves the pool waiting
forever. So workers ignore SIGINT and SIGTERM, and the parent, whatever stops it (an interrupt, an
error, the consumer closing the generator), cancels the queued units and waits only for the ones
running, a unit each at most.
"""

from __future__ import annotations

import contextlib
import signal
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator, TypeVar

from pipeline.errors import StageError

Item = TypeVar("Item")
Result = TypeVar("Result")
IN_FLIGHT_PER_WORKER = 2


def ordered_map(function: Callable[[Item], Result], items: Iterable[Item], workers: int,
                initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> Iterator[Result]:
    """`map(function, items)` over `workers` processes, results in input order, lazily.

    `function` and `initializer` must be picklable (module-level functions or partials of them).
    Close the generator (`contextlib.closing`) when leaving it early: that stops the workers.
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(function, items)
        return
    pool = ProcessPoolExecutor(workers, initializer=_start_worker, initargs=(initializer, initargs))
    try:
        with signals_deferred():
            pool.submit(int)  # forks every worker now, before any of them can die of a signal
        pending: deque[Future] = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                yield _result(pending.popleft())
        while pending:
            yield _result(pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while workers (processes or threads) are started, then deliver them to
    this process's own handlers: an interrupt in the middle of a start would leave a worker running
    that nothing waits for. A worker forked meanwhile inherits the holding handler until
    `_start_worker` runs."""
    received: list[int] = []
    previous = {number: signal.signal(number, lambda signum, frame: received.append(signum))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if received:
            signal.raise_signal(received[0])


def _start_worker(initializer: Callable[..., None] | None, initargs: tuple) -> None:
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)


def _result(future: Future) -> Any:
    try:
        return future.result()
    except BrokenProcessPool:
        raise StageError("a worker process died (killed, or out of memory: try fewer --workers); nothing was "
                         "left at the final path") from None
