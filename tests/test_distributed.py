"""torchrun on the CPU: train-cls with DDP over 2 gloo processes (the configured batch shared between them), then
make-cams and compute-influence sharded by rank, whose maps and scores equal a single process's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cli_helpers import CAMS, TRAIN, init_synthetic, ok, with_option
from igcam_cli.influence_io import read_scores
from igcam_cli.store import MapStore
from igcam_cli.workspace import Workspace

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def torchrun_env(tmp_path) -> dict[str, str]:
    """torchrun leaves a torchelastic_* folder in TMPDIR: keep it in the test's own folder, not /tmp."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp")}


def torchrun(*args, cwd) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "igcam_cli", *map(str, args)]
    result = subprocess.run(command, cwd=cwd, env=torchrun_env(cwd), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_train_cls_and_make_cams_under_torchrun(tmp_path):
    ws = init_synthetic(tmp_path / "ws")
    trained = torchrun("train-cls", "-w", ws, *TRAIN, "--quiet", cwd=tmp_path)
    assert (ws / "cls" / "model.pt").is_file()
    log = (ws / "logs" / "train-cls.log").read_text()
    assert "batch 4 (2 x 2 process(es))" in log, trained.stdout
    assert [r["status"] for r in Workspace.open(ws).records()] == ["done"]  # one record, from rank 0

    torchrun("make-cams", "-w", ws, "--split", "train", *CAMS, cwd=tmp_path)
    cams = MapStore(ws / "cams" / "train")
    assert {p.name for p in cams.parts()} == {"part-r0-00000.h5", "part-r1-00000.h5"}
    single = shutil.copytree(ws, tmp_path / "single")
    ok("make-cams", "-w", single, "--split", "train", *CAMS, "--force", "--quiet")
    alone = MapStore(single / "cams" / "train")
    assert cams.ids() == alone.ids() == set(Workspace.open(ws).dataset().ids("train"))
    for image_id in cams.ids():
        np.testing.assert_allclose(cams.read(image_id).maps, alone.read(image_id).maps, atol=2e-3, rtol=0)

    # compute-influence: each rank sums its share's curvature statistics, both fit the preconditioner from
    # the total, and the scores equal those of one process over every image
    influence = ["--split", "train", "--scope", "head", "--workers", "0", "--batch-size", "4", "--quiet"]
    torchrun("compute-influence", "-w", ws, *influence, cwd=tmp_path)
    directory = ws / "influence" / "train"
    assert sorted(p.name for p in directory.glob("stats-factors-*.pt")) == [
        "stats-factors-r0-of-2.pt",
        "stats-factors-r1-of-2.pt",
    ]
    ok("compute-influence", "-w", single, *influence)
    dataset = Workspace.open(ws).dataset()
    ids = dataset.ids("train")
    sharded, one = (
        read_scores(w / "influence" / "train", ids, "compute-influence", dataset.num_classes) for w in (ws, single)
    )
    assert sharded.keys() == one.keys() == set(ids)
    for image_id, score in one.items():
        for column in ("loss", "self_influence", "atypicality", "weight"):
            got, want = getattr(sharded[image_id], column), getattr(score, column)
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)


def test_a_batch_the_processes_cannot_share_is_refused(tmp_path):
    ws = init_synthetic(tmp_path / "ws")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "igcam_cli", "train-cls", "-w", str(ws), *with_option(TRAIN, "--batch-size", "3")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=torchrun_env(tmp_path))
    assert result.returncode != 0
    assert "igcam: error: --batch-size 3 cannot be shared by 2 processes" in result.stderr  # one line per rank


def test_every_process_gets_the_same_number_of_images(monkeypatch):
    from igcam_cli.runtime import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    shares = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        shares.append(distributed.shard_indices(9))
    assert shares == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 0]]  # padded with the order's first item
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert distributed.shard_indices(3) == [0, 1, 2]
