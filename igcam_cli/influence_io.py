"""Files of `influence/<split>/`, shared by compute-influence (writer) and its readers
(train-cls round 2, make-cams fusion, influence-report).

    stats-factors-r{i}-of-{n}.pt   shard i's sums: K-FAC factors + per-class query gradients (+ key)
    stats-lambda-r{i}-of-{n}.pt    shard i's EK-FAC eigenvalue sums (+ key)
    eigen.pt                       fitted once from the summed statistics (any shard may write; same bytes)
    part-r{i}-{seq}.h5             MapStore parts: one group per image; maps = spatial influence per
                                   class (divided by attrs map_scale, K x h x w on the classifier's
                                   grid), classes, attrs self_influence, loss, per_class (C), labels
    scores.csv                     every image of the split: self-influence, atypicality, loss,
                                   weight (written when the last shard finishes)

Every statistics file carries the run's key (settings, classifier checksum, image lists, shard
count); a file with another key is never used.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from igcam_cli.errors import BadData, MissingArtifact
from igcam_cli.store import MapStore

SCORES_NAME = "scores.csv"
SCORE_COLUMNS = ("id", "labels", "loss", "self_influence", "atypicality", "weight")


def stats_path(directory: Path, phase: str, rank: int, count: int) -> Path:
    return Path(directory) / f"stats-{phase}-r{rank}-of-{count}.pt"


def save_state(path: Path, key: str, state: dict) -> None:
    """torch.save({"key": key, **state}) under a temporary name, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"key": key, **state}, tmp)
    os.replace(tmp, path)


def load_state(path: Path, key: str) -> dict | None:
    """The saved state when `path` exists and was written with `key`, else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise BadData(f"cannot read {path}: {exc}; delete it or rerun with --force") from None
    return state if state.get("key") == key else None


def state_key(path: Path) -> str | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True).get("key")
    except Exception:
        return None


@dataclass
class ImageScore:
    id: str
    labels: str  # class indices, space separated
    loss: float
    self_influence: float
    atypicality: float
    weight: float


def write_scores(directory: Path, rows: list[ImageScore]) -> Path:
    path = Path(directory) / SCORES_NAME
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(SCORE_COLUMNS)
        for r in rows:
            writer.writerow((r.id, r.labels, repr(r.loss), repr(r.self_influence), repr(r.atypicality), repr(r.weight)))
    os.replace(tmp, path)
    return path


def read_scores(directory: Path, ids: list[str], command: str) -> dict[str, ImageScore]:
    """Scores of `ids` from scores.csv; MissingArtifact naming `command` when absent or incomplete."""
    path = Path(directory) / SCORES_NAME
    if not path.is_file():
        raise MissingArtifact(f"influence scores missing ({path}): run `{command}` first")
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        scores = {r["id"]: ImageScore(r["id"], r["labels"], float(r["loss"]), float(r["self_influence"]),
                                      float(r["atypicality"]), float(r["weight"])) for r in rows}
    except (OSError, KeyError, ValueError, csv.Error) as exc:
        raise BadData(f"cannot read {path}: {exc}") from None
    missing = [i for i in ids if i not in scores]
    if missing:
        raise MissingArtifact(f"influence scores in {path} lack {len(missing)} of {len(ids)} images "
                              f"(e.g. {missing[0]}): run `{command}` first")
    return scores


def read_maps(store: MapStore, image_id: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(maps K x h x w float32 in their true scale, classes, attrs) of one image."""
    record = store.read(image_id)
    scale = np.asarray(record.attrs.get("map_scale", np.ones(len(record.classes))), dtype=np.float64)
    maps = (record.maps.astype(np.float64) * scale.reshape(-1, 1, 1)).astype(np.float32)
    return maps, record.classes, record.attrs
