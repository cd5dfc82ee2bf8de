"""refine: instance guidance and multi-scale boundary enhancement of CAMs (docs/METHOD.md §4-5), or
IRN's random walk (`--method irn`, docs/RANDOM_WALK.md), or the walk after them (`--method both`).

Guidance (region proposals, CPU) runs in DataLoader worker processes; boundary propagation and the
random walk run batched on the device in the main process. `--guidance gt` is the ORACLE mode: GT
masks serve as the regions, and the output is marked `oracle = true` for every later stage and report.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from igcam_cli import map_stage
from igcam_cli.config import RefineConfig, RunOptions
from igcam_cli.core.boundary import BoundaryParams, multiscale_boundary
from igcam_cli.core.cam import capped_size, normalize_cams, own_side_cap, resize_bicubic_like_pil, strided_cams
from igcam_cli.core.guidance import GuidanceParams, grid_fill_gain, gt_guidance, instance_guidance
from igcam_cli.core.proposals import propose
from igcam_cli.core.random_walk import random_walk, walk_to_maps
from igcam_cli.data.base import Dataset, Unreadable, load_or_skip
from igcam_cli.data.transforms import normalize_on_device
from igcam_cli.errors import BadData, UsageError
from igcam_cli.models.boundary_net import BoundaryNet, load_boundary_net
from igcam_cli.models.classifier import OUTPUT_STRIDE, CamClassifier, load_checkpoint
from igcam_cli.runtime.batching import image_loader, same_size_batches
from igcam_cli.runtime.devices import autocast, describe, place_model, resolve_device
from igcam_cli.runtime.distributed import Shard, local_device
from igcam_cli.runtime.pool import worker_count
from igcam_cli.runtime.progress import StageLog
from igcam_cli.store import MapStore
from igcam_cli.workspace import Workspace, input_key

GUIDANCE = ("proposals", "gt", "none")


@dataclass
class RefineItem:
    id: str
    image: torch.Tensor  # 3 x H x W uint8
    maps: torch.Tensor  # K x H x W float32, guided
    classes: np.ndarray


class _Guided(TorchDataset):
    """Loads an image and its CAMs and applies instance guidance (in a worker process)."""

    def __init__(
        self, dataset: Dataset, cams: MapStore, ids: list[str], cfg: RefineConfig, cell: float, skip_bad: bool = False
    ):
        self.dataset, self.cams, self.ids, self.cfg, self.skip_bad = dataset, cams, ids, cfg, skip_bad
        self.cell = cell  # image pixels per CAM cell: the classifier's output stride / its input scale

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> RefineItem | Unreadable:
        image_id = self.ids[index]
        record = self.cams.read(image_id)
        sample = load_or_skip(self.dataset, image_id, self.skip_bad, with_mask=self.cfg.guidance == "gt")
        if isinstance(sample, Unreadable):
            return sample
        if sample.image.shape[:2] != record.maps.shape[1:]:
            raise BadData(
                f"cams of '{image_id}' are {record.maps.shape[2]}x{record.maps.shape[1]} but the image is "
                f"{sample.image.shape[1]}x{sample.image.shape[0]}: rerun make-cams with --force"
            )
        maps = record.maps
        params = guidance_params(self.cfg, min(sample.image.shape[:2]) / self.cell)
        if self.cfg.guidance == "proposals":
            proposals = propose(
                sample.image,
                scales=(self.cfg.proposal_scale,),
                sigma=self.cfg.proposal_sigma,
                min_size=self.cfg.proposal_min_size,
            )
            maps = instance_guidance(maps, proposals, params)
        elif self.cfg.guidance == "gt":
            if sample.mask is None:
                raise BadData(f"--guidance gt needs a GT mask, and image '{image_id}' has none")
            maps = gt_guidance(maps, sample.mask, record.classes, params)
        image = torch.from_numpy(np.ascontiguousarray(sample.image.transpose(2, 0, 1)))
        return RefineItem(
            image_id, image, torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32)), record.classes
        )


def guidance_params(cfg: RefineConfig, cells: float) -> GuidanceParams:
    """The guidance of an image with `cells` CAM cells across its shorter side (they set fill_gain when it is None)."""
    return GuidanceParams(
        anchor_threshold=cfg.anchor_threshold,
        min_anchor_cover=cfg.min_anchor_cover,
        max_area=cfg.max_area,
        select_threshold=cfg.select_threshold,
        min_share=cfg.min_share,
        fill_gain=cfg.fill_gain if cfg.fill_gain is not None else grid_fill_gain(cells),
        outside_damping=cfg.outside_damping,
    )


def boundary_params(cfg: RefineConfig) -> BoundaryParams:
    return BoundaryParams(
        scales=tuple(cfg.scales),
        min_side=cfg.min_scale_side,
        iterations=cfg.iterations,
        dilations=tuple(cfg.dilations),
        sigma_rgb=cfg.sigma_rgb,
        sigma_xy=cfg.sigma_xy,
    )


def run(cfg: RefineConfig, ws: Workspace, opts: RunOptions, shard: Shard = Shard(), force: bool = False) -> int:
    """Refines this shard's CAMs not yet in `refined/<split>`; returns how many it wrote."""
    log = StageLog(ws.log_path("refine"), quiet=opts.quiet)
    try:
        guidance_params(cfg, cells=1.0), boundary_params(cfg)
    except ValueError as exc:
        raise UsageError(f"refine: {exc}") from None
    recorded = cfg
    if cfg.method == "irn":  # the walk alone: no guidance, no boundary enhancement (idle settings)
        cfg = replace(cfg, guidance="none", boundary=False)
    dataset = ws.dataset()
    split_ids = dataset.ids(cfg.split)
    cams = ws.complete_maps("cams", cfg.split, shard.select(split_ids))  # a shard needs only its own images
    oracle = cfg.guidance == "gt" or bool(cams.attrs.get("oracle", False))
    if cfg.guidance == "gt" and not dataset.has_masks(cfg.split):
        raise BadData(f"--guidance gt needs GT masks, and split '{cfg.split}' lacks them ({dataset.gt_source})")
    device = local_device(resolve_device(opts.device))

    store = ws.maps("refined", cfg.split)
    cams_record = ws.latest("make-cams", cfg.split)
    inputs = {input_key("make-cams", cfg.split): cams_record["id"] if cams_record else None}
    walker, strided = None, None
    if cfg.method != "igcam":
        walker, irn_record = _walker(ws, cfg, cams_record or {})
        inputs[input_key("train-irn")] = irn_record["id"]
        walker.to(device).eval()
        strided = _strided_cams(ws, cams_record or {}, device) if cfg.method == "irn" else None
    walk_side = walk_max_side(cams_record)
    igcam = cfg.method != "irn"
    job = map_stage.prepare(
        ws,
        "refine",
        recorded,
        store,
        cfg.split,
        split_ids,
        shard,
        force,
        inputs,
        log,
        skip_bad=opts.skip_bad,
        upstream=cams,
    )
    cell = cam_cell(cams_record)  # recorded: with fill_gain None it sets each image's gain
    record = job.start(describe(device), oracle=oracle, workers=worker_count(cfg.workers), cam_cell=cell)
    if oracle:
        log("ORACLE: GT masks guide these maps; results derived from them are not weakly supervised")
    boundary = f"scales {cfg.scales} (below {cfg.min_scale_side} px skipped)" if cfg.boundary else "off"
    gain = (
        f"fill gain {cfg.fill_gain:g}"
        if cfg.fill_gain is not None
        else f"fill gain by the CAM grid of {cell:g} px cells, 1 at 8 cells across an image to 2 at 16"
    )
    steps = [f"guidance {cfg.guidance} ({gain}), boundary {boundary}"] if igcam else []
    if walker is not None:
        cap = f", longer side at most {walk_side} px" if walk_side else ""
        steps.append(f"IRN random walk (radius {cfg.walk_radius}, beta {cfg.walk_beta:g}, {cfg.walk_steps} steps{cap})")
    log(f"refine '{cfg.split}' shard {shard}: {job.progress}; {', then '.join(steps)}, device {device}")
    params = boundary_params(cfg)
    attrs = {"oracle": oracle, "guided": cfg.method != "igcam" or cfg.guidance != "none", "method": cfg.method}
    with record:
        with store.writer(rank=shard.index, source="refine", attrs=attrs) as writer:
            todo = job.todo
            items = job.readable(_loader(dataset, cams, todo, cfg, cell, device, opts.skip_bad))
            batches = same_size_batches(items, cfg.batch_size, _image_size)
            for batch in log.track(batches, total=-(-len(todo) // cfg.batch_size), description="refine", unit="batch"):
                refined = boundary_batch(batch, cfg.boundary, params, device)
                if walker is not None:
                    refined = walk_batch(batch, refined, walker, cfg, device, strided, walk_side)
                for item, maps in zip(batch, refined):
                    writer.write(item.id, maps, item.classes.astype(np.uint8), oracle=oracle)
        return job.finish(split_images=len(split_ids))


def _walker(ws: Workspace, cfg: RefineConfig, cams_record: dict) -> tuple[BoundaryNet, dict]:
    """train-irn's boundary network and its record; refused for CAMs of another classifier run than the
    one whose CAMs made its IR labels (its boundaries were learnt from that classifier's view)."""
    irn_record = ws.require_done("train-irn", what="the boundary network of --method " + cfg.method)
    trained_on = (irn_record.get("classifier") or {}).get("run")
    cams_from = (cams_record.get("classifier") or {}).get("run")
    if trained_on != cams_from:
        raise UsageError(
            f"irn/model.pt learnt its boundaries from the CAMs of classifier run {trained_on}, but cams/{cfg.split} "
            f"were drawn by run {cams_from}: retrain it with `{ws.command('train-irn')}` first"
        )
    return load_boundary_net(ws.path("irn", "model.pt"), ws.command("train-irn")), irn_record


@dataclass
class StridedCams:
    """What draws IRN's stride-4 CAMs for `--method irn`: the classifier and make-cams' pyramid that drew the CAMs."""

    classifier: CamClassifier
    scales: list[float]
    flip: bool

    def __call__(self, batch: list[RefineItem], images: torch.Tensor, k_max: int) -> torch.Tensor:
        """B x k_max x ceil(H/4) x ceil(W/4) of the batch's B x 3 x H x W `images`: each image's classes (zero
        maps after them)."""
        device = images.device
        with autocast(device):
            cams = strided_cams(self.classifier.cams, images, self.scales, self.flip, prepare=normalize_on_device)
        chosen = [
            cams[b, torch.as_tensor(item.classes.astype(np.int64) - 1, device=device)] for b, item in enumerate(batch)
        ]
        return torch.stack([F.pad(c, (0, 0, 0, 0, 0, k_max - len(c))) for c in chosen]).float()


def walk_batch(
    batch: list[RefineItem],
    maps: list[np.ndarray],
    walker: BoundaryNet,
    cfg: RefineConfig,
    device: torch.device,
    strided: StridedCams | None = None,
    max_side: int = 0,
) -> list[np.ndarray]:
    """IRN's random walk of a same-size batch over the boundary map of its images.

    The walk starts from IRN's stride-4 CAMs (`strided`, `--method irn`: drawn again by the classifier with
    make-cams' pyramid, as IRN's make_cam writes them beside the full-size ones) or from `maps` averaged over
    4 x 4 cells (`--method both`: IG-CAM's refined maps have no stride-4 form); each divided by its
    max + 1e-5, walked, upsampled x4, cropped and divided by the image's largest value (docs/RANDOM_WALK.md).
    Images longer than `max_side` (0: no cap) are walked at that longer side, as make-cams drew them, and the
    walked maps upsampled. An image without classes keeps no maps.
    """
    k_max = max(len(item.classes) for item in batch)
    if k_max == 0:
        return maps
    images = torch.stack([item.image for item in batch]).to(device).float()
    size = (images.shape[-2], images.shape[-1])
    drawn = capped_size(size, max_side)
    if drawn is not None:
        images = resize_bicubic_like_pil(images, drawn)
    with torch.no_grad():
        with autocast(device):
            boundary = walker.boundary(normalize_on_device(images)).float()
        if strided is not None:
            cells = strided(batch, images, k_max)
        else:
            stacked = torch.stack([F.pad(torch.from_numpy(m), (0, 0, 0, 0, 0, k_max - len(m))) for m in maps])
            stacked = stacked.to(device)
            if drawn is not None:
                stacked = F.interpolate(stacked, size=drawn, mode="bilinear", align_corners=False, antialias=True)
            cells = F.avg_pool2d(stacked, kernel_size=4, stride=4, ceil_mode=True)
        walked = random_walk(normalize_cams(cells), boundary, cfg.walk_radius, cfg.walk_beta, cfg.walk_steps)
        out = walk_to_maps(walked, drawn or size)
        if drawn is not None:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
    walked_maps = out.cpu().numpy()
    return [walked_maps[b, : len(item.classes)] for b, item in enumerate(batch)]


def _strided_cams(ws: Workspace, cams_record: dict, device: torch.device) -> StridedCams:
    """The classifier that drew the split's CAMs and the pyramid it drew them with (the make-cams record)."""
    classifier = load_checkpoint(ws.root / cams_record["classifier"]["path"], ws.command("train-cls"))
    place_model(classifier, device).eval()
    settings = cams_record["config"]
    scales = [s * classifier.input_scale for s in settings.get("scales", [1.0])]  # as make-cams drew them
    return StridedCams(classifier, scales, bool(settings.get("flip", True)))


def boundary_batch(
    batch: list[RefineItem], enabled: bool, params: BoundaryParams, device: torch.device
) -> list[np.ndarray]:
    """Boundary enhancement of a same-size batch; maps are zero-padded to the batch's largest K."""
    if not enabled:
        return [item.maps.numpy() for item in batch]
    k_max = max(len(item.classes) for item in batch)
    if k_max == 0:
        return [item.maps.numpy() for item in batch]
    images = torch.stack([item.image for item in batch]).to(device).float() / 255.0
    maps = torch.stack([F.pad(item.maps, (0, 0, 0, 0, 0, k_max - len(item.maps))) for item in batch]).to(device)
    with torch.no_grad():
        out = multiscale_boundary(images, maps, params).clamp_(0, 1).cpu().numpy()
    return [out[b, : len(item.classes)] for b, item in enumerate(batch)]


def _loader(
    dataset: Dataset,
    cams: MapStore,
    ids: list[str],
    cfg: RefineConfig,
    cell: float,
    device: torch.device,
    skip_bad: bool,
) -> DataLoader:
    guided = _Guided(dataset, cams, ids, cfg, cell, skip_bad)
    return image_loader(guided, cfg.batch_size, worker_count(cfg.workers), device)


def walk_max_side(cams_record: dict | None) -> int:
    """The longer side the random walk draws an image at (0: its own): make-cams' cap on the classifier's drawn
    size (`max_side`; none in records from before make-cams had it) over the classifier's input scale, the size
    make-cams drew a large image at before upsampling its maps."""
    return own_side_cap(int(((cams_record or {}).get("config") or {}).get("max_side", 0)), _input_scale(cams_record))


def cam_cell(cams_record: dict | None) -> float:
    """Image pixels per cell of the CAMs a make-cams record describes: the classifier's output stride over the
    input scale it drew the images at."""
    return OUTPUT_STRIDE / _input_scale(cams_record)


def _input_scale(cams_record: dict | None) -> float:
    """The classifier's input scale, as make-cams records it (1 for records from before it did)."""
    return float(((cams_record or {}).get("classifier") or {}).get("input_scale", 1.0))


def _image_size(item: RefineItem) -> tuple[int, ...]:
    return tuple(item.image.shape)
