"""The one error type a stage raises for bad input: the CLI prints its message on one line and exits 2."""


class StageError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""
