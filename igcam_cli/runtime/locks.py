"""One writer per output: an exclusive lock file beside a stage's output, held while the stage runs.

Two runs of one stage on one output would delete each other's temporary parts and mix their images;
the second one is refused in one line naming the first. The lock is `flock`ed, so the kernel drops it
when the holder dies (SIGKILL included): a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from igcam_cli.errors import UsageError


class OutputLock:
    def __init__(self, path: Path, what: str):
        self.path, self.what = path, what
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        """Take the lock, or UsageError naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise UsageError(
                f"{self.what} is being written by another run ({holder}): wait for it to finish "
                "(a sharded job gives each process its own --shard)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            # Unlock before closing: forked DataLoader workers share the open file description, and a close alone
            # would leave the lock held until the last of them exits.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.release()
