"""A full disk and a read-only workspace: one line and exit 5, complete parts kept, no temporaries, the record
failed; once there is room again the same command completes, equal to an uninterrupted run."""

from __future__ import annotations

import errno
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import CRF, assert_error, igcam, ok
from igcam_cli import store as store_module
from igcam_cli.config import MakeCamsConfig, RunOptions, build
from igcam_cli.errors import StorageError
from igcam_cli.stages import make_cams
from igcam_cli.store import MapStore
from igcam_cli.workspace import Workspace

OPTS = RunOptions(device="cpu", seed=0, quiet=True)
Usage = namedtuple("Usage", "total used free")

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _cams_config(ws: Workspace) -> MakeCamsConfig:
    return build(MakeCamsConfig, ws.stage_table("make-cams"), {"workers": 0, "batch_size": 2, "scales": [1.0, 0.5]})


def _fill_disk_after(monkeypatch, writes: int) -> None:
    """The disk reports room for `writes` map writes, then almost none."""
    calls = {"n": 0}

    def usage(path):
        calls["n"] += 1
        free = 2**40 if calls["n"] <= writes else 2**20
        return Usage(2**40, 2**40 - free, free)

    monkeypatch.setattr(store_module.shutil, "disk_usage", usage)


def _maps(directory: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    maps = MapStore(directory)
    return {i: (r.maps, r.classes) for i, r in maps.iter_records(sorted(maps.ids()))}


def test_make_cams_on_a_full_disk_keeps_what_it_finished_and_completes_later(
    stage_trained_template, tmp_path, monkeypatch
):
    reference = Workspace(Path(shutil.copytree(stage_trained_template, tmp_path / "reference")))
    make_cams.run(_cams_config(reference), reference, OPTS)
    ws = Workspace(Path(shutil.copytree(stage_trained_template, tmp_path / "ws")))

    with monkeypatch.context() as patch:
        _fill_disk_after(patch, writes=5)
        with pytest.raises(StorageError, match=r"no space left on the device of .*cams/train .*rerun the same command"):
            make_cams.run(_cams_config(ws), ws, OPTS)
    directory = ws.maps("cams", "train").directory
    assert not list(directory.glob(".*.tmp"))  # the open part was committed, not left half-written
    kept = _maps(directory)
    assert len(kept) == 5  # every image finished before the disk filled, in complete parts
    assert ws.latest("make-cams", "train")["status"] == "failed"

    make_cams.run(_cams_config(ws), ws, OPTS)  # room again: the same command resumes
    want, got = _maps(reference.maps("cams", "train").directory), _maps(directory)
    assert sorted(got) == sorted(want)
    for image_id, (maps, classes) in want.items():
        np.testing.assert_array_equal(got[image_id][1], classes)
        np.testing.assert_array_equal(got[image_id][0], maps, err_msg=image_id)


def test_crf_on_a_full_disk_is_one_line_with_exit_5(chain_ws, monkeypatch):
    pseudo = chain_ws / "pseudo" / "train"
    shutil.rmtree(pseudo)
    real_save = Image.Image.save
    saved = {"n": 0}

    def save(self, fp, *args, **kwargs):
        saved["n"] += 1
        if saved["n"] > 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    result = igcam("crf", "-w", chain_ws, "--split", "train", *CRF)
    line = assert_error(result, 5, "cannot write", str(pseudo), "No space left on device", "free some space")
    assert "Traceback" not in result.output and line
    assert len(list(pseudo.glob("*.png"))) == 4 and not list(pseudo.glob(".*.tmp"))
    monkeypatch.setattr(Image.Image, "save", real_save)
    ok("crf", "-w", chain_ws, "--split", "train", *CRF, "--quiet")
    assert len(list(pseudo.glob("*.png"))) == 12


def test_a_read_only_workspace_is_one_line_with_exit_5(chain_ws, monkeypatch):
    """Root ignores file modes, so the read-only file system is the operating system's answer, injected."""

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(chain_ws / "manifest.json"))

    monkeypatch.setattr("igcam_cli.workspace.Workspace._put_record", read_only)
    result = igcam("evaluate", "-w", chain_ws, "--artifact", "cams", "--split", "train")
    assert_error(result, 5, "cannot write", "manifest.json", "Read-only file system", "make the workspace writable")
