"""SIGKILL at seeded moments, then the same command again (`--resume` for training): the result equals an
uninterrupted run, bit for bit on the CPU (maps, label PNGs, model weights).

Each stage runs as its own process (`python -m igcam_cli`), killed once its output has started to appear
(a temporary part, a label PNG, a checkpoint) plus a seeded delay, so the kill lands mid-write as often as
between writes. One thread everywhere: results must not depend on the core count.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import CAMS, CRF, SEG, TRAIN, copy_workspace, ok
from igcam_cli.store import LabelStore, MapStore

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PREDICT = ["--split", "train", "--out", "train", "--workers", "0", "--scales", "1.0,0.75", "--no-crf"]


def _temporary_part(directory: str) -> Callable[[Path], bool]:
    return lambda ws: any((ws / directory).glob(".*.tmp")) or any((ws / directory).glob("part-*.h5"))


def _labels(directory: str, count: int) -> Callable[[Path], bool]:
    return lambda ws: len(list((ws / directory).glob("*.png"))) >= count


def _checkpoint(path: str) -> Callable[[Path], bool]:
    return lambda ws: (ws / path).is_file()


# stage -> (command after `-w WS`, outputs to clear first, what to compare, when to kill, seeds)
CASES = {
    "make-cams": (
        ["make-cams", "--split", "train", *CAMS, "--batch-size", "2"],
        ["cams/train"],
        ("maps", "cams/train"),
        _temporary_part("cams/train"),
        (0, 1),
    ),
    "refine": (
        ["refine", "--split", "train", "--workers", "0", "--batch-size", "2"],
        ["refined/train"],
        ("maps", "refined/train"),
        _temporary_part("refined/train"),
        (0,),
    ),
    "crf": (
        ["crf", "--split", "train", *CRF],
        ["pseudo/train"],
        ("labels", "pseudo/train"),
        _labels("pseudo/train", 3),
        (0, 1),
    ),
    "compute-influence": (
        ["compute-influence", "--split", "train", "--workers", "0", "--scope", "head"],
        ["influence/train"],
        ("maps", "influence/train"),
        _temporary_part("influence/train"),
        (0,),
    ),
    "predict": (["predict", *PREDICT], ["pred/train"], ("labels", "pred/train"), _labels("pred/train", 3), (0,)),
    "train-cls": (
        ["train-cls", *TRAIN, "--epochs", "3"],
        ["cls/model.pt", "cls/last.pt"],
        ("model", "cls/model.pt"),
        _checkpoint("cls/last.pt"),
        (0,),
    ),
    "train-seg": (
        ["train-seg", *[a for a in SEG if a not in ("--epochs", "1")], "--epochs", "3"],
        ["seg/model.pt", "seg/last.pt"],
        ("model", "seg/model.pt"),
        _checkpoint("seg/last.pt"),
        (0,),
    ),
}


@pytest.fixture(scope="module")
def base(chain_template, tmp_path_factory) -> Path:
    """`chain_template` (classifier, CAMs, pseudo-labels) + a segmenter. Do not modify."""
    ws = copy_workspace(chain_template, tmp_path_factory.mktemp("faults") / "ws")
    ok("train-seg", "-w", ws, *SEG)
    return ws


@pytest.fixture(scope="module")
def references() -> dict[str, object]:
    """Each stage's uninterrupted output, filled in by the stage's first test."""
    return {}


def _fresh(base: Path, path: Path, clear: list[str]) -> Path:
    ws = copy_workspace(base, path)
    for item in clear:
        target = ws / item
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    return ws


def _igcam(ws: Path, command: list[str]) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "igcam_cli", command[0], "-w", str(ws), *command[1:], "--quiet"]
    return subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)


def _killed(ws: Path, command: list[str], started: Callable[[Path], bool], delay: float) -> int:
    args = [sys.executable, "-m", "igcam_cli", command[0], "-w", str(ws), *command[1:], "--quiet"]
    process = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while process.poll() is None and not started(ws) and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    return process.wait()


def _output(ws: Path, kind: str, where: str):
    if kind == "maps":
        store = MapStore(ws / where)
        return {i: (r.maps, r.classes) for i, r in store.iter_records(sorted(store.ids()))}
    if kind == "labels":
        labels = LabelStore(ws / where)
        return {i: labels.read(i) for i in sorted(labels.ids())}
    return torch.load(ws / where, map_location="cpu", weights_only=True)["model"]


def _assert_equal(got, want, kind: str) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if kind == "maps":
            np.testing.assert_array_equal(got[key][1], value[1], err_msg=key)
            np.testing.assert_array_equal(got[key][0], value[0], err_msg=key)
        elif kind == "labels":
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        else:
            assert torch.equal(got[key], value), key


@pytest.mark.parametrize(("stage", "seed"), [(stage, seed) for stage, case in CASES.items() for seed in case[4]])
def test_killed_and_rerun_equals_uninterrupted(base, references, tmp_path, stage, seed):
    command, clear, (kind, where), started, _ = CASES[stage]
    if stage not in references:
        reference = _fresh(base, tmp_path / "reference", clear)
        done = _igcam(reference, command)
        assert done.returncode == 0, done.stderr
        references[stage] = _output(reference, kind, where)

    ws = _fresh(base, tmp_path / "ws", clear)
    delay = float(np.random.default_rng([seed, len(stage)]).uniform(0.0, 0.4))
    code = _killed(ws, command, started, delay)
    assert code == -signal.SIGKILL, f"{stage} ended ({code}) before it could be killed: make its work larger"
    again = command + (["--resume"] if stage.startswith("train-") else [])
    rerun = _igcam(ws, again)
    assert rerun.returncode == 0, rerun.stderr
    assert "Traceback" not in rerun.stderr
    _assert_equal(_output(ws, kind, where), references[stage], kind)
