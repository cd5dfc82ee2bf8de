"""Files of `influence/<split>/`, shared by compute-influence (writer) and its readers
(train-cls round 2, make-cams fusion, influence-report).

    stats-factors-r{i}-of-{n}.pt   shard i's sums: K-FAC factors + per-class query gradients (+ key)
    stats-lambda-r{i}-of-{n}.pt    shard i's EK-FAC eigenvalue sums (+ key)
    eigen.pt                       fitted once from the summed statistics (any shard may write; same bytes)
    part-r{i}-{seq}.h5             MapStore parts: one group per image; maps = spatial influence per
                                   class (divided by attrs map_scale, K x h x w on the classifier's
                                   grid), classes, attrs self_influence, loss, per_class (C), labels
    scores.csv                     every image of the split: self-influence, atypicality, loss,
                                   weight, suggested labels (written when the last shard finishes)
    fit.json                       how well the classifier fits the split's labels and what the guard did
                                   (stages/compute_influence.py; written with scores.csv)

train-cls --sample-weights influence writes cls/round<k>/relabelled.csv (id, labels, trained_labels):
the images it trained on suggested labels instead of their own; make-cams --label-source auto reads it.

Every statistics file carries the run's key (settings, classifier checksum, image lists, shard
count); a file with another key is never used.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from igcam_cli.atomic import write_atomically, write_csv_atomically, write_text_atomically
from igcam_cli.errors import BadData, MissingArtifact
from igcam_cli.store import MapStore

SCORES_NAME = "scores.csv"
SCORE_COLUMNS = ("id", "labels", "loss", "self_influence", "atypicality", "weight", "suggested")
RELABELLED_NAME = "relabelled.csv"
EIGEN_NAME = "eigen.pt"
FIT_NAME = "fit.json"
FIT_NUMBERS = (
    "learned_fraction",
    "prior_loss",
    "mean_loss",
    "trust",
    "learned_low",
    "learned_high",
    "suggestions_withheld",
)


def stats_path(directory: Path, phase: str, rank: int, count: int) -> Path:
    return Path(directory) / f"stats-{phase}-r{rank}-of-{count}.pt"


def save_state(path: Path, key: str, state: dict) -> None:
    """torch.save({"key": key, **state}) under a temporary name, then renamed."""
    write_atomically(path, lambda tmp: torch.save({"key": key, **state}, tmp))


def load_state(path: Path, key: str) -> dict | None:
    """The saved state when `path` exists and was written with `key`, else None."""
    state = _read_state(path)
    return state if state is not None and state.get("key") == key else None


def _read_state(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise BadData(f"cannot read {path}: {exc}; delete it or rerun with --force") from None


class StateFiles:
    """Statistics files read once each, and again only when one changes: a shard polling for its
    partners' files (--wait) must not reload the large ones it already has."""

    def __init__(self, key: str):
        self.key = key
        self._seen: dict[Path, tuple[tuple[int, int, int], dict | None]] = {}

    def _get(self, path: Path) -> dict | None:
        try:
            stat = path.stat()
        except FileNotFoundError:
            self._seen.pop(path, None)
            return None
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)  # save_state renames: a new inode
        cached = self._seen.get(path)
        if cached is None or cached[0] != stamp:
            cached = (stamp, _read_state(path))
            self._seen[path] = cached
        return cached[1]

    def key_of(self, path: Path) -> str | None:
        """The key an existing file was written with (None: no file)."""
        state = self._get(path)
        return None if state is None else state.get("key")

    def load(self, path: Path) -> dict | None:
        """The state when `path` exists and was written with this run's key, else None."""
        state = self._get(path)
        return state if state is not None and state.get("key") == self.key else None

    def forget(self) -> None:
        """Drop what was read (the merged statistics are all that is needed from here on)."""
        self._seen.clear()


@dataclass
class ImageScore:
    id: str
    labels: str  # class indices, space separated
    loss: float
    self_influence: float
    atypicality: float
    weight: float
    suggested: str = ""  # suggested labels (core/influence.py suggest_labels); == labels for most images

    @property
    def relabelled(self) -> bool:
        return bool(self.suggested) and self.suggested != self.labels


def write_scores(directory: Path, rows: list[ImageScore]) -> Path:
    table = [
        (
            r.id,
            r.labels,
            repr(r.loss),
            repr(r.self_influence),
            repr(r.atypicality),
            repr(r.weight),
            r.suggested or r.labels,
        )
        for r in rows
    ]
    return write_csv_atomically(Path(directory) / SCORES_NAME, SCORE_COLUMNS, table)


def read_scores(directory: Path, ids: list[str], command: str, num_classes: int) -> dict[str, ImageScore]:
    """Scores of `ids` from scores.csv; MissingArtifact naming `command` when absent or incomplete,
    BadData naming the line when a value is damaged (a class outside 1..num_classes, a weight that
    is not a finite number >= 0)."""
    path = Path(directory) / SCORES_NAME
    if not path.is_file():
        raise MissingArtifact(f"influence scores missing ({path}): run `{command}` first")
    scores = {}
    for line, r in _rows(path, ("id", "labels", "loss", "self_influence", "atypicality", "weight")):
        where = f"{path}, line {line}"
        suggested = r.get("suggested") or r["labels"]
        for text in (r["labels"], suggested):
            class_list(text, num_classes, where)
        try:
            loss, self_influence, atypicality, weight = (
                float(r[k]) for k in ("loss", "self_influence", "atypicality", "weight")
            )
        except ValueError as exc:
            raise BadData(f"{where}: {exc}") from None
        if not (np.isfinite(weight) and weight >= 0):
            raise BadData(f"{where}: weight {r['weight']} is not a finite number >= 0")
        scores[r["id"]] = ImageScore(r["id"], r["labels"], loss, self_influence, atypicality, weight, suggested)
    missing = [i for i in ids if i not in scores]
    if missing:
        raise MissingArtifact(
            f"influence scores in {path} lack {len(missing)} of {len(ids)} images "
            f"(e.g. {missing[0]}): run `{command}` first"
        )
    return scores


def _rows(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV file that must have `columns`."""
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise BadData(f"{path}: no column {', '.join(missing)} (is it the file igcam wrote?)")
            return [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BadData(f"cannot read {path}: {exc}") from None


def read_maps(store: MapStore, image_id: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(maps K x h x w float32 in their true scale, classes, attrs) of one image."""
    record = store.read(image_id)
    scale = np.asarray(record.attrs.get("map_scale", np.ones(len(record.classes))), dtype=np.float64)
    maps = (record.maps.astype(np.float64) * scale.reshape(-1, 1, 1)).astype(np.float32)
    return maps, record.classes, record.attrs


def class_list(text: str, num_classes: int, where: str = "") -> np.ndarray:
    """Class indices 1..num_classes from their space-separated text (as scores.csv and
    relabelled.csv hold them); BadData naming `where` for anything else."""
    try:
        classes = np.array(sorted(int(k) for k in text.split()), dtype=np.int64)
    except ValueError:
        classes = None
    if classes is None or ((classes < 1) | (classes > num_classes)).any():
        raise BadData(f"{where}: '{text}' is not a list of class indices 1..{num_classes}")
    return classes


def write_relabelled(path: Path, rows: list[ImageScore]) -> Path:
    """The images a classifier round trained on suggested labels: id, labels (as given), trained_labels."""
    return write_csv_atomically(path, ("id", "labels", "trained_labels"), [(r.id, r.labels, r.suggested) for r in rows])


def read_relabelled(path: Path, num_classes: int) -> dict[str, np.ndarray]:
    """id -> the class indices a classifier round trained on, from its relabelled.csv."""
    return {
        r["id"]: class_list(r["trained_labels"], num_classes, f"{path}, line {line}")
        for line, r in _rows(path, ("id", "trained_labels"))
    }


def write_fit(directory: Path, fit: dict) -> Path:
    return write_text_atomically(Path(directory) / FIT_NAME, json.dumps(fit, indent=1))


def read_fit(directory: Path) -> dict | None:
    """compute-influence's fit.json, or None when scores.csv was written before it existed."""
    path = Path(directory) / FIT_NAME
    if not path.is_file():
        return None
    try:
        fit = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadData(f"cannot read {path}: {exc}; rerun compute-influence") from None
    if (
        not isinstance(fit, dict)
        or not all(isinstance(fit.get(k), (int, float)) for k in FIT_NUMBERS)
        or not isinstance(fit.get("suggestions_suppressed"), bool)
    ):
        raise BadData(
            f"{path}: not the file compute-influence wrote (needs {', '.join(FIT_NUMBERS)}); rerun compute-influence"
        )
    return fit


def describe_fit(fit: dict, split: str) -> str:
    """One line: how well the classifier fits the split's labels and what compute-influence did about it."""
    ok = not fit["suggestions_suppressed"]
    line = (
        f"classifier fit on '{split}': learned fraction {fit['learned_fraction']:.2f} {'>=' if ok else '<'} "
        f"{fit['learned_high']:g} (median over images of 1 - loss / class-prior loss; mean loss "
        f"{fit['mean_loss']:.3f}, class-prior loss {fit['prior_loss']:.3f} from the labels alone)"
    )
    if ok:
        return line + ": weights and label suggestions as computed"
    weights = (
        "sample weights all 1" if fit["trust"] <= 0 else f"sample weights pulled towards 1 (trust {fit['trust']:.2f})"
    )
    return (
        line + f": the classifier has not learned enough for influence to find mislabelled images; {weights}, "
        f"no label suggestions ({fit['suggestions_withheld']} withheld)"
    )
