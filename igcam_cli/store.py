"""Artifact stores: per-image maps in HDF5 parts (MapStore) and label maps as palette PNGs (LabelStore).

MapStore layout (one directory per artifact and split, e.g. ``<ws>/cams/train/``)::

    part-r{rank}-{seq:05d}.h5        complete, immutable parts; one group per image id:
                                       maps     float16 K x H x W
                                       classes  uint8 K (foreground class indices)
                                       attrs    height, width, source, ...
    .part-r{rank}-{seq:05d}.h5.tmp   a part being written (or left by a killed writer)
    skipped-r{rank}.json             images of the split a `--skip-bad` run of `rank` could not read,
                                       id -> the reason (both stores; see `skipped`)

A part is written under its temporary name, closed, fsynced and renamed, so readers only ever
see complete files and a killed writer can lose at most the part it was writing. Each rank
writes its own parts, and a resumed run appends parts with higher sequence numbers.
All files are opened with HDF5 file locking off: complete parts are never written again and
a temporary file is only ever opened by its writer, and locking fails on some cluster
file systems.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from PIL import Image, UnidentifiedImageError

from igcam_cli.atomic import write_atomically, write_text_atomically
from igcam_cli.errors import BadData, StorageError

PART_RE = re.compile(r"^part-r(\d+)-(\d+)\.h5$")
TEMP_RE = re.compile(r"^\.part-r(\d+)-(\d+)\.h5\.tmp$")
SKIPPED_RE = re.compile(r"^skipped-r(\d+)\.json$")


def _part_numbers(name: str) -> tuple[int, int]:
    """(rank, sequence number) of a complete part's file name."""
    m = PART_RE.match(name)
    if m is None:
        raise ValueError(f"not a part file name: {name}")
    return int(m.group(1)), int(m.group(2))


def check_id(image_id: str) -> str:
    """Return `image_id` unchanged, or raise ValueError if it cannot be a group or file name."""
    if not isinstance(image_id, str) or image_id in ("", ".", "..") or "/" in image_id or "\0" in image_id:
        raise ValueError(f"invalid image id {image_id!r}: ids must be non-empty file-stem-like names without '/'")
    return image_id


def _plain(value):
    """h5py attribute value -> plain Python (numpy scalars to int/float/bool, arrays to lists)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode()
    return value


def _fsync(path: Path, best_effort: bool = False) -> None:
    """fsync a file, or (best_effort) a directory, by name."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if not best_effort:
            raise


def _skipped_files(directory: Path, rank: int | None = None, from_rank: int | None = None) -> list[Path]:
    """The skip lists in `directory`: of `rank`, of every rank from `from_rank` on, or all."""
    if not directory.is_dir():
        return []

    def wanted(r: int) -> bool:
        return (rank is None or r == rank) and (from_rank is None or r >= from_rank)

    return sorted(p for p in directory.iterdir() if (m := SKIPPED_RE.match(p.name)) and wanted(int(m.group(1))))


def read_skipped(directory: Path, present: set[str], rank: int | None = None) -> dict[str, str]:
    """id -> reason of the images the skip lists in `directory` name (of `rank`, or all), less those
    `present` in the store (a later run read them after all). A damaged list raises BadData naming it."""
    skipped: dict[str, str] = {}
    for path in _skipped_files(directory, rank):
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BadData(f"cannot read the skip list {path}: {exc}; rerun the stage with --force") from None
        if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
            raise BadData(f"the skip list {path} is not a JSON object of id -> reason; rerun the stage with --force")
        skipped.update(entries)
    return {i: reason for i, reason in sorted(skipped.items()) if i not in present}


def write_skipped(directory: Path, rank: int, entries: dict[str, str]) -> None:
    """Replace `rank`'s skip list (atomically; no list when `entries` is empty)."""
    path = directory / f"skipped-r{rank}.json"
    if not entries:
        path.unlink(missing_ok=True)
        return
    # json.dumps writes ASCII (\u escapes): ids may hold undecodable bytes
    write_text_atomically(path, json.dumps(dict(sorted(entries.items())), indent=1))


def clear_skipped(directory: Path, rank: int | None = None, from_rank: int | None = None) -> None:
    for path in _skipped_files(directory, rank, from_rank):
        path.unlink(missing_ok=True)


@dataclass
class MapRecord:
    """One image's maps: float32 K x H x W, their foreground class indices (uint8 K), and attrs."""

    maps: np.ndarray
    classes: np.ndarray
    attrs: dict = field(default_factory=dict)


class MapStore:
    """A directory of HDF5 part files holding per-image class maps."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._part_keys: dict[str, tuple[tuple[int, int], list[str]]] = {}  # name -> (stat, ids)
        self._index: dict[str, str] = {}  # image id -> part file name
        self._index_state: tuple | None = None

    # ----- reading -----

    def _list_parts(self) -> dict[str, tuple[int, int]]:
        """Complete part names (sorted) with (mtime_ns, size), so a rewritten name is noticed."""
        parts = {}
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return {}
        for entry in entries:
            if PART_RE.match(entry.name):
                st = entry.stat()
                parts[entry.name] = (st.st_mtime_ns, st.st_size)
        return dict(sorted(parts.items()))

    def _refresh(self) -> dict[str, str]:
        """Return the id -> part index, rescanning only parts that are new or changed."""
        parts = self._list_parts()
        state = tuple(parts.items())
        if state == self._index_state:
            return self._index
        cache = {}
        for name, stat in parts.items():
            cached = self._part_keys.get(name)
            if cached is None or cached[0] != stat:
                try:
                    with self._opened(name) as f:
                        cached = (stat, list(f.keys()))
                except BadData:
                    if not (self.directory / name).exists():  # deleted since it was listed: another shard's --force
                        continue
                    raise
            cache[name] = cached
        index = {}
        for name, (_, keys) in cache.items():  # sorted by name: a later part wins
            for key in keys:
                index[key] = name
        self._part_keys, self._index, self._index_state = cache, index, state
        return index

    def parts(self) -> list[Path]:
        """Paths of the complete parts, sorted by name."""
        return [self.directory / name for name in self._list_parts()]

    def ids(self) -> set[str]:
        """Ids present in complete parts (temporary files are ignored)."""
        return set(self._refresh())

    def __contains__(self, image_id) -> bool:
        return image_id in self._refresh()

    def skipped(self, rank: int | None = None) -> dict[str, str]:
        """Images a --skip-bad run left out (id -> why), not written since."""
        return read_skipped(self.directory, self.ids(), rank)

    def __len__(self) -> int:
        return len(self._refresh())

    @contextmanager
    def _opened(self, name: str) -> Iterator[h5py.File]:
        """A complete part, open for reading; a damaged one (truncated, not HDF5) is BadData naming it."""
        path = self.directory / name
        try:
            f = h5py.File(path, "r", locking=False)
        except OSError as exc:
            raise BadData(
                f"map part {path} is damaged ({exc}); delete it and rerun the stage that wrote it, "
                "which redoes that part's images"
            ) from None
        with f:
            yield f

    @staticmethod
    def _read_group(group: h5py.Group) -> MapRecord:
        maps = group["maps"][()].astype(np.float32)
        classes = group["classes"][()].astype(np.uint8)
        return MapRecord(maps=maps, classes=classes, attrs={k: _plain(v) for k, v in group.attrs.items()})

    def read(self, image_id: str) -> MapRecord:
        """The record of one image; KeyError if no complete part holds it."""
        index = self._refresh()
        if image_id not in index:
            raise KeyError(f"image {image_id!r} is not in {self.directory}")
        with self._opened(index[image_id]) as f:
            return self._read_group(f[image_id])

    def iter_records(self, ids: Iterable[str]) -> Iterator[tuple[str, MapRecord]]:
        """Yield (id, record) for `ids`, opening each part once; records come grouped by part.

        Raises KeyError before reading anything if an id is absent.
        """
        for image_id, group in self._groups(ids):
            yield image_id, self._read_group(group)

    def iter_attrs(self, ids: Iterable[str]) -> Iterator[tuple[str, dict]]:
        """Like `iter_records`, the attrs only: no map is read or decompressed."""
        for image_id, group in self._groups(ids):
            yield image_id, {k: _plain(v) for k, v in group.attrs.items()}

    def _groups(self, ids: Iterable[str]) -> Iterator[tuple[str, h5py.Group]]:
        index = self._refresh()
        by_part: dict[str, list[str]] = {}
        for image_id in dict.fromkeys(ids):
            if image_id not in index:
                raise KeyError(f"image {image_id!r} is not in {self.directory}")
            by_part.setdefault(index[image_id], []).append(image_id)
        for name in sorted(by_part):
            with self._opened(name) as f:
                for image_id in by_part[name]:
                    yield image_id, f[image_id]

    @property
    def attrs(self) -> dict:
        """Store-level attrs (given to `writer(attrs=...)`), read from the last part; {} if none."""
        names = list(self._list_parts())
        if not names:
            return {}
        with self._opened(names[-1]) as f:
            return {k: _plain(v) for k, v in f.attrs.items()}

    # ----- writing and cleanup -----

    def writer(
        self, rank: int = 0, part_size: int = 32, *, source: str | None = None, attrs: dict | None = None
    ) -> MapWriter:
        """A writer for shard `rank`. `source` is the default per-image source attr (default: the
        name of the directory's parent, e.g. "cams"); `attrs` are written to every part's root."""
        return MapWriter(self, rank=rank, part_size=part_size, source=source, attrs=attrs)

    def next_seq(self, rank: int) -> int:
        """One more than the largest complete part sequence number of `rank` (0 if none)."""
        seqs = [seq for r, seq in map(_part_numbers, self._list_parts()) if r == rank]
        return max(seqs, default=-1) + 1

    def temporaries(self, rank: int | None = None) -> list[Path]:
        """Temporary part files (of `rank`, or of every rank)."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in sorted(self.directory.iterdir()):
            m = TEMP_RE.match(path.name)
            if m and (rank is None or int(m.group(1)) == rank):
                found.append(path)
        return found

    def remove_temporaries(self, rank: int | None = None) -> int:
        """Delete temporary parts left by killed writers; return how many were deleted.

        Call it before writers start: a live writer's temporary looks the same. In a sharded run,
        each rank can pass its own `rank` to delete only its own leftovers.
        """
        paths = self.temporaries(rank)
        for path in paths:
            path.unlink(missing_ok=True)
        return len(paths)

    def clear(self, rank: int | None = None) -> None:
        """Delete all parts and temporaries, or only those of `rank` (the directory itself stays)."""
        own = [p for p in self.parts() if rank is None or _part_numbers(p.name)[0] == rank]
        for path in own + self.temporaries(rank):
            path.unlink(missing_ok=True)
        clear_skipped(self.directory, rank)
        self._part_keys, self._index, self._index_state = {}, {}, None

    def clear_images(self, ids: Iterable[str]) -> None:
        """Delete every complete part that holds any of `ids` (with the other images it holds)."""
        wanted = set(ids)
        self._refresh()
        for name, (_, keys) in list(self._part_keys.items()):
            if wanted.intersection(keys):
                (self.directory / name).unlink(missing_ok=True)
        self._part_keys, self._index, self._index_state = {}, {}, None


# Free space a map write leaves at least: the part's HDF5 metadata, its close and rename, the manifest record
SPACE_MARGIN = 8 * 2**20


def require_space(directory: Path, nbytes: int) -> None:
    """StorageError before a write the disk cannot take. HDF5 fails badly on a full disk (tracebacks from
    its destructors, a half-written part, then a segfault), so a map write never starts without room."""
    free = shutil.disk_usage(directory).free
    if free < nbytes + SPACE_MARGIN:
        raise StorageError(
            f"no space left on the device of {directory} ({free / 2**20:.1f} MiB free): free some space and "
            "rerun the same command; the images finished so far are kept"
        )


class MapWriter:
    """Writes images into parts of `part_size` images; a context manager.

    Images go straight into a temporary part file, which is closed, fsynced and renamed to its
    final name when it holds `part_size` images, on `flush()`, or on exit (also on exception:
    images finished before a failure are good data).
    """

    def __init__(
        self,
        store: MapStore,
        rank: int = 0,
        part_size: int = 32,
        source: str | None = None,
        attrs: dict | None = None,
    ):
        if not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank must be a non-negative integer, got {rank!r}")
        if part_size < 1:
            raise ValueError(f"part_size must be >= 1, got {part_size}")
        self.store = store
        self.rank = rank
        self.part_size = part_size
        self.source = source if source is not None else store.directory.parent.name
        self.store_attrs = dict(attrs or {})
        self._next_seq = 0
        self._file: h5py.File | None = None
        self._tmp: Path | None = None
        self._final: Path | None = None
        self._ids: set[str] = set()
        self.written: list[Path] = []  # complete parts written by this writer

    def __enter__(self) -> MapWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def _open_part(self) -> h5py.File:
        directory = self.store.directory
        directory.mkdir(parents=True, exist_ok=True)
        seq = max(self._next_seq, self.store.next_seq(self.rank))
        self._next_seq = seq + 1
        name = f"part-r{self.rank}-{seq:05d}.h5"
        self._final = directory / name
        self._tmp = directory / f".{name}.tmp"
        self._file = h5py.File(self._tmp, "w", locking=False)
        for key, value in self.store_attrs.items():
            self._file.attrs[key] = value
        self._ids = set()
        return self._file

    def write(self, image_id: str, maps: np.ndarray, classes: np.ndarray, **attrs) -> None:
        """Add one image. `maps` K x H x W (stored as float16), `classes` K class indices.

        `attrs` are stored on the image's group; height, width (from `maps`) and source default.
        """
        check_id(image_id)
        maps = np.asarray(maps)
        classes = np.asarray(classes)
        if maps.ndim != 3 or maps.shape[1] == 0 or maps.shape[2] == 0:
            raise ValueError(f"{image_id}: maps must be K x H x W with H, W > 0, got shape {maps.shape}")
        if classes.ndim != 1 or len(classes) != maps.shape[0]:
            raise ValueError(f"{image_id}: classes must hold K={maps.shape[0]} indices, got shape {classes.shape}")
        if classes.size and (
            not np.all(np.isfinite(classes))
            or np.any(classes != np.round(classes))
            or classes.min() < 0
            or classes.max() > 255
        ):
            raise ValueError(f"{image_id}: classes must be integers in 0..255, got {classes.tolist()}")
        with np.errstate(over="ignore", invalid="ignore"):
            maps16 = maps.astype(np.float16)
        if not np.all(np.isfinite(maps16)):
            raise ValueError(f"{image_id}: maps hold NaN, inf or values beyond the float16 range")
        group_attrs = {"height": maps.shape[1], "width": maps.shape[2], "source": self.source, **attrs}

        self.store.directory.mkdir(parents=True, exist_ok=True)
        require_space(self.store.directory, maps16.nbytes)
        f = self._file if self._file is not None else self._open_part()
        if image_id in self._ids:  # written twice into this part: the later write wins
            del f[image_id]
        try:
            g = f.create_group(image_id)
            k, h, w = maps16.shape
            if k:
                g.create_dataset("maps", data=maps16, chunks=(1, h, w), compression="lzf", shuffle=True)
            else:
                g.create_dataset("maps", data=maps16)
            g.create_dataset("classes", data=classes.astype(np.uint8))
            for key, value in group_attrs.items():
                g.attrs[key] = value
        except BaseException:
            if image_id in f:
                del f[image_id]
            self._ids.discard(image_id)
            raise
        self._ids.add(image_id)
        if len(self._ids) >= self.part_size:
            self.flush()

    def flush(self) -> None:
        """Commit the images written so far as a complete part (no-op if there are none)."""
        if self._file is None:
            return
        f, tmp, final = self._file, self._tmp, self._final
        assert tmp is not None and final is not None  # set with _file by _open_part
        self._file = None
        try:
            empty = not self._ids
            f.close()
            if empty:
                tmp.unlink(missing_ok=True)
                return
            _fsync(tmp)
            os.replace(tmp, final)
            _fsync(final.parent, best_effort=True)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.written.append(final)

    def close(self) -> None:
        """Flush; the writer may still be used afterwards (it starts a new part)."""
        self.flush()


def voc_palette() -> list[int]:
    """The standard 256-colour PASCAL VOC palette as 768 ints (r, g, b, r, g, b, ...)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


class LabelStore:
    """A directory of label maps as VOC-palette PNGs, one `<id>.png` per image."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def ids(self) -> set[str]:
        """Stems of the complete PNGs (temporaries end in .tmp and are ignored)."""
        if not self.directory.is_dir():
            return set()
        return {p.name[: -len(".png")] for p in self.directory.iterdir() if p.name.endswith(".png") and p.is_file()}

    def __contains__(self, image_id) -> bool:
        return isinstance(image_id, str) and self.path(image_id).is_file()

    def skipped(self, rank: int | None = None) -> dict[str, str]:
        """Images a --skip-bad run left out (id -> why), not written since."""
        return read_skipped(self.directory, self.ids(), rank)

    def __len__(self) -> int:
        return len(self.ids())

    def path(self, image_id: str) -> Path:
        return self.directory / f"{check_id(image_id)}.png"

    def write(self, image_id: str, label: np.ndarray) -> None:
        """Save a uint8 H x W class-index map as a palette PNG, atomically (temp file + rename)."""
        final = self.path(image_id)
        label = np.asarray(label)
        if label.ndim != 2 or label.size == 0:
            raise ValueError(f"{image_id}: label must be a non-empty H x W array, got shape {label.shape}")
        if label.dtype != np.uint8:
            if not np.issubdtype(label.dtype, np.integer) or label.min() < 0 or label.max() > 255:
                raise ValueError(f"{image_id}: label must hold integers in 0..255, got dtype {label.dtype}")
            label = label.astype(np.uint8)
        h, w = label.shape
        image = Image.frombytes("P", (w, h), np.ascontiguousarray(label).tobytes())
        image.putpalette(voc_palette())
        write_atomically(final, lambda tmp: image.save(tmp, format="PNG"))

    def read(self, image_id: str) -> np.ndarray:
        """uint8 H x W class indices; KeyError if absent, BadData if the file is unreadable."""
        path = self.path(image_id)
        if not path.is_file():
            raise KeyError(f"label {image_id!r} is not in {self.directory}")
        try:
            with Image.open(path) as image:
                image.load()
                if image.mode not in ("P", "L"):
                    raise BadData(f"label {path} has mode {image.mode}; expected a palette PNG")
                return np.asarray(image, dtype=np.uint8).copy()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise BadData(f"cannot read label {path}: {exc}") from None

    def clear(self) -> None:
        """Delete all PNGs, temporaries and skip lists (the directory itself stays)."""
        if not self.directory.is_dir():
            return
        clear_skipped(self.directory)
        for path in self.directory.iterdir():
            name = path.name
            is_label = name.endswith(".png") or (name.startswith(".") and ".png." in name and name.endswith(".tmp"))
            if is_label and path.is_file():
                path.unlink(missing_ok=True)
