"""train-irn: IRN's class-boundary network, trained on inter-pixel relation labels made from the CAMs.

Two phases. IR labels (docs/RANDOM_WALK.md): each image's CAMs through IRN's two CRF passes give
confident foreground, confident background and 255 in between, written once to
`irn/ir_labels/<split>/` (resumable; redone when the CAMs or thresholds change). Training: IRN's
boundary branch on a frozen ResNet, with IRN's affinity loss on the pairs of the stride-4 label grid,
poly schedule; `irn/last.pt` after each epoch, so `--resume` ends with the same weights.
`refine --method irn|both` then walks the CAMs with the boundary map; it refuses CAMs drawn by another
classifier than the one these IR labels came from.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from igcam_cli import map_stage
from igcam_cli.config import RunOptions, TrainIrnConfig, result_settings, to_dict
from igcam_cli.core.densecrf import ir_labels
from igcam_cli.core.random_walk import affinity_pair_labels, downsample_ir_labels, path_offsets
from igcam_cli.data.base import Dataset, Unreadable
from igcam_cli.data.transforms import seg_train_view
from igcam_cli.errors import BadData, UsageError
from igcam_cli.models.boundary_net import BoundaryNet, boundary_net_loss
from igcam_cli.models.classifier import STAGE4_LAYOUT, build_classifier, load_checkpoint
from igcam_cli.runtime import training
from igcam_cli.runtime.devices import autocast, memory_format, place_model, resolve_device, seed_everything
from igcam_cli.runtime.pool import map_ordered, process_pool
from igcam_cli.runtime.progress import StageLog
from igcam_cli.store import LabelStore, MapStore
from igcam_cli.workspace import Workspace, input_key

IR_SOURCE_NAME = "source.json"  # in irn/ir_labels/<split>/: the CAM run and thresholds the labels came from


@dataclass
class TrainOptions:
    resume: bool = False
    force: bool = False  # train over a finished irn/model.pt


class _RelationImages(training.EpochDataset):
    """Augmented (image, stride-4 IR labels) pairs: rescale, flip and crop applied to both."""

    def __init__(self, dataset: Dataset, labels: LabelStore, ids: list[str], cfg: TrainIrnConfig, seed: int):
        self.dataset, self.labels, self.ids, self.cfg, self.seed = dataset, labels, ids, cfg, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        sample = self.dataset.load(self.ids[index], with_mask=False)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        label = self.labels.read(sample.id)
        x, y = seg_train_view(sample.image, label, self.cfg.crop, self.cfg.scale_min, self.cfg.scale_max, rng)
        return x, downsample_ir_labels(y).contiguous()


def run(cfg: TrainIrnConfig, ws: Workspace, opts: RunOptions, train: TrainOptions | None = None) -> BoundaryNet:
    train = train or TrainOptions()
    log = StageLog(ws.log_path("train-irn"), quiet=opts.quiet)
    dataset = ws.dataset()
    if cfg.split not in dataset.splits():
        raise BadData(f"dataset has no split '{cfg.split}' (splits: {', '.join(dataset.splits())})")
    ids = dataset.ids(cfg.split)
    cams = ws.complete_maps("cams", cfg.split, ids)
    skipped = cams.skipped()  # images a make-cams --skip-bad run could not read
    ids = [i for i in ids if i not in skipped]
    cams_record = ws.require_done("make-cams", cfg.split, what=f"cams for split '{cfg.split}'")
    training.refuse_replacing(ws.model_path("irn"), train.resume, train.force)
    labels = _ir_labels(ws, cfg, dataset, cams, ids, cams_record["id"], log)

    device = resolve_device(opts.device)
    seed_everything(opts.seed)
    model = _initial_model(cfg, ws)
    place_model(model, device)
    params = model.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    base_lrs = [cfg.lr]
    out_dir = ws.path("irn")
    last_path, model_path = out_dir / "last.pt", out_dir / "model.pt"
    start_epoch, step = 0, 0
    inputs = {input_key("make-cams", cfg.split): cams_record["id"]}
    if train.resume and last_path.is_file():
        ckpt = training.restore(last_path, cfg, result_settings(cfg), model, optimizer)
        if ckpt.get("inputs") != inputs:
            raise UsageError(
                f"--resume: the CAMs changed since {last_path} was written (make-cams ran again); "
                "rerun without --resume to start over"
            )
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        log(f"resuming from {last_path} after epoch {start_epoch}")
    elif train.resume:
        log(f"--resume: no {last_path} yet, starting from scratch")

    offsets = path_offsets(cfg.radius)
    data = _RelationImages(dataset, labels, ids, cfg, opts.seed)
    steps_per_epoch = -(-len(ids) // cfg.batch_size)
    total_steps = max(1, steps_per_epoch * cfg.epochs)
    backbone = cfg.backbone if cfg.pretrained != "cls" else f"the classifier's {model.backbone_name}"
    log(
        f"train-irn: boundary network on {backbone} ({cfg.pretrained}), {len(ids)} images of '{cfg.split}', "
        f"{cfg.epochs} epochs, batch {cfg.batch_size}, crop {cfg.crop}, pairs within {cfg.radius} "
        f"({len(offsets)} directions), device {device}"
    )

    def loss_of(batch) -> torch.Tensor:
        x, y = (t.to(device, non_blocking=True) for t in batch)
        pairs = affinity_pair_labels(y, offsets)
        with autocast(device):
            return boundary_net_loss(model, x.contiguous(memory_format=memory_format(device)), pairs, offsets)

    out_dir.mkdir(parents=True, exist_ok=True)
    lock = training.lock_model(model_path)  # before the record: a refused run leaves none
    record = ws.start(
        "train-irn",
        to_dict(cfg),
        split=cfg.split,
        seed=opts.seed,
        device=str(device),
        classifier=cams_record.get("classifier"),
        inputs=inputs,
    )
    loss = float("nan")
    record.on_exit = lock.release if lock is not None else None
    with record:
        for epoch in range(start_epoch, cfg.epochs):
            batches = training.epoch_batches(
                data, epoch, cfg.epochs, opts.seed, cfg.batch_size, cfg.workers, device, log
            )
            model.train()
            loss, step = training.fit_epoch(batches, optimizer, base_lrs, step, total_steps, loss_of)
            training.atomic_save(
                {
                    "config": to_dict(cfg),
                    "inputs": inputs,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "step": step,
                },
                last_path,
            )
            log(f"epoch {epoch + 1}/{cfg.epochs}: affinity loss {loss:.4f}")
        training.atomic_save(
            {
                "backbone": model.backbone_name,
                "stage4": STAGE4_LAYOUT,
                "config": to_dict(cfg),
                "classifier": cams_record.get("classifier"),
                "model": model.state_dict(),
            },
            model_path,
        )
        record.finish(outputs=[str(model_path)], metrics={"train_loss": loss, "epochs": cfg.epochs})
    log(f"saved {model_path}")
    return model


def _initial_model(cfg: TrainIrnConfig, ws: Workspace) -> BoundaryNet:
    """IRN's boundary branch on a frozen ResNet with IRN's strides: fresh ImageNet weights, the workspace
    classifier's backbone (`cls`: where no ImageNet weights apply, e.g. from-scratch synthetic runs) or a file."""
    if cfg.pretrained == "cls":
        path, _ = ws.cls_model()
        classifier = load_checkpoint(path, ws.command("train-cls"))
    else:
        classifier = build_classifier(cfg.backbone, 1, cfg.pretrained)
    return BoundaryNet.from_classifier(classifier)


def _ir_labels(
    ws: Workspace, cfg: TrainIrnConfig, dataset: Dataset, cams: MapStore, ids: list[str], cams_run: str, log
) -> LabelStore:
    """irn/ir_labels/<split>/: made for the images that lack them, all redone when the CAMs or thresholds changed."""
    directory = ws.path("irn", "ir_labels", cfg.split)
    source = {"cams_run": cams_run, "fg_threshold": cfg.fg_threshold, "bg_threshold": cfg.bg_threshold}
    meta = directory / IR_SOURCE_NAME
    if directory.is_dir() and (not meta.is_file() or json.loads(meta.read_text()) != source):
        shutil.rmtree(directory)
        log(f"train-irn: IR labels of '{cfg.split}' came from other CAMs or thresholds; making them again")
    directory.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(source))
    store = LabelStore(directory)
    done = store.ids()  # one directory listing, not one per image
    todo = [i for i in ids if i not in done]
    log(
        f"train-irn: IR labels of '{cfg.split}' (fg {cfg.fg_threshold}, bg {cfg.bg_threshold}): "
        f"{len(todo)} to do, {len(ids) - len(todo)} already done"
    )
    with process_pool(cfg.workers) as pool:
        results = map_ordered(pool, ir_labels, _ir_jobs(dataset, cams, todo, cfg), ahead=2 * max(1, cfg.workers))
        for image_id, label in log.track(results, len(todo), "IR labels"):
            store.write(image_id, label)
    return store


def _ir_jobs(dataset: Dataset, cams: MapStore, ids: list[str], cfg: TrainIrnConfig) -> Iterator[tuple]:
    for item in map_stage.images_with_maps(dataset, cams, ids, "cams"):
        assert not isinstance(item, Unreadable)  # only a skip_bad reader yields them
        image_id, image, record = item
        yield image_id, (image, record.maps, record.classes, cfg.fg_threshold, cfg.bg_threshold)
