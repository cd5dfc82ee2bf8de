"""predict: label maps from the trained segmenter for a dataset split or any folder of images (docs/METHOD.md §7).

Softmax probabilities are averaged over scales and horizontal flips (images of one size share a
batch); an optional class gate drops the classes the workspace's classifier says an image lacks; an
optional dense CRF (on a CPU process pool) refines them over the classes that win some pixel.
Output: `pred/<name>/<id>.png` (VOC palette, the input's size) and `pred/<name>/overlays/<id>.jpg`.
Resumable (finished PNGs are skipped) and shardable.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset as TorchDataset

from igcam_cli import map_stage, report
from igcam_cli.config import PredictConfig, RunOptions
from igcam_cli.core.cam import capped_size, multiscale_cams
from igcam_cli.core.class_gate import gate_classes
from igcam_cli.core.densecrf import PRESETS, crf_refine
from igcam_cli.core.torch_crf import dense_crf_chunked
from igcam_cli.data.base import Dataset, Unreadable, load_or_skip
from igcam_cli.data.folder import IMAGE_SUFFIXES, index_files
from igcam_cli.data.imageio import read_image
from igcam_cli.data.transforms import normalize
from igcam_cli.errors import BadData, UsageError
from igcam_cli.models.classifier import CamClassifier, load_checkpoint
from igcam_cli.models.segmenter import Segmenter, load_segmenter
from igcam_cli.runtime.batching import image_loader, same_size_batches
from igcam_cli.runtime.devices import autocast, crf_backend, describe, memory_format, place_model, resolve_device
from igcam_cli.runtime.distributed import Shard, local_device
from igcam_cli.runtime.pool import map_ordered, process_pool, worker_count
from igcam_cli.runtime.progress import StageLog
from igcam_cli.store import LabelStore, check_id
from igcam_cli.workspace import Workspace, input_key

OVERLAYS = "overlays"


@dataclass
class _Item:
    id: str
    image: np.ndarray  # H x W x 3 uint8
    x: torch.Tensor  # 3 x H x W, normalised


class _SplitImages(TorchDataset):
    def __init__(self, dataset: Dataset, ids: list[str], skip_bad: bool):
        self.dataset, self.ids, self.skip_bad = dataset, ids, skip_bad

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> _Item | Unreadable:
        sample = load_or_skip(self.dataset, self.ids[index], self.skip_bad)
        if isinstance(sample, Unreadable):
            return sample
        return _Item(self.ids[index], sample.image, normalize(sample.image))


class _FolderImages(TorchDataset):
    def __init__(self, files: dict[str, Path], ids: list[str], skip_bad: bool):
        self.files, self.ids, self.skip_bad = files, ids, skip_bad

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> _Item | Unreadable:
        image_id = self.ids[index]
        try:
            image = read_image(self.files[image_id])  # BadData naming the file when unreadable
        except BadData as exc:
            if not self.skip_bad:
                raise
            return Unreadable(image_id, str(exc))
        return _Item(image_id, image, normalize(image))


def run(cfg: PredictConfig, ws: Workspace, opts: RunOptions, shard: Shard = Shard(), force: bool = False) -> int:
    """Writes `pred/<name>/<id>.png` for this shard's images not done yet; returns how many."""
    log = StageLog(ws.log_path("predict"), quiet=opts.quiet)
    _check(cfg)
    dataset = ws.dataset()
    model, meta = load_segmenter(ws.seg_dir / "model.pt", ws.command("train-seg"))
    if model.num_classes != dataset.num_classes + 1:
        raise BadData(
            f"{ws.seg_dir / 'model.pt'} predicts {model.num_classes} labels but the dataset has "
            f"{dataset.num_classes} classes + background: retrain with `{ws.command('train-seg')}`"
        )
    ids, make_images, cfg, name = _source(cfg, dataset)
    store = ws.predictions(name)
    seg_record = ws.latest("train-seg", done=True)  # the run that wrote model.pt, not a later failed one
    inputs = {input_key("train-seg"): seg_record["id"] if seg_record else None}
    classifier, gate = _gate_classifier(cfg, ws, dataset.num_classes)
    if classifier is not None and gate is not None:
        inputs[input_key("train-cls")] = gate["run"]
    remedy = "pass --force to redo it, or --out NAME to write elsewhere"
    device = local_device(resolve_device(opts.device))  # a bad --device before any record or deletion
    job = map_stage.prepare(
        ws,
        "predict",
        cfg,
        store,
        name,
        ids,
        shard,
        force,
        inputs,
        log,
        f"pred/{name}",
        remedy,
        also_delete=functools.partial(_overlay_path, store),
        skip_bad=opts.skip_bad,
    )

    provenance = {key: bool(meta.get(key) or (seg_record or {}).get(key)) for key in ("oracle", "upper_bound")}
    provenance["labels"] = meta.get("labels", "pseudo")
    workers, backend = worker_count(cfg.workers), crf_backend(cfg.crf_backend, device)
    compute = describe(device) + (f"; {backend} CRF" if cfg.crf else "")
    record = job.start(compute, workers=workers, class_gate=gate, **provenance)
    place_model(model, device).eval()
    if classifier is not None:
        place_model(classifier, device).eval()
    # the segmenter saw its images drawn input_scale times larger (train-seg's input_scale)
    input_scale = float((meta.get("config") or {}).get("input_scale", 1.0))
    scales = [s * input_scale for s in cfg.scales]
    what = f"split '{cfg.split}'" if cfg.split else f"folder {cfg.images}"
    where = f"torch on {device}" if backend == "torch" else f"pydensecrf, {workers} worker(s)"
    crf = f"CRF ({cfg.preset}, {where})" if cfg.crf else "no CRF"
    log(
        f"predict {what} -> pred/{name} shard {shard}: {job.progress}; "
        f"scales {cfg.scales}"
        + (f" x the segmenter's input scale {input_scale:g}" if input_scale != 1 else "")
        + f", flip {cfg.flip}, {crf}, device {device}"
        + (f"; {gate['said']}" if gate else "")
        + ("; model trained on GT masks (UPPER BOUND)" if provenance["upper_bound"] else "")
    )
    with record:
        loader = job.readable(image_loader(make_images(job.todo, opts.skip_bad), cfg.batch_size, workers, device))
        with process_pool(workers if cfg.crf and backend == "pydensecrf" else 0) as pool, torch.no_grad():
            predictions = _probabilities(loader, model, cfg, scales, device, classifier)
            for item, label in log.track(_labels(predictions, cfg, pool, workers, backend), len(job.todo), "predict"):
                if cfg.overlays:
                    report.write_overlay(_overlay_path(store, item.id), item.image, label)
                store.write(item.id, label)  # last: a PNG marks the image done
        return job.finish(source_images=len(ids))


def _check(cfg: PredictConfig) -> None:
    if (cfg.split is None) == (cfg.images is None):
        raise UsageError("predict needs exactly one of --split S (a dataset split) or --images DIR (a folder)")


def _source(
    cfg: PredictConfig, dataset: Dataset
) -> tuple[list[str], Callable[[list[str], bool], TorchDataset], PredictConfig, str]:
    """(ids, (ids, skip_bad) -> torch Dataset of _Items, cfg with `out` and an absolute `images` filled in, `out`)."""
    if cfg.split is not None:
        if cfg.split not in dataset.splits():
            raise BadData(f"dataset has no split '{cfg.split}' (splits: {', '.join(dataset.splits())})")
        ids = dataset.ids(cfg.split)
        out = _out_name(cfg.out or cfg.split)
        return ids, lambda todo, skip: _SplitImages(dataset, todo, skip), dataclasses.replace(cfg, out=out), out
    assert cfg.images is not None  # _check: exactly one of split and images
    folder = Path(cfg.images).expanduser()
    if not folder.is_dir():
        raise BadData(f"--images: no such folder: {folder}")
    files = index_files(folder, IMAGE_SUFFIXES)
    if not files:
        raise BadData(f"--images: no JPEG or PNG files in {folder}")
    folder = folder.resolve()
    out = _out_name(cfg.out or folder.name)
    return (
        list(files),
        lambda todo, skip: _FolderImages(files, todo, skip),
        dataclasses.replace(cfg, images=str(folder), out=out),
        out,
    )


def _out_name(name: str) -> str:
    try:
        return check_id(name)
    except ValueError:
        raise UsageError(f"--out '{name}' cannot name a folder under pred/ (no '/', not empty)") from None


def _overlay_path(store: LabelStore, image_id: str) -> Path:
    return store.directory / OVERLAYS / f"{image_id}.jpg"


def _gate_classifier(cfg: PredictConfig, ws: Workspace, num_classes: int) -> tuple[CamClassifier | None, dict | None]:
    """(the classifier that gates classes, what the record says of the gate) for --class-gate: the workspace's
    latest classifier round, unless training from random weights left it unlearned (train-cls's warning, which
    only round 1 from scratch records), early or at the end. A classifier that learned only late has memorised
    its images more than it generalises: on the `shapes` style (val mAP 35, early check failed) gating at 0.5
    took the segmenter from 19.4 to 15.5 % val mIoU."""
    if not cfg.class_gate:  # None or 0: off
        return None, None
    path, round_ = ws.cls_model(None)
    model = load_checkpoint(path, ws.cls_command(round_), num_classes, ", or predict without --class-gate")
    verdicts = (ws.classifier_run(1) or {}).get("metrics", {})  # later rounds start from round 1's weights
    gate = {"tau": cfg.class_gate, "round": round_, "run": (ws.classifier_run(round_) or {}).get("id")}
    if verdicts.get("learned_early") is False or verdicts.get("learned") is False:
        when = "after its first epochs" if verdicts.get("learned_early") is False else "by its last epoch"
        said = f"class gate off: the classifier had not learned {when} (train-cls's warning)"
        return None, {**gate, "applied": False, "said": said}
    said = f"classes the classifier (round {round_}) scores below {cfg.class_gate:g} dropped"
    return model, {**gate, "applied": True, "said": said}


def _class_probabilities(classifier: CamClassifier, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """B x C: the classifier's sigmoid scores of images x drawn at its input scale, averaged with their mirrors."""
    if classifier.input_scale != 1:
        size = (round(x.shape[-2] * classifier.input_scale), round(x.shape[-1] * classifier.input_scale))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    with autocast(device):
        logits = (classifier(x)[0] + classifier(x.flip(-1))[0]) / 2
    return torch.sigmoid(logits.float())


def _probabilities(
    loader: Iterable[_Item],
    model: Segmenter,
    cfg: PredictConfig,
    scales: list[float],
    device: torch.device,
    classifier: CamClassifier | None = None,
) -> Iterator[tuple[list[_Item], torch.Tensor]]:
    """(items, B x L x H x W probabilities averaged over `scales` and flips, the classes `classifier` scores
    below cfg.class_gate zeroed), batching images of one size."""
    passes = len(scales) * (2 if cfg.flip else 1)

    def probs_fn(x: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            logits = model(x)
        return torch.softmax(logits.float(), dim=1)

    for batch in same_size_batches(loader, cfg.batch_size, lambda item: tuple(item.x.shape)):
        x = torch.stack([item.x for item in batch]).to(device, memory_format=memory_format(device))
        size = (x.shape[-2], x.shape[-1])
        drawn = capped_size(size, cfg.max_side)  # a large photo is predicted smaller, then upsampled
        if drawn is not None:
            x = F.interpolate(x, size=drawn, mode="bilinear", align_corners=False, antialias=True)
        probs = multiscale_cams(probs_fn, x, scales, cfg.flip) / passes
        if classifier is not None and cfg.class_gate:  # None: no gate, or the guard turned it off
            probs = gate_classes(probs, _class_probabilities(classifier, x, device), cfg.class_gate)
        if drawn is not None:
            probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
        yield batch, probs


def _labels(
    predictions: Iterator[tuple[list[_Item], torch.Tensor]], cfg: PredictConfig, pool, workers: int, backend: str
) -> Iterator[tuple[_Item, np.ndarray]]:
    """(item, H x W uint8 label map): the arg-max, or the CRF over the classes that win some pixel (`backend`
    torch: the batch in one pass on the probabilities' device; pydensecrf: each image in the CPU `pool`)."""
    if not cfg.crf:
        for batch, probs in predictions:
            yield from zip(batch, probs.argmax(1).to(torch.uint8).cpu().numpy())  # one transfer per batch
        return
    params = PRESETS[cfg.preset]
    if backend == "torch":
        for batch, probs in predictions:
            present = [torch.unique(w) for w in probs.argmax(1)]
            chosen = [(p[labels].clamp_min(0) + 1e-5) for p, labels in zip(probs, present)]  # as crf_refine
            marginals = dense_crf_chunked(
                [torch.from_numpy(item.image) for item in batch],
                [c / c.sum(0, keepdim=True) for c in chosen],
                params,
                probs.device,
            )
            for item, labels, m in zip(batch, present, marginals):
                yield item, labels.to(torch.uint8)[m.argmax(0)].cpu().numpy()
        return

    def jobs():
        for batch, probs in predictions:
            winners = probs.argmax(1)
            for item, p, w in zip(batch, probs, winners):
                present = torch.unique(w)
                yield item, (item.image, p[present].cpu().numpy(), present.cpu().numpy(), params)

    yield from map_ordered(pool, crf_refine, jobs(), ahead=2 * max(1, workers))
