"""Errors a user can act on. The CLI turns them into one line and an exit code, never a traceback."""


class IgcamError(Exception):
    """Base class: a message for the user and the process exit code."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UsageError(IgcamError):
    """Bad options or arguments (exit 2)."""

    exit_code = 2


class MissingArtifact(IgcamError):
    """An upstream stage has not run (exit 3). The message names the command to run."""

    exit_code = 3


class BadData(IgcamError):
    """A data file is missing, unreadable or inconsistent (exit 4). The message names the file."""

    exit_code = 4
