"""make-cams: multi-scale, flip-augmented CAMs for a split (METHOD.md §3), resumable and shardable."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset as TorchDataset

from igcam_cli.config import MakeCamsConfig, RunOptions, to_dict
from igcam_cli.core.cam import multiscale_cams, normalize_cams
from igcam_cli.data.base import Dataset
from igcam_cli.data.transforms import normalize
from igcam_cli.errors import BadData, UsageError
from igcam_cli.models.classifier import load_checkpoint
from igcam_cli.runtime.devices import autocast, memory_format, resolve_device
from igcam_cli.runtime.distributed import Shard, local_device
from igcam_cli.runtime.batching import same_size_batches
from igcam_cli.runtime.progress import StageLog
from igcam_cli.workspace import Workspace, input_key


@dataclass
class _Item:
    id: str
    image: torch.Tensor  # 3 x H x W, normalised
    labels: np.ndarray


class _Images(TorchDataset):
    def __init__(self, dataset: Dataset, ids: list[str]):
        self.dataset, self.ids = dataset, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> _Item:
        sample = self.dataset.load(self.ids[index], with_mask=False)
        return _Item(sample.id, normalize(sample.image), sample.labels)


def run(cfg: MakeCamsConfig, ws: Workspace, opts: RunOptions, shard: Shard = Shard(), force: bool = False) -> int:
    """Computes CAMs for this shard's images not yet in `cams/<split>`; returns how many it wrote."""
    log = StageLog(ws.log_path("make-cams"), quiet=opts.quiet)
    if not cfg.scales or any(s <= 0 for s in cfg.scales):
        raise UsageError("--scales must be positive numbers, e.g. 1.0,0.5,1.5,2.0")
    if cfg.label_source not in ("labels", "predicted"):
        raise UsageError("--label-source must be 'labels' or 'predicted'")
    dataset = ws.dataset()
    split_ids = dataset.ids(cfg.split)
    model = load_checkpoint(ws.cls_dir / "model.pt", ws.command("train-cls"))
    if model.num_classes != dataset.num_classes:
        raise BadData(f"{ws.cls_dir / 'model.pt'} has {model.num_classes} classes but the dataset has "
                      f"{dataset.num_classes}: retrain with `{ws.command('train-cls')}`")
    device = local_device(resolve_device(opts.device))
    model.to(device, memory_format=memory_format(device)).eval()

    store = ws.maps("cams", cfg.split)
    if force:
        store.clear(rank=None if shard.count == 1 else shard.index)
    ws.check_resumable("make-cams", cfg.split, to_dict(cfg), has_output=len(store) > 0)
    store.remove_temporaries(rank=shard.index)
    done = store.ids()
    todo = [i for i in shard.select(split_ids) if i not in done]
    cls_record = ws.latest("train-cls")
    record = ws.start("make-cams", to_dict(cfg), split=cfg.split, shard=str(shard),
                      inputs={input_key("train-cls"): cls_record["id"]} if cls_record else {})
    log(f"make-cams '{cfg.split}' shard {shard}: {len(todo)} to do, {len(shard.select(split_ids)) - len(todo)} "
        f"already done; scales {cfg.scales}, flip {cfg.flip}, device {device}")
    try:
        with store.writer(rank=shard.index, source="make-cams") as writer, torch.no_grad():
            for batch in log.track(same_size_batches(_loader(dataset, todo, cfg, device), cfg.batch_size, _image_size),
                                   total=-(-len(todo) // cfg.batch_size), description="cams", unit="batch"):
                _write_batch(batch, model, cfg, device, writer)
        coverage = len(store.ids() & set(split_ids))
        record.finish(outputs=[str(store.directory)], metrics={"images": coverage, "split_images": len(split_ids)})
    except BaseException as exc:
        record.fail(f"{type(exc).__name__}: {exc}")
        raise
    log(f"cams/{cfg.split}: {coverage} of {len(split_ids)} images")
    return len(todo)


def _write_batch(batch: list[_Item], model, cfg: MakeCamsConfig, device: torch.device, writer) -> None:
    x = torch.stack([item.image for item in batch]).to(device, memory_format=memory_format(device))
    with autocast(device):
        cams = multiscale_cams(model.cams, x, cfg.scales, cfg.flip)
        logits = model(x)[0].float() if cfg.label_source == "predicted" else None
    for b, item in enumerate(batch):
        if logits is None:
            classes = np.asarray(item.labels, dtype=np.int64)
        else:
            classes = (torch.nonzero(torch.sigmoid(logits[b]) > cfg.predict_threshold).flatten() + 1).cpu().numpy()
        maps = normalize_cams(cams[b, torch.as_tensor(classes - 1, dtype=torch.long, device=device)])
        writer.write(item.id, maps.cpu().numpy(), classes.astype(np.uint8))


def _loader(dataset: Dataset, ids: list[str], cfg: MakeCamsConfig, device: torch.device) -> DataLoader:
    workers = min(cfg.workers, os.cpu_count() or 1)
    return DataLoader(_Images(dataset, ids), batch_size=None, num_workers=workers,
                      pin_memory=device.type == "cuda", prefetch_factor=2 * cfg.batch_size if workers else None)


def _image_size(item: _Item) -> tuple[int, ...]:
    return tuple(item.image.shape)
