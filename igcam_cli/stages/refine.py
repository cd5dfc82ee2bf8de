"""refine: instance guidance and multi-scale boundary enhancement of CAMs (docs/METHOD.md §4-5).

Guidance (region proposals, CPU) runs in DataLoader worker processes; boundary propagation runs
batched on the device in the main process. `--guidance gt` is the ORACLE mode: GT masks serve
as the regions, and the output is marked `oracle = true` for every later stage and report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from igcam_cli import map_stage
from igcam_cli.config import RefineConfig, RunOptions
from igcam_cli.core.boundary import BoundaryParams, multiscale_boundary
from igcam_cli.core.guidance import GuidanceParams, gt_guidance, instance_guidance
from igcam_cli.core.proposals import propose
from igcam_cli.data.base import Dataset
from igcam_cli.errors import BadData, UsageError
from igcam_cli.runtime.batching import image_loader, same_size_batches
from igcam_cli.runtime.devices import resolve_device
from igcam_cli.runtime.distributed import Shard, local_device
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

    def __init__(self, dataset: Dataset, cams: MapStore, ids: list[str], cfg: RefineConfig):
        self.dataset, self.cams, self.ids, self.cfg = dataset, cams, ids, cfg
        self.params = guidance_params(cfg)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> RefineItem:
        image_id = self.ids[index]
        record = self.cams.read(image_id)
        sample = self.dataset.load(image_id, with_mask=self.cfg.guidance == "gt")
        if sample.image.shape[:2] != record.maps.shape[1:]:
            raise BadData(
                f"cams of '{image_id}' are {record.maps.shape[2]}x{record.maps.shape[1]} but the image is "
                f"{sample.image.shape[1]}x{sample.image.shape[0]}: rerun make-cams with --force"
            )
        maps = record.maps
        if self.cfg.guidance == "proposals":
            proposals = propose(
                sample.image,
                scales=(self.cfg.proposal_scale,),
                sigma=self.cfg.proposal_sigma,
                min_size=self.cfg.proposal_min_size,
            )
            maps = instance_guidance(maps, proposals, self.params)
        elif self.cfg.guidance == "gt":
            if sample.mask is None:
                raise BadData(f"--guidance gt needs a GT mask, and image '{image_id}' has none")
            maps = gt_guidance(maps, sample.mask, record.classes, self.params)
        image = torch.from_numpy(np.ascontiguousarray(sample.image.transpose(2, 0, 1)))
        return RefineItem(
            image_id, image, torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32)), record.classes
        )


def guidance_params(cfg: RefineConfig) -> GuidanceParams:
    return GuidanceParams(
        anchor_threshold=cfg.anchor_threshold,
        min_anchor_cover=cfg.min_anchor_cover,
        max_area=cfg.max_area,
        select_threshold=cfg.select_threshold,
        min_share=cfg.min_share,
        fill_gain=cfg.fill_gain,
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
        guidance_params(cfg), boundary_params(cfg)
    except ValueError as exc:
        raise UsageError(f"refine: {exc}") from None
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
    job = map_stage.prepare(ws, "refine", cfg, store, cfg.split, split_ids, shard, force, inputs, log)
    record = job.start(oracle=oracle)
    if oracle:
        log("ORACLE: GT masks guide these maps; results derived from them are not weakly supervised")
    boundary = f"scales {cfg.scales} (below {cfg.min_scale_side} px skipped)" if cfg.boundary else "off"
    log(
        f"refine '{cfg.split}' shard {shard}: {job.progress}; guidance {cfg.guidance}, boundary {boundary}, "
        f"device {device}"
    )
    params = boundary_params(cfg)
    with record:
        with store.writer(
            rank=shard.index, source="refine", attrs={"oracle": oracle, "guided": cfg.guidance != "none"}
        ) as writer:
            todo = job.todo
            batches = same_size_batches(_loader(dataset, cams, todo, cfg, device), cfg.batch_size, _image_size)
            for batch in log.track(batches, total=-(-len(todo) // cfg.batch_size), description="refine", unit="batch"):
                for item, maps in zip(batch, boundary_batch(batch, cfg.boundary, params, device)):
                    writer.write(item.id, maps, item.classes.astype(np.uint8), oracle=oracle)
        return job.finish(split_images=len(split_ids))


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


def _loader(dataset: Dataset, cams: MapStore, ids: list[str], cfg: RefineConfig, device: torch.device) -> DataLoader:
    return image_loader(_Guided(dataset, cams, ids, cfg), cfg.batch_size, cfg.workers, device)


def _image_size(item: RefineItem) -> tuple[int, ...]:
    return tuple(item.image.shape)
