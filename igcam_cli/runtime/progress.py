"""Progress bars on a terminal, plain log lines otherwise, and a per-stage log file."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
console = Console(stderr=True)


class StageLog:
    """Writes each message to logs/<stage>.log and, unless quiet, to the console."""

    def __init__(self, path: Path | None, quiet: bool = False):
        self.path = path
        self.quiet = quiet
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, message: str) -> None:
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        if not self.quiet:
            console.print(message, highlight=False, markup=False)

    def track(self, items: Iterable[T], total: int, description: str, unit: str = "img") -> Iterator[T]:
        """Iterate with a rich bar on a TTY, or a log line every ~10 % otherwise."""
        if self.quiet or total == 0:
            yield from items
            return
        if sys.stderr.isatty():
            with _bar() as bar:
                task = bar.add_task(description, total=total)
                for item in items:
                    yield item
                    bar.advance(task)
            return
        start, step, done = time.time(), max(1, total // 10), 0
        for item in items:
            yield item
            done += 1
            if done % step == 0 or done == total:
                rate = done / max(time.time() - start, 1e-9)
                self(f"{description}: {done}/{total} ({rate:.1f} {unit}/s)")


@contextmanager
def _bar():
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        yield bar
