"""Seeded label noise for measuring the mislabel finder: corrupt a fraction of image-level labels.

`igcam synth OUT --label-noise 0.1` writes the synthetic dataset in the folder layout, then
replaces the labels of a seeded 10 % of the training images in `labels.csv` and lists them in
`corrupted.csv` (`id,true_labels,noisy_labels`). GT masks stay true, so CAMs made from the noisy
labels can still be scored against the real objects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from igcam_cli.atomic import write_csv_atomically
from igcam_cli.data.folder import read_labels_csv
from igcam_cli.errors import BadData, UsageError

CORRUPTED_NAME = "corrupted.csv"


NOISE_KINDS = ("swap", "add", "drop")


def corrupt_labels(
    labels: dict[str, np.ndarray], num_classes: int, fraction: float, seed: int, kind: str = "swap"
) -> dict[str, np.ndarray]:
    """New labels for a seeded `fraction` of the ids (rounded). `swap`: one present class of each
    chosen image is swapped for a class it does not have (an image with every class loses one);
    `add`: a class it does not have is added (a wrong extra label); `drop`: one of its classes is
    removed (a missed object; only images with two or more classes can be chosen, so there may
    be fewer). Returns only the changed ids; labels are sorted int64 class indices in 1..C."""
    if not 0 <= fraction <= 1:
        raise UsageError(f"--label-noise must be in [0, 1], got {fraction}")
    if kind not in NOISE_KINDS:
        raise UsageError(f"--noise-kind must be one of {', '.join(NOISE_KINDS)}, got '{kind}'")
    ids = sorted(labels)
    rng = np.random.default_rng([seed, 7919])
    count = int(round(fraction * len(ids)))
    if kind != "swap":
        return _add_or_drop(labels, ids, num_classes, count, rng, kind)
    chosen = sorted(rng.permutation(len(ids))[:count].tolist())
    out = {}
    for index in chosen:
        present = [int(c) for c in labels[ids[index]]]
        absent = [c for c in range(1, num_classes + 1) if c not in present]
        if not present and not absent:
            continue
        new = list(present)
        if present and absent:
            new[int(rng.integers(len(new)))] = absent[int(rng.integers(len(absent)))]
        elif absent:  # an image without labels gets one
            new = [absent[int(rng.integers(len(absent)))]]
        else:  # every class present: drop one
            new.pop(int(rng.integers(len(new))))
        out[ids[index]] = np.array(sorted(new), dtype=np.int64)
    return out


def _add_or_drop(
    labels: dict[str, np.ndarray], ids: list[str], num_classes: int, count: int, rng: np.random.Generator, kind: str
) -> dict[str, np.ndarray]:
    present = {i: [int(c) for c in labels[i]] for i in ids}
    if kind == "add":
        candidates = [i for i in ids if len(present[i]) < num_classes]
    else:
        candidates = [i for i in ids if len(present[i]) >= 2]
    out = {}
    for index in sorted(rng.permutation(len(candidates))[:count].tolist()):
        image_id = candidates[index]
        new = list(present[image_id])
        if kind == "add":
            absent = [c for c in range(1, num_classes + 1) if c not in new]
            new.append(absent[int(rng.integers(len(absent)))])
        else:
            new.pop(int(rng.integers(len(new))))
        out[image_id] = np.array(sorted(new), dtype=np.int64)
    return out


def write_noisy_labels(
    root: Path, classes: list[str], labels: dict[str, np.ndarray], fraction: float, seed: int, kind: str = "swap"
) -> list[str]:
    """Corrupt `fraction` of the images in `labels` (their true class indices) in `root/labels.csv`
    (rewritten whole, then renamed over the old file) and list them in `root/corrupted.csv`.
    Returns the corrupted ids."""
    path = Path(root) / "labels.csv"
    rows = read_labels_csv(path)
    noisy = corrupt_labels(labels, len(classes), fraction, seed, kind)
    names = lambda ks: " ".join(classes[k - 1] for k in ks)  # noqa: E731
    table = [(i, names(noisy[i]) if i in noisy else " ".join(row.names)) for i, row in rows.items()]
    write_csv_atomically(path, ("id", "labels"), table)
    truth = [(i, names(labels[i]), names(noisy[i])) for i in sorted(noisy)]
    write_csv_atomically(Path(root) / CORRUPTED_NAME, ("id", "true_labels", "noisy_labels"), truth)
    return sorted(noisy)


def read_corrupted(path: Path) -> set[str]:
    """Ids listed in a corrupted.csv (or a plain file with one id per line)."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadData(f"cannot read the list of corrupted ids {path}: {exc}") from None
    ids = [line.split(",")[0].strip() for line in lines if line.strip()]
    return {i for i in ids if i and i != "id"}
