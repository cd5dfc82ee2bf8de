"""Shared fixtures: trained workspaces built once per session and copied for each test that uses them.

The helpers they are built from (tiny configs, CLI settings, VOC folders) are in cli_helpers.py. Tests that use
a trained workspace, or train or run whole stages themselves, are marked `slow`: `pytest -m "not slow"` is the
fast tier (see README.md, Development)."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
import torch

from cli_helpers import (
    CAMS,
    CRF,
    OPTS,
    SYNTH,
    TRAIN,
    build_voc,
    copy_workspace,
    init_synthetic,
    ok,
    tiny_cls_config,
    write_class_file,
)
from igcam_cli.stages import init as init_stage
from igcam_cli.stages import train_cls

# Fixtures that train a model (here, and test_segmentation's and test_chain's own): every test that uses one,
# directly or through another fixture, is slow.
TRAINING_FIXTURES = {"trained_template", "stage_trained_template", "voc_template", "seg_template", "ran_template"}


def pytest_collection_modifyitems(config, items):
    """A test that builds a trained workspace but is not marked slow would slow the fast tier down: name it."""
    unmarked = [
        item.nodeid
        for item in items
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("slow") is None
    ]
    if unmarked:
        raise pytest.UsageError("mark these tests slow (they use a trained workspace):\n  " + "\n  ".join(unmarked))


@contextlib.contextmanager
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: one intra-op thread is as fast, and much faster on a shared CPU.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    with _single_thread():
        yield


@pytest.fixture(scope="session")
def trained_template(tmp_path_factory) -> Path:
    """Synthetic 12 train / 4 val images of 64 px, classifier trained for 1 epoch. Do not modify."""
    ws = init_synthetic(tmp_path_factory.mktemp("trained") / "ws")
    ok("train-cls", "-w", ws, *TRAIN, "--quiet")
    return ws


@pytest.fixture(scope="session")
def chain_template(trained_template, tmp_path_factory) -> Path:
    """`trained_template` + make-cams, crf and evaluate (cams, crf) on 'train'. Do not modify."""
    ws = copy_workspace(trained_template, tmp_path_factory.mktemp("chain") / "ws")
    ok("make-cams", "-w", ws, "--split", "train", *CAMS, "--quiet")
    ok("crf", "-w", ws, "--split", "train", *CRF, "--quiet")
    ok("evaluate", "-w", ws, "--artifact", "cams", "--split", "train", "--quiet")
    ok("evaluate", "-w", ws, "--artifact", "crf", "--split", "train", "--quiet")
    return ws


@pytest.fixture
def trained_ws(trained_template, tmp_path) -> Path:
    return copy_workspace(trained_template, tmp_path / "ws")


@pytest.fixture
def chain_ws(chain_template, tmp_path) -> Path:
    return copy_workspace(chain_template, tmp_path / "ws")


@pytest.fixture
def fresh_ws(tmp_path) -> Path:
    """An initialised synthetic workspace where nothing has run."""
    return init_synthetic(tmp_path / "fresh")


@pytest.fixture(scope="session")
def stage_trained_template(tmp_path_factory) -> Path:
    """Synthetic 8 train / 4 val images of 64 px (`SYNTH`), round-1 classifier trained for 1 epoch at 32 px crops
    through the stage module (`tiny_cls_config`), on one thread. Do not modify."""
    ws = init_stage.run(tmp_path_factory.mktemp("stage-trained") / "ws", "synthetic", None, None, SYNTH)
    with _single_thread():
        train_cls.run(tiny_cls_config(ws, epochs=1), ws, OPTS, train_cls.TrainOptions())
    return ws.root


@pytest.fixture(scope="session")
def voc_template(tmp_path_factory) -> tuple[Path, Path]:
    """(VOC root, workspace): a 2-class VOC-layout dataset (48x64 and 64x48 images), initialised from
    a class file with a 'background' first line, classifier trained for 1 epoch. Do not modify."""
    base = tmp_path_factory.mktemp("voc")
    root = build_voc(base / "VOC2012")
    ws = base / "ws"
    ok("init", "-w", ws, "--dataset", "voc", "--root", root, "--classes", write_class_file(base / "classes.txt"))
    ok("train-cls", "-w", ws, *TRAIN, "--quiet")
    return root, ws


@pytest.fixture
def voc_ws(voc_template, tmp_path) -> tuple[Path, Path]:
    """Private copies of the VOC dataset and its trained workspace, re-pointed with `init --force`,
    for tests that break the data."""
    root = Path(shutil.copytree(voc_template[0], tmp_path / "VOC2012"))
    ws = copy_workspace(voc_template[1], tmp_path / "ws")
    ok("init", "-w", ws, "--dataset", "voc", "--root", root, "--classes", "cat,dog", "--force")
    return root, ws
