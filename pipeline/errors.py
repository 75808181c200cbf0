"""The one error type a stage raises for bad input: the CLI prints its message on one line and exits 2.

A failed file operation (`OSError`: a full disk, a read-only file system, no permission) is turned
into the same kind of line by `describe_os_error`, saying which file and what to do.
"""

from __future__ import annotations

import errno

_ADVICE = {
    errno.ENOSPC: "free some space on that disk or choose another --data-dir",
    errno.EDQUOT: "free some space under your quota or choose another --data-dir",
    errno.EFBIG: "a file-size limit (the file system's, or `ulimit -f`) stops it; choose another --data-dir",
    errno.EROFS: "choose a writable --data-dir / --manifests",
    errno.EACCES: "check the permissions of that folder",
    errno.EPERM: "check the permissions of that folder",
}


class StageError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""


def describe_os_error(err: OSError) -> str:
    """One line for a failed file operation: the file, the system's reason, what to do."""
    where = f"{err.filename}: " if err.filename else ""
    advice = _ADVICE.get(err.errno, "check the disk, the path and its permissions")
    return f"{where}{err.strerror or err}; {advice}, then rerun"
