"""Reading a split file (one image id per line), with one clear error per bad file."""

from __future__ import annotations

from pathlib import Path

from igcam_cli.errors import BadData


def read_split_file(path: Path) -> list[tuple[int, str]]:
    """(line number, id) of each non-blank line, stripped (CRLF, a UTF-8 BOM and blank lines are fine).
    A missing-or-unreadable file, an id listed twice or a file that lists no image raise BadData naming the file."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadData(f"cannot read split file {path}: {exc}") from None
    seen: dict[str, int] = {}
    rows = []
    for number, line in enumerate(lines, start=1):
        image_id = line.strip()
        if not image_id:
            continue
        if image_id in seen:
            raise BadData(f"{path}, line {number}: image '{image_id}' is listed twice (first on line {seen[image_id]})")
        seen[image_id] = number
        rows.append((number, image_id))
    if not rows:
        raise BadData(f"split file {path} lists no image")
    return rows
