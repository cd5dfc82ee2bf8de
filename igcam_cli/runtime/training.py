"""Pieces the two training stages (train-cls, train-seg) share: optimizer, poly schedule, loader, checkpoints."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from igcam_cli.atomic import write_atomically
from igcam_cli.data.base import Unreadable, load_or_skip
from igcam_cli.errors import BadData, StorageError, UsageError
from igcam_cli.runtime import distributed as ddp
from igcam_cli.runtime.locks import OutputLock
from igcam_cli.runtime.pool import available_cpus

POLY_POWER = 0.9


class EpochDataset(TorchDataset):
    """A training set whose augmentation is seeded by `epoch`, which `epoch_batches` sets."""

    epoch: int = 0

    def __len__(self) -> int:
        raise NotImplementedError


def sgd(model, cfg) -> tuple[torch.optim.SGD, list[float]]:
    """SGD with momentum over `model.param_groups()` (backbone at cfg.lr, head at cfg.lr * head_lr_mult);
    returns the optimizer and its base learning rates for `poly_lr`."""
    backbone_params, head_params = model.param_groups()
    optimizer = torch.optim.SGD(
        [{"params": backbone_params, "lr": cfg.lr}, {"params": head_params, "lr": cfg.lr * cfg.head_lr_mult}],
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )
    return optimizer, [g["lr"] for g in optimizer.param_groups]


def poly_lr(optimizer, base_lrs: list[float], step: int, total_steps: int, warmup_steps: int = 0) -> None:
    """Poly decay, after a linear warm-up over the first `warmup_steps` steps (0: none)."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * warm * (1 - step / total_steps) ** POLY_POWER


def train_loader(
    data: TorchDataset, indices: list[int], batch_size: int, workers: int, device: torch.device
) -> DataLoader:
    """Batches of `data[indices]` in that order (the epoch's seeded permutation, already sharded)."""
    workers = min(workers, available_cpus())
    return DataLoader(
        torch.utils.data.Subset(data, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def epoch_batches(
    data: EpochDataset, epoch: int, epochs: int, seed: int, batch_size: int, workers: int, device: torch.device, log
) -> Iterable:
    """One epoch's training batches: this rank's share of a permutation seeded by (seed, epoch), so a
    resumed run sees the same order; `data.epoch` seeds its augmentation. Tracked in the stage log."""
    data.epoch = epoch
    order = np.random.default_rng([seed, epoch]).permutation(len(data)).tolist()
    indices = ddp.shard_indices(order)
    if len(indices) % batch_size == 1:  # BatchNorm cannot train on a batch of one image (DeepLab's pooled branch)
        indices.append(indices[0])  # the last batch gets a second image; the number of steps stays the same
    loader = train_loader(data, indices, batch_size, workers, device)
    return log.track(loader, len(loader), f"epoch {epoch + 1}/{epochs}", unit="batch")


def without_unreadable(
    dataset, ids: list[str], skip_bad: bool, log, with_mask: bool = False
) -> tuple[list[str], dict[str, str]]:
    """With `--skip-bad`, `ids` less the images that cannot be read (`with_mask`: or whose GT mask cannot), and
    those (id -> why). Every image is decoded once before training, on threads, so each epoch and a resumed run
    see the same images."""
    if not skip_bad:
        return ids, {}
    with ThreadPoolExecutor(max_workers=available_cpus()) as threads:
        loaded = threads.map(lambda i: load_or_skip(dataset, i, True, with_mask=with_mask), ids)
        skipped = {s.id: s.reason for s in loaded if isinstance(s, Unreadable)}
    for image_id, reason in skipped.items():
        log(f"skipped '{image_id}': {reason}")
    return [i for i in ids if i not in skipped], skipped


def skipped_field(unreadable: dict[str, str]) -> dict[str, Any]:
    """The training record's `skipped` field: the images --skip-bad left out (none: no field)."""
    return {"skipped": unreadable} if unreadable else {}


def refuse_replacing(model_path: Path, resume: bool, force: bool) -> None:
    """Nothing finished is replaced without --force: a trained model.pt stays unless the run is forced,
    or resumed (which continues an interrupted run, or finds this one done and leaves it)."""
    if model_path.is_file() and not (resume or force):
        raise UsageError(
            f"{model_path} already holds a trained model: pass --force to train a new one in its place, "
            "or --resume to continue an interrupted run"
        )


def lock_model(model_path: Path) -> OutputLock | None:
    """One training run at a time per model: the main rank takes a lock beside model.pt (release it when the
    run ends; the kernel drops it if the process dies), a second run is refused in one line."""
    if not ddp.is_main():
        return None
    return OutputLock(model_path.with_name(f".{model_path.name}.lock"), str(model_path)).acquire()


def atomic_save(obj, path: Path) -> None:
    """torch.save under a temporary name, then a rename: a killed run never leaves half a checkpoint."""
    try:
        write_atomically(path, lambda tmp: torch.save(obj, tmp))
    except RuntimeError as exc:
        if "write" in str(exc):  # torch's stream writer on a full disk
            first = str(exc).strip().splitlines()[0]
            raise StorageError(
                f"cannot write {path} ({first}): is the disk full? Free some space and rerun with --resume"
            ) from None
        raise


def fit_epoch(
    batches: Iterable,
    optimizer,
    base_lrs: list[float],
    step: int,
    total_steps: int,
    loss_of: Callable[[object], torch.Tensor],
    warmup_steps: int = 0,
) -> tuple[float, int]:
    """One epoch of SGD with the poly schedule (after `warmup_steps` of linear warm-up): `loss_of(batch)`
    moves a batch to the device and returns its loss. Returns the mean loss (nan without batches)
    and the step count after it."""
    losses = []
    for batch in batches:
        poly_lr(optimizer, base_lrs, step, total_steps, warmup_steps)
        loss = loss_of(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        step += 1
    return (sum(losses) / len(losses) if losses else float("nan")), step


def restore(path: Path, cfg, keys: Iterable[str], model, optimizer) -> dict:
    """--resume: load `path` (a `last.pt`) into model and optimizer after checking that the settings
    in `keys` equal cfg's (a key the checkpoint predates counts as its default). Returns the
    checkpoint (epoch, step, and whatever else the stage saved)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved = ckpt["config"]
    except Exception as exc:  # torch raises many types for a damaged file
        raise BadData(f"--resume: cannot read {path} ({exc}); rerun without --resume to start over") from None
    changed = [k for k in keys if saved.get(k, getattr(type(cfg), k, None)) != getattr(cfg, k)]
    if changed:
        raise UsageError(
            f"--resume: {path} was trained with different {', '.join(changed)}; rerun without --resume to start over"
        )
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise BadData(f"--resume: {path} does not fit this model ({exc}); rerun without --resume") from None
    return ckpt
