"""Choosing the compute device and the precision tricks that go with it."""

from __future__ import annotations

import contextlib
import random
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from igcam_cli.errors import UsageError


def resolve_device(name: str) -> torch.device:
    """`auto` picks the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise UsageError(f"unsupported device '{name}' (use auto, cpu, cuda or cuda:N)")
    return device


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain float32 on the CPU (CPU bf16 is slower for convolutions)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe(device: torch.device) -> str:
    """What computes a stage's numbers, as far as it moves them: float32 sums are reduced in another order
    with another CPU thread count (CAMs differ in their last float16 bit between 1 and 2 threads), and CUDA
    computes in bf16."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)}), bf16 autocast"
    threads = torch.get_num_threads()
    return f"cpu, {threads} thread{'s' if threads != 1 else ''}, float32"


def crf_backend(backend: str, device: torch.device) -> str:
    """The dense CRF's backend for `auto`: torch on a GPU, pydensecrf's CPU processes otherwise (faster there:
    benchmarks/README.md)."""
    if backend == "auto":
        return "torch" if device.type == "cuda" else "pydensecrf"
    return backend


def memory_format(device: torch.device) -> torch.memory_format:
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def place_model(model: ModuleT, device: torch.device) -> ModuleT:
    """Moves `model` to `device`, in `memory_format(device)`; returns it (the same object)."""
    # Module.to(device, memory_format=...) is documented, but torch's stubs have no overload for it.
    return model.to(device, memory_format=memory_format(device))  # type: ignore[call-overload]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
