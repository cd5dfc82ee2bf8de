"""What every per-image map stage does around its own work (make-cams, refine, crf, predict).

A map stage writes one output per image of a split (HDF5 parts, or label PNGs) and may be run
in shards, killed and resumed. `prepare` decides what this run may do: it takes the output's lock
(a second run of the same output and shard is refused, runtime/locks.py); with `--force` it first
deletes this shard's outputs; it refuses to add to outputs made with other settings or from
another run of an input (so an artifact never mixes two upstream runs); it removes the temporary
part a killed run of this shard left; it lists this shard's images not done yet. The stage then
starts its manifest record with `start`, writes the images in `todo`, and calls `finish`, which
records and logs how much of the split the output now covers.

`--skip-bad`: the stage's image readers put an `Unreadable` in place of an image whose file raises
BadData, and `readable` drops it from the stream into `skipped`. `finish` writes the output's skip
list (store.py) and names the count in the record and the final line. Images the input artifact
skipped are not in `todo` and are carried into this output's skip list, so evaluate and the stages
after know to leave them out. A rerun tries the skipped images again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from igcam_cli.config import to_dict
from igcam_cli.data.base import Unreadable, load_or_skip
from igcam_cli.errors import BadData
from igcam_cli.runtime.distributed import Shard
from igcam_cli.runtime.locks import OutputLock
from igcam_cli.runtime.progress import StageLog
from igcam_cli.store import LabelStore, MapStore, clear_skipped, write_skipped
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
    skip_bad: bool = False
    skipped: dict[str, str] = field(default_factory=dict)  # id -> why: unreadable now, or skipped upstream

    def start(self, compute: str | None = None, **extra: Any) -> StageRun:
        """The manifest record of this run (use it as a context manager around the work; leaving it
        releases the output's lock). `compute` (what computes the numbers: runtime/devices.py describe) is
        recorded; a run that adds to images made on something else records every one (`computed_on`) and
        says so in a note."""
        if compute is not None:
            extra["compute"] = compute
            previous = [
                r
                for r in self.ws.records()
                if r["stage"] == self.stage and r.get("split") == self.name and r.get("shard") == str(self.shard)
            ]
            adds_to_earlier = self.todo and len(self.todo) < len(self.mine) - len(self.skipped)
            if previous and adds_to_earlier:
                before = previous[-1].get("computed_on") or [previous[-1].get("compute")]
                computed_on = sorted({c for c in before if c} | {compute})
                if len(computed_on) > 1:
                    extra["computed_on"] = computed_on
                    self.log(
                        f"note: {self.what} holds images computed on {' and on '.join(computed_on)}; their numbers "
                        "may differ in the last bits (--force redoes them all on this one)"
                    )
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
        upstream = f", {len(self.skipped)} skipped upstream" if self.skipped else ""
        done = len(self.mine) - len(self.todo) - len(self.skipped)
        return f"{len(self.todo)} to do, {done} already done{upstream}"

    def readable(self, items: Iterable[Any]) -> Iterator[Any]:
        """`items` without the Unreadable ones (a --skip-bad run's), which go to `skipped` with a log line."""
        for item in items:
            if isinstance(item, Unreadable):
                self.skipped[item.id] = item.reason
                self.log(f"skipped '{item.id}': {item.reason}")
                continue
            yield item

    def finish(self, **metrics: Any) -> int:
        """Write the shard's skip list, finish the record with the output's coverage of the split and log
        it; returns the images written."""
        assert self.record is not None, "start() first"
        rank = self.shard.index
        retried = set(self.todo) | set(self.skipped)
        kept = {i: why for i, why in self.store.skipped(rank).items() if i not in retried}
        write_skipped(self.store.directory, rank, kept | self.skipped)
        coverage = len(self.store.ids() & set(self.ids))
        skipped = {i: why for i, why in self.store.skipped().items() if i in set(self.ids)}
        extra = {"skipped": skipped} if skipped else {}
        metrics = {"images": coverage, **({"skipped": len(skipped)} if skipped else {}), **metrics}
        self.record.finish(outputs=[str(self.store.directory)], metrics=metrics, **extra)
        line = f"{self.what}: {coverage} of {len(self.ids)} images"
        if skipped:
            line += f"; {len(skipped)} skipped as unreadable ({', '.join(_first(skipped))})"
        self.log(line)
        return len(self.todo)


def _first(skipped: dict[str, str], shown: int = 5) -> list[str]:
    names = list(skipped)[:shown]
    return names + ([f"{len(skipped) - shown} more in the run's record"] if len(skipped) > shown else [])


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
    skip_bad: bool = False,
    upstream: MapStore | LabelStore | None = None,
) -> MapStage:
    """The run's MapStage, its to-do list filled in. `also_delete(id)`: a file --force deletes beside
    an image's output (predict's overlays). `upstream`: the artifact the stage reads, whose skipped
    images this output skips too."""
    job = MapStage(
        ws,
        stage,
        cfg,
        store,
        name,
        ids,
        shard,
        inputs,
        log,
        what or f"{store.directory.parent.name}/{name}",
        skip_bad=skip_bad,
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
    if upstream is not None:
        inherited = upstream.skipped()
        job.skipped = {i: inherited[i] for i in job.mine if i in inherited}
        if job.skipped:
            log(f"{job.what}: leaves out {len(job.skipped)} images its input skipped as unreadable")
    job.todo = [i for i in job.mine if i not in done and i not in job.skipped]
    return job


def _delete(
    store: MapStore | LabelStore, ids: list[str], shard: Shard, also_delete: Callable[[str], Path] | None
) -> None:
    """--force: the shard's outputs go wherever an earlier run put them. A run split into another number of
    shards wrote them under other ranks: the map parts holding any of them go too (with the other images they
    hold, which their own shards redo), and the skip lists of ranks no shard of this run has."""
    if shard.count > 1:
        clear_skipped(store.directory, from_rank=shard.count)
    if isinstance(store, MapStore):
        store.clear(rank=None if shard.count == 1 else shard.index)
        store.clear_images(ids)
        return
    clear_skipped(store.directory, None if shard.count == 1 else shard.index)
    for image_id in ids:
        store.path(image_id).unlink(missing_ok=True)
        if also_delete is not None:
            also_delete(image_id).unlink(missing_ok=True)


def images_with_maps(
    dataset, maps: MapStore, ids: list[str], what: str, skip_bad: bool = False
) -> Iterator[tuple[str, np.ndarray, Any] | Unreadable]:
    """(id, uint8 image, map record) for `ids` (with `skip_bad`, an Unreadable for an image that cannot be
    read), or BadData where an image and its maps (`what`, e.g. "cams") differ in size: they were made
    from another version of the dataset."""
    for image_id, record in maps.iter_records(ids):
        sample = load_or_skip(dataset, image_id, skip_bad)
        if isinstance(sample, Unreadable):
            yield sample
            continue
        image = sample.image
        if image.shape[:2] != record.maps.shape[1:]:
            raise BadData(
                f"{what} maps of '{image_id}' are {record.maps.shape[2]}x{record.maps.shape[1]} "
                f"but the image is {image.shape[1]}x{image.shape[0]}: rerun the upstream stage with --force"
            )
        yield image_id, image, record
