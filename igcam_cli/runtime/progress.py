"""Progress bars on a terminal, plain log lines otherwise, and a per-stage log file."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

T = TypeVar("T")
LOG_INTERVAL_S = 30.0  # progress lines in a log file: at most one per this many seconds, but the last
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
            with open(self.path, "a", encoding="utf-8", errors="surrogateescape") as fh:  # file names as they are
                fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        if not self.quiet:
            console.print(message, highlight=False, markup=False, soft_wrap=True)  # one line per message, never wrapped

    def track(
        self, items: Iterable[T], total: int, description: str, unit: str = "img", min_interval: float = LOG_INTERVAL_S
    ) -> Iterator[T]:
        """Iterate with a rich bar on a TTY; otherwise (a cluster's log file) a line at each ~10 % of
        the way that comes at least `min_interval` seconds after the last one, and one at the end.
        `total` may be an estimate (batches of same-size images): the last line gives the real count."""
        if self.quiet or total == 0:
            yield from items
            return
        if sys.stderr.isatty():
            with _bar(unit) as bar:
                task = bar.add_task(description, total=total)
                for item in items:
                    yield item
                    bar.advance(task)
            return
        start, step, done, shown = time.time(), max(1, total // 10), 0, 0
        last = start

        def line(now: float) -> str:
            return f"{description}: {done}/{max(total, done)} ({done / max(now - start, 1e-9):.1f} {unit}/s)"

        for item in items:
            yield item
            done += 1
            now = time.time()
            if done % step == 0 and now - last >= min_interval and done < total:
                last, shown = now, done
                self(line(now))
        if done > shown:
            self(line(time.time()))


@contextmanager
def _bar(unit: str):
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        yield bar


class _Rate(ProgressColumn):
    """Throughput in items per second."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} {self.unit}/s" if speed else f"- {self.unit}/s")
