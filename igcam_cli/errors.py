"""Errors a user can act on. The CLI turns them into one line and an exit code, never a traceback."""

import errno


class IgcamError(Exception):
    """Base class: a message for the user and the process exit code."""

    exit_code = 1

    def __init__(self, message: str):
        message = _unwrap_worker_error(type(self), message)
        super().__init__(message)
        self.message = message


def _unwrap_worker_error(cls: type, message: str) -> str:
    """The original message of an error raised in a DataLoader worker process.

    torch re-raises a worker's exception in the main process as `cls("Caught <cls> in DataLoader
    worker process N.\nOriginal Traceback ...\n<module>.<cls>: <message>\n")`; the user should see
    only <message>, on one line.
    """
    marker = f"\n{cls.__module__}.{cls.__qualname__}: "
    if message.startswith("Caught ") and "\nOriginal Traceback" in message and marker in message:
        return message.rsplit(marker, 1)[1].rstrip("\n")
    return message


class UsageError(IgcamError):
    """Bad options or arguments (exit 2)."""

    exit_code = 2


class MissingArtifact(IgcamError):
    """An upstream stage has not run (exit 3). The message names the command to run."""

    exit_code = 3


class BadData(IgcamError):
    """A data file is missing, unreadable or inconsistent (exit 4). The message names the file."""

    exit_code = 4


class StorageError(IgcamError):
    """The workspace cannot be written: the disk is full, or it is read-only or not ours (exit 5)."""

    exit_code = 5


# errno values that mean "this storage cannot take the write", whatever the file
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def storage_error(exc: OSError) -> StorageError | None:
    """The one line for an OSError of STORAGE_ERRNOS (None for other errors)."""
    if exc.errno not in STORAGE_ERRNOS:
        return None
    where = f" {exc.filename}" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        remedy = "free some space and rerun the same command; finished work is kept"
    else:
        remedy = "make the workspace writable (or choose another with -w) and rerun; finished work is kept"
    return StorageError(f"cannot write{where}: {exc.strerror or exc}; {remedy}")
