"""One writer per output directory: a stage's output folder, a training run.

Two processes writing the same folder interleave their files (two trainers appending to one
metrics.jsonl) or delete each other's work (a stage clearing what it takes for stale temporaries).
`exclusive` holds an advisory lock on a file inside the folder for as long as the block runs; the
kernel drops it when the process dies, so a killed writer never leaves the folder locked.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.errors import StageError

LOCK_FILE = ".lock"  # holds the pid of the process that has the folder


@contextmanager
def exclusive(directory: Path, what: str) -> Iterator[None]:
    """Hold `directory` (created if needed) for the block; StageError naming `what` and the holder's
    pid when another process holds it."""
    directory, lock = Path(directory), None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = open(directory / LOCK_FILE, "a+")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise StageError(f"{what} is in use by another process (pid {holder}); wait for it or stop it") from None
    except OSError as err:
        if lock is not None:
            lock.close()
        raise StageError(f"cannot lock {what}: {err.strerror} ({directory / LOCK_FILE})") from None
    with lock:  # closing the file releases the lock
        yield
