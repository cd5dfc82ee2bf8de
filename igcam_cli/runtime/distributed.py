"""Which slice of the work this process owns: `--shard i/n`, or torchrun's RANK/WORLD_SIZE."""

from __future__ import annotations

import os
from dataclasses import dataclass

from igcam_cli.errors import UsageError


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    def select(self, items: list) -> list:
        """Every count-th item starting at index: balanced and disjoint across shards."""
        return items[self.index :: self.count]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str | None) -> Shard:
    """`i/n` with 0 <= i < n; without it, torchrun's RANK/WORLD_SIZE; else the whole job."""
    if text is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return Shard(int(os.environ.get("RANK", "0")), world) if world > 1 else Shard()
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard expects i/n (e.g. 0/4), got '{text}'") from None
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {text}: need 0 <= i < n")
    return Shard(index, count)


# ---- training under torchrun (DDP) -----------------------------------------------------------


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def process_batch(batch_size: int, smallest: int = 1) -> int:
    """Each process's share of the configured batch, so that the effective batch under torchrun is the
    configured one (gradients are averaged across processes). UsageError where it does not divide."""
    world = world_size()
    if batch_size % world or batch_size // world < smallest:
        raise UsageError(
            f"--batch-size {batch_size} cannot be shared by {world} processes "
            f"(each needs {smallest} or more images and the same number): use a multiple of {world}"
        )
    return batch_size // world


def local_device(default):
    """Under torchrun with CUDA, the GPU of this process's LOCAL_RANK; `default` otherwise."""
    import torch

    if world_size() == 1 or default.type != "cuda":
        return default
    default = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(default)
    return default


def device(default):
    """local_device(), and the process group started for DDP training."""
    import torch.distributed as dist

    default = local_device(default)
    if world_size() > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if default.type == "cuda" else "gloo")
    return default


def wrap(model, device):
    """DistributedDataParallel under torchrun, the model itself otherwise."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard_indices(order) -> list:
    """This process's share of an epoch's order (every world_size-th item). The order is first padded with
    its own first items to a multiple of the world size, as torch's DistributedSampler does: every process
    then takes the same number of steps (one with a step fewer would leave the others waiting forever in
    the gradient all-reduce)."""
    order = list(range(order)) if isinstance(order, int) else list(order)
    world = world_size()
    order += order[: -len(order) % world] if order else []
    return order[rank() :: world]


def barrier() -> None:
    import torch.distributed as dist

    if world_size() > 1 and dist.is_initialized():
        dist.barrier()
