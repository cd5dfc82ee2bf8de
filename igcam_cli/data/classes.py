"""Class lists: the PASCAL VOC default and parsing of user-given lists."""

from __future__ import annotations

from pathlib import Path

from igcam_cli.errors import BadData, IgcamError, UsageError

VOC_CLASSES: list[str] = [
    "aeroplane", "bicycle", "bird", "boat", "bottle",
    "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip

BACKGROUND_NAMES = frozenset({"background", "_background_", "__background__"})
MAX_CLASSES = 254  # masks are uint8 with 0 = background and 255 = ignore


def clean_class_list(names: list[str], source: str, error: type[IgcamError] = UsageError) -> list[str]:
    """Strip names, drop a leading background entry, reject empty lists, blanks and duplicates.

    `source` says where the names came from (a file path or "--classes") for error messages.
    """
    names = [str(n).strip() for n in names]
    if names and names[0].lower() in BACKGROUND_NAMES:
        names = names[1:]
    if not names:
        raise error(f"{source}: the class list is empty")
    if "" in names:
        raise error(f"{source}: the class list has an empty class name")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise error(f"{source}: class '{name}' is listed twice")
        seen.add(name)
    if len(names) > MAX_CLASSES:
        raise error(f"{source}: {len(names)} classes, but at most {MAX_CLASSES} fit in a uint8 mask")
    return names


def read_class_file(path: Path, error: type[IgcamError] = BadData) -> list[str]:
    """One class per line; blank lines and `#` comments skipped; a leading background entry dropped."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read class list {path}: {exc}") from None
    names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return clean_class_list([n for n in names if n], str(path), error)


def parse_class_list(text_or_path: str) -> list[str]:
    """A class-list file path, or a comma-separated list `a,b,c`. Problems raise UsageError."""
    path = Path(text_or_path).expanduser()
    looks_like_path = "/" in text_or_path or text_or_path.endswith(".txt")
    if path.is_file():
        return read_class_file(path, UsageError)
    if looks_like_path:
        raise UsageError(f"class list file not found: {text_or_path}")
    return clean_class_list(text_or_path.split(","), f"class list '{text_or_path}'")


def format_class_list(classes: list[str], limit: int = 25) -> str:
    """`a, b, c` for messages, shortened with `...` past `limit` names."""
    shown = ", ".join(classes[:limit])
    return shown + (", ..." if len(classes) > limit else "")
