"""What every per-image map stage does around its own work (make-cams, refine, crf, predict).

A map stage writes one output per image of a split (HDF5 parts, or label PNGs) and may be run
in shards, killed and resumed. `prepare` decides what this run may do: it takes the output's lock
(a second run of the same output and shard is refused, runtime/locks.py); with `--force` it first
deletes this shard's outputs; it refuses to add to outputs made with other settings or from
another run of an input (so an artifact never mixes two upstream runs); it removes the temporary
part a killed run of this shard left; it lists this shard's images not done yet. The stage then
starts its manifest record with `start`, writes the images in `todo`, and calls `finish`, which
records and logs how much of the split the output now covers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from igcam_cli.config import to_dict
from igcam_cli.errors import BadData
from igcam_cli.runtime.distributed import Shard
from igcam_cli.runtime.locks import OutputLock
from igcam_cli.runtime.progress import StageLog
from igcam_cli.store import LabelStore, MapStore
from igcam_cli.workspace import StageRun, Workspace


@dataclass
class MapStage:
    ws: Workspace
    stage: str
    cfg: Any
    store: MapStore | LabelStore
    name: str  # the split (or, for predict, the output name) the record is filed under
    ids: list[str]  # every image the finished output covers
    shard: Shard
    inputs: dict[str, str | None]  # input key -> the run this output is made from (None: none has run)
    log: StageLog
    what: str  # the output, in messages: "refined/train"
    todo: list[str] = field(default_factory=list)
    mine: list[str] = field(default_factory=list)
    record: StageRun | None = None
    lock: OutputLock | None = None  # held from prepare() to the end of the record's `with` block

    def start(self, **extra: Any) -> StageRun:
        """The manifest record of this run (use it as a context manager around the work; leaving it
        releases the output's lock)."""
        self.record = self.ws.start(
            self.stage,
            to_dict(self.cfg),
            split=self.name,
            shard=str(self.shard),
            inputs={key: run for key, run in self.inputs.items() if run},
            **extra,
        )
        self.record.on_exit = self.lock.release if self.lock is not None else None
        return self.record

    @property
    def progress(self) -> str:
        return f"{len(self.todo)} to do, {len(self.mine) - len(self.todo)} already done"

    def finish(self, **metrics: Any) -> int:
        """Finish the record with the output's coverage of the split, log it; returns the images written."""
        assert self.record is not None, "start() first"
        coverage = len(self.store.ids() & set(self.ids))
        self.record.finish(outputs=[str(self.store.directory)], metrics={"images": coverage, **metrics})
        self.log(f"{self.what}: {coverage} of {len(self.ids)} images")
        return len(self.todo)


def prepare(
    ws: Workspace,
    stage: str,
    cfg: Any,
    store: MapStore | LabelStore,
    name: str,
    ids: list[str],
    shard: Shard,
    force: bool,
    inputs: dict[str, str | None],
    log: StageLog,
    what: str | None = None,
    remedy: str = "pass --force to redo it",
    also_delete: Callable[[str], Path] | None = None,
) -> MapStage:
    """The run's MapStage, its to-do list filled in. `also_delete(id)`: a file --force deletes beside
    an image's output (predict's overlays)."""
    job = MapStage(
        ws, stage, cfg, store, name, ids, shard, inputs, log, what or f"{store.directory.parent.name}/{name}"
    )
    job.mine = shard.select(ids)
    # before anything is deleted: a second run must not remove the first one's parts or temporaries
    job.lock = OutputLock(store.directory.parent / f".{store.directory.name}.lock-r{shard.index}", job.what).acquire()
    if force:
        _delete(store, job.mine, shard, also_delete)
    ws.check_resumable(stage, name, cfg, has_output=len(store) > 0, inputs=inputs, what=what, remedy=remedy)
    if isinstance(store, MapStore):
        store.remove_temporaries(rank=shard.index)
    done = store.ids()
    job.todo = [i for i in job.mine if i not in done]
    return job


def _delete(
    store: MapStore | LabelStore, ids: list[str], shard: Shard, also_delete: Callable[[str], Path] | None
) -> None:
    if isinstance(store, MapStore):
        store.clear(rank=None if shard.count == 1 else shard.index)
        return
    for image_id in ids:
        store.path(image_id).unlink(missing_ok=True)
        if also_delete is not None:
            also_delete(image_id).unlink(missing_ok=True)


def images_with_maps(dataset, maps: MapStore, ids: list[str], what: str) -> Iterator[tuple[str, np.ndarray, Any]]:
    """(id, uint8 image, map record) for `ids`, or BadData where an image and its maps (`what`, e.g. "cams")
    differ in size: they were made from another version of the dataset."""
    for image_id, record in maps.iter_records(ids):
        image = dataset.load(image_id, with_mask=False).image
        if image.shape[:2] != record.maps.shape[1:]:
            raise BadData(
                f"{what} maps of '{image_id}' are {record.maps.shape[2]}x{record.maps.shape[1]} "
                f"but the image is {image.shape[1]}x{image.shape[0]}: rerun the upstream stage with --force"
            )
        yield image_id, image, record
