"""One ordered process pool for the stages that work in parallel (extract parses, tokenize encodes).

Work units are submitted in order and their results yielded in that same order, so a stage's
output is identical whatever the worker count; at most two units per worker are in flight, which
bounds memory however large the input. With one worker everything runs in this process: no
pickling, and a profiler or debugger sees the real work.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")
IN_FLIGHT_PER_WORKER = 2


def ordered_map(function: Callable[[Item], Result], items: Iterable[Item], workers: int,
                initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> Iterator[Result]:
    """`map(function, items)` over `workers` processes, results in input order, lazily.

    `function` and `initializer` must be picklable (module-level functions or partials of them).
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(function, items)
        return
    with ProcessPoolExecutor(workers, initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
