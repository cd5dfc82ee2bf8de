"""train-cls: the multi-label CAM classifier (docs/METHOD.md §1).

Every random choice (init, epoch order, augmentation) derives from the seed, the epoch and the
image index, and `cls/last.pt` holds model, optimizer and step after each epoch, so a resumed
run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from igcam_cli import influence_io
from igcam_cli.config import RunOptions, TrainClsConfig, changed_settings, result_settings, to_dict
from igcam_cli.core.metrics import class_prior_loss, mean_average_precision
from igcam_cli.data.base import Dataset
from igcam_cli.data.transforms import eval_view, multi_hot, train_view
from igcam_cli.errors import BadData, MissingArtifact
from igcam_cli.models.classifier import STAGE4_LAYOUT, CamClassifier, build_classifier, load_checkpoint
from igcam_cli.runtime import distributed as ddp
from igcam_cli.runtime import training
from igcam_cli.runtime.devices import autocast, memory_format, place_model, resolve_device, seed_everything
from igcam_cli.runtime.progress import StageLog
from igcam_cli.workspace import Workspace, classifier_key, input_key

# The training loss must fall below LEARNED_MARGIN x the class-prior loss (what the label
# frequencies alone achieve) at the end, and below EARLY_MARGIN x it after a few epochs (the first
# epoch that is at least the LEARNED_CHECK_EPOCHS-th and ends LEARNED_CHECK_STEPS steps in: a tiny
# dataset's 3 epochs are a handful of steps, too few for a network from scratch). Measured with the
# synthetic defaults: the demo (`heads`, prior 0.609) is at 0.47 after epoch 3 (0.78 x) and ends at
# 0.13; the harder `textured` style (prior 0.606) is at 0.555 after epoch 3 (0.92 x) while its val
# mAP already reads 60 %, hence the looser early margin; a run that learns nothing stays near 1 x.
LEARNED_MARGIN = 0.85
EARLY_MARGIN = 0.95
LEARNED_CHECK_EPOCHS = 3
LEARNED_CHECK_STEPS = 50


@dataclass
class TrainOptions:
    resume: bool = False
    init_from: str | None = None
    force: bool = False  # train over a finished model.pt


class _ClassifierImages(training.EpochDataset):
    """Augmented training views (train=True) or fixed-size views with multi-hot targets."""

    def __init__(
        self,
        dataset: Dataset,
        ids: list[str],
        cfg: TrainClsConfig,
        seed: int,
        train: bool,
        weights: list[float] | None = None,
        relabelled: dict[str, np.ndarray] | None = None,
    ):
        self.dataset, self.ids, self.cfg, self.seed, self.train = dataset, ids, cfg, seed, train
        self.weights, self.relabelled = weights, relabelled or {}
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ids)

    def target(self, index: int) -> torch.Tensor:
        """The multi-hot labels image `index` trains on, without decoding it."""
        image_id = self.ids[index]
        return multi_hot(self.relabelled.get(image_id, self.dataset.labels(image_id)), self.dataset.num_classes)

    def __getitem__(self, index: int):
        sample = self.dataset.load(self.ids[index], with_mask=False)
        target = multi_hot(self.relabelled.get(sample.id, sample.labels), self.dataset.num_classes)
        crop, crop_height = drawn_canvas(self.cfg)
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            view = train_view(sample.image, crop, self.cfg.scale_min, self.cfg.scale_max, rng, crop_height)
        else:
            view = eval_view(sample.image, crop, crop_height)
        return view, target, torch.tensor(1.0 if self.weights is None else self.weights[index])


def run(cfg: TrainClsConfig, ws: Workspace, opts: RunOptions, train: TrainOptions) -> CamClassifier:
    log = StageLog(ws.log_path("train-cls"), quiet=opts.quiet or not ddp.is_main())
    dataset = ws.dataset()
    _check(cfg, dataset)
    ids = dataset.ids(cfg.split)
    if not ids:
        raise BadData(f"split '{cfg.split}' has no images")
    val_ids = dataset.ids(cfg.val_split) if cfg.val_split in dataset.splits() else []
    if cfg.val_split and not val_ids:
        log(f"train-cls: no validation: the dataset has no split '{cfg.val_split}' ({', '.join(dataset.splits())})")
    ids, skipped = training.without_unreadable(dataset, ids, opts.skip_bad, log)
    val_ids, val_skipped = training.without_unreadable(dataset, val_ids, opts.skip_bad, log)
    if not ids:
        raise BadData(f"split '{cfg.split}': no image can be read")

    weights, relabelled, influence_record = _sample_weights(cfg, ws, ids, log)
    schedule = _schedule(cfg)
    device = ddp.device(resolve_device(opts.device))
    seed_everything(opts.seed)
    model = _initial_model(cfg, dataset.num_classes, train.init_from, ws)
    training.refuse_replacing(ws.model_path("cls", cfg.round), train.resume, train.force)
    if _random_start(cfg, train.init_from) and (cfg.freeze_bn or cfg.frozen_stages):
        # BN frozen at its random initialisation (identity statistics) stops the loss moving; frozen random
        # stages would only pass noise on
        log(
            f"train-cls: freeze_bn and frozen_stages ignored: the backbone starts from random weights (pretrained "
            f"{cfg.pretrained}), so every stage and its BatchNorm layers are trained"
        )
    else:
        if cfg.freeze_bn:
            model.freeze_batchnorm()
        model.freeze_stages(cfg.frozen_stages)
    place_model(model, device)
    optimizer, base_lrs = training.sgd(model, schedule)

    out_dir = ws.cls_round_dir(cfg.round)
    last_path, model_path = out_dir / "last.pt", out_dir / "model.pt"
    out_dir.mkdir(parents=True, exist_ok=True)
    start_epoch, step, learned_early = 0, 0, None  # learned_early: the verdict after the first few epochs
    if train.resume and last_path.is_file():
        start_epoch, step, learned_early = _restore(last_path, cfg, model, optimizer)
        latest = ws.classifier_run(cfg.round, done=False)
        if (
            start_epoch >= schedule.epochs
            and model_path.is_file()
            and latest
            and latest["status"] == "done"
            and not changed_settings(cfg, latest["config"])  # `--resume --workers 4` changes nothing
        ):
            # Finished already: a new record would mark everything downstream stale for the same weights.
            log(f"train-cls: {model_path} already holds all {schedule.epochs} epochs; nothing to do")
            return model
        log(f"resuming from {last_path} after epoch {start_epoch}")
    elif train.resume:
        log(f"--resume: no {last_path} yet, starting from scratch")

    inputs = {}
    if cfg.round > 1 and train.init_from is None:
        previous = ws.classifier_run(cfg.round - 1)
        inputs = {classifier_key(cfg.round - 1): previous["id"]} if previous else {}
    if influence_record:
        inputs[input_key("compute-influence", cfg.split)] = influence_record["id"]
    net = ddp.wrap(model, device)
    train_data = _ClassifierImages(
        dataset,
        ids,
        cfg,
        opts.seed,
        train=True,
        weights=weights,
        relabelled={r.id: influence_io.class_list(r.suggested, dataset.num_classes) for r in relabelled or []},
    )
    prior = class_prior_loss(torch.stack([train_data.target(i) for i in range(len(ids))]).numpy(), weights)
    batch = ddp.process_batch(cfg.batch_size)
    steps_per_epoch = -(-len(ddp.shard_indices(len(ids))) // batch)
    check_at = {schedule.epochs, max(LEARNED_CHECK_EPOCHS, -(-LEARNED_CHECK_STEPS // steps_per_epoch))}
    total_steps = max(1, steps_per_epoch * schedule.epochs)
    # at most a quarter of the run: a short run (a test's single epoch) would otherwise never reach its lr
    warmup_steps = min(steps_per_epoch * schedule.warmup_epochs, total_steps // 4)
    how = "" if cfg.round == 1 else f", fine-tuning round {cfg.round - 1}'s model at lr {schedule.lr:g}"
    log(
        f"train-cls: {cfg.backbone} ({cfg.pretrained}), {len(ids)} images of '{cfg.split}', "
        f"{schedule.epochs} epochs{how}, batch {cfg.batch_size} ({batch} x {ddp.world_size()} process(es)), "
        f"crop {_crop_said(cfg)}, device {device}"
    )

    def loss_of(batch) -> torch.Tensor:
        x, y, w = (t.to(device, non_blocking=True) for t in batch)
        with autocast(device):
            logits, _ = net(x.contiguous(memory_format=memory_format(device)))
        if weights is None:
            return F.multilabel_soft_margin_loss(logits.float(), y)
        # per-image weights (mean 1 over the split) on the per-image loss
        return (F.multilabel_soft_margin_loss(logits.float(), y, reduction="none") * w).mean()

    lock = training.lock_model(model_path)  # before the record: a refused run leaves none
    record = (
        ws.start(
            "train-cls",
            to_dict(cfg),
            seed=opts.seed,
            device=str(device),
            round=cfg.round,
            classifier={"round": cfg.round, "path": str(model_path.relative_to(ws.root))},
            inputs=inputs,
            **training.skipped_field(skipped | val_skipped),
        )
        if ddp.is_main()
        else None
    )
    metrics: dict[str, float] = {}
    learned: bool | None = None
    try:
        with record or nullcontext():  # None on the other ranks
            for epoch in range(start_epoch, schedule.epochs):
                batches = training.epoch_batches(
                    train_data, epoch, schedule.epochs, opts.seed, batch, cfg.workers, device, log
                )
                net.train()
                loss, step = training.fit_epoch(
                    batches, optimizer, base_lrs, step, total_steps, loss_of, warmup_steps=warmup_steps
                )
                metrics = {"epoch": epoch + 1, "train_loss": loss}
                if val_ids and ddp.is_main():
                    metrics["val_map"] = evaluate_map(model, dataset, val_ids, cfg, device)
                if ddp.is_main():
                    val = f", val mAP {metrics['val_map'] * 100:.1f}" if "val_map" in metrics else ""
                    log(f"epoch {epoch + 1}/{schedule.epochs}: loss {loss:.4f}{val}")
                    if epoch + 1 in check_at:
                        last = epoch + 1 == schedule.epochs
                        learned = _check_learned(loss, prior, epoch + 1, last, log)
                        if not last:
                            learned_early = learned
                    _save(last_path, cfg, model, optimizer, epoch + 1, step, learned_early)
            if record is not None:  # the main rank
                _save_final(model_path, cfg, model, dataset.classes)
                _save_relabelled(out_dir / influence_io.RELABELLED_NAME, relabelled)
                record.finish(
                    outputs=[str(model_path)],
                    metrics={
                        **metrics,
                        "lr": schedule.lr,
                        "epochs": schedule.epochs,
                        "prior_loss": prior,
                        **({"learned": learned} if learned is not None else {}),
                        **({"learned_early": learned_early} if learned_early is not None else {}),
                        **({"relabelled": len(relabelled)} if relabelled is not None else {}),
                    },
                )
                log(f"saved {model_path}")
    finally:
        if lock is not None:
            lock.release()
        ddp.barrier()
    return model


def evaluate_map(
    model: CamClassifier, dataset: Dataset, ids: list[str], cfg: TrainClsConfig, device: torch.device
) -> float:
    """Mean average precision of the image-level predictions on `ids`."""
    data = _ClassifierImages(dataset, ids, cfg, seed=0, train=False)
    loader = training.train_loader(data, list(range(len(ids))), cfg.batch_size, cfg.workers, device)
    was_training = model.training
    model.eval()
    scores, targets = [], []
    with torch.no_grad():
        for x, y, _ in loader:
            with autocast(device):
                logits, _ = model(x.to(device, memory_format=memory_format(device)))
            scores.append(logits.float().cpu())
            targets.append(y)
    model.train(was_training)
    return mean_average_precision(torch.cat(scores).numpy(), torch.cat(targets).numpy())


def _random_start(cfg: TrainClsConfig, init_from: str | None) -> bool:
    """Whether the backbone starts from random weights (not ImageNet, a file, --init-from or a previous round)."""
    return cfg.pretrained == "none" and init_from is None and cfg.round == 1


def _check_learned(loss: float, prior: float, epoch: int, last: bool, log) -> bool:
    """Whether the training loss is clearly below the class-prior loss; warns when it is not."""
    if loss <= (LEARNED_MARGIN if last else EARLY_MARGIN) * prior:
        return True
    verdict = (
        "the classifier has not learned, and its CAMs will be near chance"
        if last
        else "the classifier has not learned so far, and its CAMs would be near chance"
    )
    log(
        f"warning: train-cls: training loss {loss:.3f} after {epoch} epochs is not clearly below the class-prior "
        f"loss {prior:.3f} (labels alone); {verdict}"
    )
    return False


def drawn_canvas(cfg: TrainClsConfig) -> tuple[int, int]:
    """(crop, crop_height) in the drawn pixels: the configured canvas times input_scale."""
    return round(cfg.crop * cfg.input_scale), round(cfg.crop_height * cfg.input_scale)


def _crop_said(cfg: TrainClsConfig) -> str:
    crop, crop_height = drawn_canvas(cfg)
    said = f"{crop_height}x{crop}" if crop_height else str(crop)
    return said + (f" (crop {cfg.crop} of the images, drawn x{cfg.input_scale:g})" if cfg.input_scale != 1 else "")


def _check(cfg: TrainClsConfig, dataset: Dataset) -> None:
    if cfg.split not in dataset.splits():
        raise BadData(f"dataset has no split '{cfg.split}' (splits: {', '.join(dataset.splits())})")


def _schedule(cfg: TrainClsConfig) -> TrainClsConfig:
    """The learning rate and epochs this round trains with: rounds >= 2 fine-tune the previous
    round's model, gently (lr x finetune_lr_mult, half the epochs unless finetune_epochs is set)."""
    if cfg.round == 1:
        return cfg
    return replace(
        cfg, lr=cfg.lr * cfg.finetune_lr_mult, epochs=cfg.finetune_epochs or max(1, cfg.epochs // 2), warmup_epochs=0
    )


def _sample_weights(
    cfg: TrainClsConfig, ws: Workspace, ids: list[str], log
) -> tuple[list[float] | None, list[influence_io.ImageScore] | None, dict | None]:
    """Per-image loss weights in `ids` order from compute-influence's scores.csv (None: unweighted),
    the images to train on their suggested labels (None: no relabelling) and the influence run."""
    if cfg.sample_weights == "none":
        return None, None, None
    command = ws.command("compute-influence", cfg.split) + (f" --round {cfg.round - 1}" if cfg.round > 2 else "")
    scores = influence_io.read_scores(ws.influence_dir(cfg.split), ids, command, ws.dataset().num_classes)
    record = ws.latest("compute-influence", cfg.split)
    used = (record or {}).get("classifier", {}).get("round")
    if used is not None and used != cfg.round - 1:
        log(f"note: the influence weights come from classifier round {used}, not round {cfg.round - 1}")
    relabelled = [scores[i] for i in ids if scores[i].relabelled] if cfg.relabel else None
    # A relabelled image's atypicality was measured against the labels it no longer trains on: full weight.
    fresh = {r.id for r in relabelled or []}
    weights = [1.0 if i in fresh else scores[i].weight for i in ids]
    low = sum(w < 1 for w in weights)
    log(
        f"sample weights from {ws.influence_dir(cfg.split) / influence_io.SCORES_NAME} "
        f"(classifier round {used}): {low} of {len(ids)} images down-weighted, min {min(weights):.3f}"
        + (f"; {len(fresh)} images relabelled as compute-influence suggests" if relabelled is not None else "")
    )
    return weights, relabelled, record


def _initial_model(cfg: TrainClsConfig, num_classes: int, init_from: str | None, ws: Workspace) -> CamClassifier:
    if init_from is None and cfg.round > 1:  # progressive training: fine-tune the previous round's model
        path, _ = ws.cls_model(cfg.round - 1)
        command = ws.cls_command(cfg.round - 1)
        if not path.is_file():
            raise MissingArtifact(
                f"round {cfg.round} fine-tunes round {cfg.round - 1}'s classifier, and {path} "
                f"is missing: run `{command}` first"
            )
        init_from = str(path)
    if init_from is None:
        return build_classifier(cfg.backbone, num_classes, cfg.pretrained)
    model = load_checkpoint(Path(init_from), f"igcam train-cls -w {ws.root}")
    if model.backbone_name != cfg.backbone or model.num_classes != num_classes:
        raise BadData(
            f"--init-from {init_from}: a {model.backbone_name} with {model.num_classes} classes, "
            f"but this run trains a {cfg.backbone} with {num_classes} classes"
        )
    return model


def _restore(path: Path, cfg: TrainClsConfig, model: CamClassifier, optimizer) -> tuple[int, int, bool | None]:
    keys = [k for k in result_settings(cfg) if k != "round"]  # `round` picks the checkpoint itself
    ckpt = training.restore(path, cfg, keys, model, optimizer)
    return ckpt["epoch"], ckpt["step"], ckpt.get("learned_early")  # older checkpoints lack the verdict


def _save(
    path: Path, cfg: TrainClsConfig, model: CamClassifier, optimizer, epoch: int, step: int, learned_early: bool | None
) -> None:
    training.atomic_save(
        {
            "config": to_dict(cfg),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "step": step,
            "learned_early": learned_early,  # a resumed run records the verdict of epochs it does not rerun
        },
        path,
    )


def _save_relabelled(path: Path, relabelled: list[influence_io.ImageScore] | None) -> None:
    """Replaced together with model.pt (make-cams --label-source auto pairs the two): the images
    this run trained on suggested labels, or no file when it did not relabel."""
    path.unlink(missing_ok=True)
    if relabelled is not None:
        influence_io.write_relabelled(path, relabelled)


def _save_final(path: Path, cfg: TrainClsConfig, model: CamClassifier, classes: list[str]) -> None:
    training.atomic_save(
        {
            "backbone": cfg.backbone,
            "stage4": STAGE4_LAYOUT,
            "num_classes": model.num_classes,
            "classes": classes,
            "config": to_dict(cfg),
            "model": model.state_dict(),
        },
        path,
    )
