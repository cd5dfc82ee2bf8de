"""train-seg: DeepLabV3 on the CRF pseudo-labels, or on GT masks as the upper bound (docs/METHOD.md §7).

Cross-entropy over background + C classes with 255 ignored (plain, or background and objects weighed half
each: `loss = "balanced"`), SGD with momentum (head lr x
head_lr_mult), poly decay, random rescale/flip/crop applied identically to image and label.
As in train-cls, every random choice (init, epoch order, augmentation, dropout) derives from the
seed, the epoch and the image index, and `seg/last.pt` holds model, optimizer and step after each
epoch, so a resumed run ends with the same weights as an uninterrupted one.

`--labels gt` trains on the GT masks: the fully supervised upper bound. Its manifest record,
checkpoint, predictions and every evaluation of them say `upper_bound: true`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from igcam_cli.config import RunOptions, TrainSegConfig, changed_settings, result_settings, to_dict
from igcam_cli.core.cam import multiscale_cams
from igcam_cli.core.metrics import confusion_matrix, scores
from igcam_cli.core.seg_loss import seg_loss
from igcam_cli.data.base import Dataset
from igcam_cli.data.transforms import normalize, seg_train_view
from igcam_cli.errors import BadData, MissingArtifact, UsageError
from igcam_cli.models.segmenter import Segmenter, build_segmenter, load_segmenter
from igcam_cli.runtime import distributed as ddp
from igcam_cli.runtime import training
from igcam_cli.runtime.batching import image_loader, same_size_batches
from igcam_cli.runtime.devices import autocast, memory_format, place_model, resolve_device, seed_everything
from igcam_cli.runtime.progress import StageLog
from igcam_cli.store import LabelStore
from igcam_cli.workspace import Workspace, input_key

LABEL_SOURCES = ("pseudo", "gt")


@dataclass
class TrainOptions:
    resume: bool = False
    init_from: str | None = None
    force: bool = False  # train over a finished model.pt


class _SegImages(training.EpochDataset):
    """(image, label) pairs: augmented crops (train=True) or whole images. `labels=None` reads GT masks."""

    def __init__(
        self, dataset: Dataset, ids: list[str], labels: LabelStore | None, cfg: TrainSegConfig, seed: int, train: bool
    ):
        self.dataset, self.ids, self.labels, self.cfg, self.seed, self.train = dataset, ids, labels, cfg, seed, train
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_id = self.ids[index]
        if self.labels is None:
            sample = self.dataset.load(image_id, with_mask=True)
            if sample.mask is None:
                raise BadData(f"no ground-truth mask for image '{image_id}'")
            image, label, what = sample.image, sample.mask, "its GT mask"
        else:
            image = self.dataset.load(image_id, with_mask=False).image
            label, what = self.labels.read(image_id), f"pseudo-label {self.labels.path(image_id)}"
        if image.shape[:2] != label.shape:
            raise BadData(
                f"{what} is {label.shape[1]}x{label.shape[0]} but image '{image_id}' is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            low, high = self.cfg.scale_min * self.cfg.input_scale, self.cfg.scale_max * self.cfg.input_scale
            return seg_train_view(image, label, self.cfg.crop, low, high, rng)
        return normalize(image), torch.from_numpy(label.astype(np.int64))


def run(cfg: TrainSegConfig, ws: Workspace, opts: RunOptions, train: TrainOptions) -> Segmenter:
    log = StageLog(ws.log_path("train-seg"), quiet=opts.quiet or not ddp.is_main())
    dataset = ws.dataset()
    _check(cfg, dataset)
    ids = dataset.ids(cfg.split)
    if not ids:
        raise BadData(f"split '{cfg.split}' has no images")
    labels, crf_record = _label_source(cfg, ws, dataset, ids)
    skipped = labels.skipped() if labels is not None else {}
    if skipped:  # crf --skip-bad left them out: they have no pseudo-label
        ids = [i for i in ids if i not in skipped]
        log(f"train-seg: {len(skipped)} images of '{cfg.split}' were skipped as unreadable by crf; trains without them")
    # the GT masks are read where they are the labels, and for the per-epoch val mIoU
    ids, unreadable = training.without_unreadable(dataset, ids, opts.skip_bad, log, with_mask=cfg.labels == "gt")
    val_ids, val_unreadable = training.without_unreadable(
        dataset, _val_ids(cfg, dataset, log), opts.skip_bad, log, with_mask=True
    )
    if not ids:
        raise BadData(f"split '{cfg.split}': no image can be read")

    device = ddp.device(resolve_device(opts.device))
    seed_everything(opts.seed)
    pretrained, cls_record = _pretrained(cfg, ws)
    model, weights = _initial_model(cfg, dataset.num_classes + 1, pretrained, train.init_from)
    training.refuse_replacing(ws.model_path("seg"), train.resume, train.force)
    if ddp.world_size() > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    place_model(model, device)
    optimizer, base_lrs = training.sgd(model, cfg)

    inputs = {input_key("crf", cfg.split): crf_record["id"]} if crf_record else {}
    if cls_record is not None and train.init_from is None:
        inputs[input_key("train-cls")] = cls_record["id"]
    provenance: dict[str, Any] = {
        "labels": cfg.labels,
        "upper_bound": cfg.labels == "gt",
        "oracle": bool((crf_record or {}).get("oracle", False)),
    }
    batch = ddp.process_batch(cfg.batch_size, smallest=2)  # BatchNorm cannot train on one image
    steps_per_epoch = -(-len(ddp.shard_indices(len(ids))) // batch)
    epochs = run_epochs(cfg, steps_per_epoch)
    ws.seg_dir.mkdir(parents=True, exist_ok=True)
    last_path, model_path = ws.seg_dir / "last.pt", ws.seg_dir / "model.pt"
    start_epoch, step = 0, 0
    if train.resume and last_path.is_file():
        start_epoch, step = _restore(last_path, cfg, inputs, model, optimizer)
        latest = ws.latest("train-seg")
        if (
            start_epoch >= epochs
            and model_path.is_file()
            and latest
            and latest["status"] == "done"
            and not changed_settings(cfg, latest["config"])  # `--resume --workers 4` changes nothing
            and latest.get("inputs") == inputs
        ):
            # Finished already: a new record would mark every prediction stale for the same weights.
            log(f"train-seg: {model_path} already holds all {epochs} epochs; nothing to do")
            return model
        log(f"resuming from {last_path} after epoch {start_epoch}")
    elif train.resume:
        log(f"--resume: no {last_path} yet, starting from scratch")

    net = ddp.wrap(model, device)
    train_data = _SegImages(dataset, ids, labels, cfg, opts.seed, train=True)
    total_steps = max(1, steps_per_epoch * epochs)
    source = "GT masks (UPPER BOUND, fully supervised)" if cfg.labels == "gt" else f"pseudo/{cfg.split}"
    if provenance["oracle"]:
        log("ORACLE: these pseudo-labels come from GT-guided maps (refine --guidance gt); not weakly supervised")
    drawn = f", images drawn x{cfg.input_scale:g}" if cfg.input_scale != 1 else ""
    log(
        f"train-seg: {cfg.arch} ({weights}), {len(ids)} images of '{cfg.split}' labelled by {source}, "
        f"{_epochs_said(cfg, epochs, steps_per_epoch)}, "
        f"batch {cfg.batch_size} ({batch} x {ddp.world_size()} process(es)), "
        f"crop {cfg.crop}{drawn}, {cfg.loss} loss, device {device}"
        + (f"; val mIoU on '{cfg.val_split}' ({len(val_ids)} images, arg-max without predict's CRF)" if val_ids else "")
    )

    def loss_of(batch) -> torch.Tensor:
        x, y = (t.to(device, non_blocking=True) for t in batch)
        with autocast(device):
            logits = net(x.contiguous(memory_format=memory_format(device)))
        return seg_loss(logits, y, balanced=cfg.loss == "balanced")

    lock = training.lock_model(model_path)  # before the record: a refused run leaves none
    record = (
        ws.start(
            "train-seg",
            to_dict(cfg),
            seed=opts.seed,
            device=str(device),
            inputs=inputs,
            **provenance,
            **training.skipped_field(unreadable | val_unreadable),
        )
        if ddp.is_main()
        else None
    )
    metrics: dict[str, float] = {}
    try:
        with record or nullcontext():  # None on the other ranks
            for epoch in range(start_epoch, epochs):
                torch.manual_seed(_epoch_seed(opts.seed, epoch))  # dropout in the ASPP head, loader seeds
                batches = training.epoch_batches(train_data, epoch, epochs, opts.seed, batch, cfg.workers, device, log)
                net.train()
                loss, step = training.fit_epoch(batches, optimizer, base_lrs, step, total_steps, loss_of)
                metrics = {"epoch": epoch + 1, "train_loss": loss}
                if val_ids and ddp.is_main():
                    metrics["val_miou"] = evaluate_miou(model, dataset, val_ids, cfg, device)
                if ddp.is_main():
                    _save(last_path, cfg, inputs, model, optimizer, epoch + 1, step)
                    val = f", val mIoU {metrics['val_miou'] * 100:.1f} %" if "val_miou" in metrics else ""
                    log(f"epoch {epoch + 1}/{epochs}: loss {loss:.4f}{val}")
            if record is not None:  # the main rank
                _save_final(model_path, cfg, model, dataset.classes, provenance)
                record.finish(outputs=[str(model_path)], metrics=metrics)
                log(f"saved {model_path}")
    finally:
        if lock is not None:
            lock.release()
        ddp.barrier()
    return model


def run_epochs(cfg: TrainSegConfig, steps_per_epoch: int) -> int:
    """cfg.epochs, raised where needed so that the run takes at least cfg.min_steps SGD steps."""
    return max(cfg.epochs, -(-cfg.min_steps // max(1, steps_per_epoch)))


def _epochs_said(cfg: TrainSegConfig, epochs: int, steps_per_epoch: int) -> str:
    if epochs == cfg.epochs:
        return f"{epochs} epochs"
    return f"{epochs} epochs ({cfg.epochs} raised for min_steps {cfg.min_steps}: {steps_per_epoch} steps an epoch)"


def evaluate_miou(
    model: Segmenter, dataset: Dataset, ids: list[str], cfg: TrainSegConfig, device: torch.device
) -> float:
    """Single-scale mIoU against the GT masks of `ids` (the per-epoch validation score), images drawn at
    `input_scale`."""
    data = _SegImages(dataset, ids, None, cfg, seed=0, train=False)
    loader = image_loader(data, cfg.batch_size, cfg.workers, device)
    n = dataset.num_classes + 1
    conf = np.zeros((n, n), dtype=np.int64)
    was_training = model.training
    model.eval()

    def logits_fn(x: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            return model(x)

    with torch.no_grad():
        for batch in same_size_batches(loader, cfg.batch_size, lambda item: tuple(item[0].shape)):
            x = torch.stack([item[0] for item in batch]).to(device, memory_format=memory_format(device))
            # drawn at input_scale, scored at the mask's size
            pred = multiscale_cams(logits_fn, x, [cfg.input_scale], flip=False).argmax(1).cpu().numpy()
            for (_, y), p in zip(batch, pred):
                conf += confusion_matrix(y.numpy(), p, n)
    model.train(was_training)
    return scores(conf)["miou"]


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.default_rng([seed, epoch, ddp.rank(), 7]).integers(2**62))


def _check(cfg: TrainSegConfig, dataset: Dataset) -> None:
    if cfg.split not in dataset.splits():
        raise BadData(f"dataset has no split '{cfg.split}' (splits: {', '.join(dataset.splits())})")


def _label_source(
    cfg: TrainSegConfig, ws: Workspace, dataset: Dataset, ids: list[str]
) -> tuple[LabelStore | None, dict | None]:
    """(pseudo-label store, the crf run that wrote it), or (None, None) for GT masks."""
    if cfg.labels == "gt":
        if not dataset.has_masks(cfg.split):
            raise BadData(f"--labels gt: split '{cfg.split}' lacks ground-truth masks ({dataset.gt_source})")
        return None, None
    store = ws.pseudo(cfg.split)
    have = store.ids() | set(store.skipped())
    missing = [i for i in ids if i not in have]
    if missing:
        state = "missing" if len(missing) == len(ids) else f"missing for {len(missing)} of {len(ids)} images"
        raise MissingArtifact(
            f"pseudo-labels for split '{cfg.split}' {state}: run `{ws.command('crf', cfg.split)}` first"
        )
    record = ws.latest("crf", cfg.split)
    return store, record


def _val_ids(cfg: TrainSegConfig, dataset: Dataset, log: Callable[[str], object]) -> list[str]:
    if not cfg.val_split:
        return []
    if cfg.val_split not in dataset.splits():
        log(f"train-seg: no validation: the dataset has no split '{cfg.val_split}' ({', '.join(dataset.splits())})")
        return []
    if not dataset.has_masks(cfg.val_split):
        log(f"train-seg: no validation: split '{cfg.val_split}' has no GT masks")
        return []
    return dataset.ids(cfg.val_split)


def _pretrained(cfg: TrainSegConfig, ws: Workspace) -> tuple[str, dict | None]:
    """`--pretrained` as build_segmenter takes it; `cls` is the workspace's classifier, its latest round
    (its backbone was trained on the same image-level labels), returned with its train-cls record."""
    if cfg.pretrained != "cls":
        return cfg.pretrained, None
    path, round_ = ws.cls_model()
    if not path.is_file():
        raise MissingArtifact(
            f"--pretrained cls: no trained classifier at {path}: run `{ws.command('train-cls')}` first"
        )
    return str(path), ws.classifier_run(round_)


def _initial_model(
    cfg: TrainSegConfig, num_classes: int, pretrained: str, init_from: str | None
) -> tuple[Segmenter, str]:
    if init_from is None:
        return build_segmenter(cfg.arch, num_classes, pretrained)
    path = Path(init_from)
    if not path.is_file():
        raise BadData(f"--init-from: file not found: {path}")
    model, meta = load_segmenter(path, "igcam train-seg")
    if model.arch != cfg.arch or model.num_classes != num_classes:
        raise BadData(
            f"--init-from {init_from}: a {model.arch} with {model.num_classes} outputs, "
            f"but this run trains a {cfg.arch} with {num_classes} (background + classes)"
        )
    return model, f"weights from {path}"


def _restore(path: Path, cfg: TrainSegConfig, inputs: dict, model: Segmenter, optimizer) -> tuple[int, int]:
    keys = result_settings(cfg)
    ckpt = training.restore(path, cfg, keys, model, optimizer)
    if ckpt.get("inputs", {}) != inputs:
        raise UsageError(
            f"--resume: the pseudo-labels or the backbone they start from changed since {path} was "
            "written (crf or train-cls ran again); rerun without --resume to start over"
        )
    return ckpt["epoch"], ckpt["step"]


def _save(path: Path, cfg: TrainSegConfig, inputs: dict, model: Segmenter, optimizer, epoch: int, step: int) -> None:
    training.atomic_save(
        {
            "config": to_dict(cfg),
            "inputs": inputs,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "step": step,
        },
        path,
    )


def _save_final(path: Path, cfg: TrainSegConfig, model: Segmenter, classes: list[str], provenance: dict) -> None:
    training.atomic_save(
        {
            "arch": cfg.arch,
            "num_classes": model.num_classes,
            "classes": classes,
            "config": to_dict(cfg),
            **provenance,
            "model": model.state_dict(),
        },
        path,
    )
