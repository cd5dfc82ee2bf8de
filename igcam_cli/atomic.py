"""Files that appear whole or not at all: written under a temporary name beside the target, then renamed
over it, so a killed or failing write never leaves half a file where a reader looks."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` fills a temporary file beside `path`, which then replaces `path` in one rename. The temporary
    name holds the process id, so two processes writing the same file never share one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: Path, text: str, encoding: str = "utf-8") -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def write_csv_atomically(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)

    return write_atomically(path, write)
