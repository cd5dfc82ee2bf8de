"""make-cams: multi-scale, flip-augmented CAMs for a split (docs/METHOD.md §3), resumable and shardable."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from igcam_cli import influence_io, map_stage
from igcam_cli.config import MakeCamsConfig, RunOptions
from igcam_cli.core.cam import (
    capped_size,
    normalize_cams,
    own_side_cap,
    pyramid_cams,
    pyramid_size,
    resize_bicubic_like_pil,
)
from igcam_cli.core.fusion import fuse
from igcam_cli.data.base import Dataset, Unreadable, load_or_skip
from igcam_cli.data.transforms import normalize_on_device
from igcam_cli.errors import MissingArtifact, UsageError
from igcam_cli.models.classifier import load_checkpoint
from igcam_cli.runtime.batching import image_loader, same_size_batches
from igcam_cli.runtime.devices import autocast, describe, memory_format, place_model, resolve_device
from igcam_cli.runtime.distributed import Shard, local_device
from igcam_cli.runtime.progress import StageLog
from igcam_cli.store import MapStore
from igcam_cli.workspace import Workspace, classifier_key, input_key


@dataclass
class _Item:
    id: str
    image: torch.Tensor  # 3 x H x W, uint8 (IRN resizes the uint8 image, then normalises)
    labels: np.ndarray
    influence: dict[int, np.ndarray] | None = None  # class -> spatial influence map (h x w), for fusion


class _Images(TorchDataset):
    def __init__(
        self,
        dataset: Dataset,
        ids: list[str],
        influence: MapStore | None = None,
        relabelled: dict[str, np.ndarray] | None = None,
        skip_bad: bool = False,
    ):
        self.dataset, self.ids, self.influence, self.relabelled = dataset, ids, influence, relabelled or {}
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> _Item | Unreadable:
        sample = load_or_skip(self.dataset, self.ids[index], self.skip_bad)
        if isinstance(sample, Unreadable):
            return sample
        influence = None
        if self.influence is not None:
            maps, classes, _ = influence_io.read_maps(self.influence, sample.id)
            influence = {int(c): m for c, m in zip(classes, maps)}
        image = torch.from_numpy(sample.image.transpose(2, 0, 1).copy())
        return _Item(sample.id, image, self.relabelled.get(sample.id, sample.labels), influence)


def run(cfg: MakeCamsConfig, ws: Workspace, opts: RunOptions, shard: Shard = Shard(), force: bool = False) -> int:
    """Computes CAMs for this shard's images not yet in `cams/<split>`; returns how many it wrote."""
    log = StageLog(ws.log_path("make-cams"), quiet=opts.quiet)
    dataset = ws.dataset()
    split_ids = dataset.ids(cfg.split)
    model_path, round_ = ws.cls_model(cfg.round)
    model = load_checkpoint(model_path, ws.cls_command(round_), dataset.num_classes)
    influence = _influence_store(ws, cfg, split_ids) if cfg.influence_fusion > 0 else None
    relabelled = _trained_labels(ws, cfg, round_, split_ids, dataset.num_classes)
    chosen = "chosen with --round" if cfg.round is not None else "the latest"
    device = local_device(resolve_device(opts.device))
    place_model(model, device).eval()

    store = ws.maps("cams", cfg.split)
    cls_record = ws.classifier_run(round_)
    classifier = {
        "round": round_,
        "path": str(model_path.relative_to(ws.root)),
        "run": (cls_record or {}).get("id"),
        "input_scale": model.input_scale,  # refine reads the CAM grid from it
    }
    previous = (ws.latest("make-cams", cfg.split) or {}).get("classifier")
    if not force and len(store) > 0 and previous and previous.get("run") != classifier["run"]:
        raise UsageError(
            f"cams for split '{cfg.split}' were made with classifier round {previous.get('round')} "
            f"({previous.get('path')}); pass --force to redo them with round {round_}"
        )
    # The latest round by default: any newer round makes these CAMs stale; --round N ties them to round N.
    cls_key = input_key("train-cls") if cfg.round is None else classifier_key(round_)
    inputs = {cls_key: cls_record["id"] if cls_record else None}
    influence_record = ws.latest("compute-influence", cfg.split) if influence is not None else None
    if influence_record:
        inputs[input_key("compute-influence", cfg.split)] = influence_record["id"]
    job = map_stage.prepare(
        ws, "make-cams", cfg, store, cfg.split, split_ids, shard, force, inputs, log, skip_bad=opts.skip_bad
    )
    record = job.start(
        describe(device), classifier=classifier, **({"relabelled": len(relabelled)} if relabelled else {})
    )
    log(f"make-cams: classifier round {round_} ({model_path}, {chosen})")
    if relabelled:
        log(
            f"make-cams: {len(relabelled)} images of '{cfg.split}' use the labels classifier round {round_} was "
            f"trained on ({ws.cls_round_dir(round_) / influence_io.RELABELLED_NAME}); --label-source labels uses the "
            "image labels"
        )
    log(
        f"make-cams '{cfg.split}' shard {shard}: {job.progress}; scales {cfg.scales}"
        + (f" x the classifier's input scale {model.input_scale:g}" if model.input_scale != 1 else "")
        + f", flip {cfg.flip}, "
        f"influence fusion {cfg.influence_fusion}, longer side at most {cfg.max_side or 'as is'} px, device {device}"
    )
    with record:
        with store.writer(rank=shard.index, source="make-cams") as writer, torch.no_grad():
            for batch in log.track(
                same_size_batches(
                    job.readable(_loader(dataset, job.todo, cfg, device, influence, relabelled, opts.skip_bad)),
                    cfg.batch_size,
                    _image_size,
                ),
                total=-(-len(job.todo) // cfg.batch_size),
                description="cams",
                unit="batch",
            ):
                _write_batch(batch, model, cfg, device, writer)
        return job.finish(split_images=len(split_ids))


def _write_batch(batch: list[_Item], model, cfg: MakeCamsConfig, device: torch.device, writer) -> None:
    x = torch.stack([item.image for item in batch]).to(device, memory_format=memory_format(device))
    size = (x.shape[-2], x.shape[-1])
    # a large photo is drawn smaller, its maps upsampled; the cap holds for the classifier's drawn size
    drawn = capped_size(size, own_side_cap(cfg.max_side, model.input_scale))
    if drawn is not None:
        x = resize_bicubic_like_pil(x.float(), drawn)
    scales = [s * model.input_scale for s in cfg.scales]  # at the size the classifier saw its images
    with autocast(device):
        cams = pyramid_cams(model.cams, x, scales, cfg.flip, prepare=normalize_on_device)
        logits = None
        if cfg.label_source == "predicted":
            drawn_x = (
                x.float()
                if model.input_scale == 1
                else resize_bicubic_like_pil(x.float(), pyramid_size(size, model.input_scale))
            )
            logits = model(normalize_on_device(drawn_x))[0].float()
    for b, item in enumerate(batch):
        if logits is None:
            classes = np.asarray(item.labels, dtype=np.int64)
        else:
            classes = (torch.nonzero(torch.sigmoid(logits[b]) > cfg.predict_threshold).flatten() + 1).cpu().numpy()
        chosen = cams[b, torch.as_tensor(classes - 1, dtype=torch.long, device=device)]
        if drawn is not None and len(classes):
            chosen = F.interpolate(chosen[None], size=size, mode="bilinear", align_corners=False)[0]
        elif drawn is not None:
            chosen = chosen.new_zeros((0, *size))
        maps = normalize_cams(chosen)
        if cfg.influence_fusion > 0 and len(classes):
            maps = fuse(maps, _influence_maps(item, classes), cfg.influence_fusion)
        writer.write(item.id, maps.cpu().numpy(), classes.astype(np.uint8))


def _influence_maps(item: _Item, classes: np.ndarray) -> torch.Tensor:
    """K x h x w influence maps of `classes` (zeros for a class compute-influence has no map of)."""
    influence = item.influence or {}  # set (maybe empty) whenever fusion is on
    shape = next(iter(influence.values())).shape if influence else (1, 1)
    zeros = np.zeros(shape, dtype=np.float32)
    return torch.from_numpy(np.stack([influence.get(int(c), zeros) for c in classes]))


def _influence_store(ws: Workspace, cfg: MakeCamsConfig, split_ids: list[str]) -> MapStore:
    source = ws.latest("compute-influence", cfg.split)
    if source is not None and source["config"].get("maps") == "none":
        raise UsageError(
            f"--influence-fusion: influence/{cfg.split} holds no spatial maps (computed with --maps none): "
            f"run `{ws.command('compute-influence', cfg.split)} --maps labelled --force` first"
        )
    store = MapStore(ws.influence_dir(cfg.split))
    missing = len(set(split_ids) - store.ids())
    if missing:
        state = (
            "missing"
            if missing == len(split_ids)
            else f"incomplete ({len(split_ids) - missing} of {len(split_ids)} images)"
        )
        raise MissingArtifact(
            f"influence maps for split '{cfg.split}' {state} (--influence-fusion): "
            f"run `{ws.command('compute-influence', cfg.split)}` first"
        )
    return store


def _trained_labels(
    ws: Workspace, cfg: MakeCamsConfig, round_: int, split_ids: list[str], num_classes: int
) -> dict[str, np.ndarray]:
    """--label-source auto: the split's images that classifier round `round_` trained on suggested
    labels (its relabelled.csv), with those labels; {} for the other sources and plain rounds."""
    path = ws.cls_round_dir(round_) / influence_io.RELABELLED_NAME
    if cfg.label_source != "auto" or not path.is_file():
        return {}
    wanted = set(split_ids)
    return {i: labels for i, labels in influence_io.read_relabelled(path, num_classes).items() if i in wanted}


def _loader(
    dataset: Dataset,
    ids: list[str],
    cfg: MakeCamsConfig,
    device: torch.device,
    influence: MapStore | None = None,
    relabelled: dict[str, np.ndarray] | None = None,
    skip_bad: bool = False,
) -> DataLoader:
    images = _Images(dataset, ids, influence, relabelled, skip_bad)
    return image_loader(images, cfg.batch_size, cfg.workers, device)


def _image_size(item: _Item) -> tuple[int, ...]:
    return tuple(item.image.shape)
