"""Wall-clock timing shared by the speed benchmarks (benchmarks/, on the path when one runs as a script)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def timed_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, fn()): the GPU's queued work is waited for on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    return timed_call(fn, device)[0]
