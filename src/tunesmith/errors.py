"""Errors that end a command with a message and an exit code, never a traceback."""

from __future__ import annotations


class StopError(Exception):
    """The command cannot go on (disk full, a non-finite loss, an unsafe file, Ctrl-C): its message says what
    happened, what was kept and what to do next."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
