"""Two runs of one stage on one output: the second is refused in one line naming the first (a lock beside the
output, dropped by the kernel when its holder dies), and the first finishes undisturbed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from cli_helpers import CAMS, CRF, assert_error, igcam, ok
from igcam_cli.runtime.locks import OutputLock
from igcam_cli.store import LabelStore, MapStore
from igcam_cli.workspace import Workspace

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_a_second_run_on_a_locked_output_is_refused(chain_ws):
    lock = OutputLock(chain_ws / "pseudo" / ".train.lock-r0", "pseudo/train").acquire()
    try:
        result = igcam("crf", "-w", chain_ws, "--split", "train", *CRF, "--force")
        assert_error(result, 2, "pseudo/train is being written by another run", f"pid {os.getpid()}")
    finally:
        lock.release()
    assert len(LabelStore(chain_ws / "pseudo" / "train").ids()) == 12  # --force deleted nothing
    ok("crf", "-w", chain_ws, "--split", "train", *CRF, "--force", "--quiet")  # free again


def test_two_processes_never_mix_and_a_killed_holder_frees_the_lock(chain_ws):
    cams = chain_ws / "cams" / "train"
    reference = MapStore(cams).ids()
    command = [sys.executable, "-m", "igcam_cli", "make-cams", "-w", str(chain_ws), "--split", "train", *CAMS]
    slow = [*command, "--force", "--batch-size", "1", "--scales", "1.0,0.5,1.5,2.0"]
    runs = [subprocess.Popen(slow, env=ENV, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes = [run.wait(timeout=300) for run in runs]
    errors = [run.stderr.read() if run.stderr else "" for run in runs]
    assert sorted(codes) == [0, 2], errors  # one wrote, the other was refused while it did
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    assert "is being written by another run" in errors[loser] and f"pid {runs[winner].pid}" in errors[loser]
    store = MapStore(cams)
    assert store.ids() == reference and not store.temporaries()  # the winner's output, whole
    records = [r for r in Workspace.open(chain_ws).records() if r["stage"] == "make-cams"]
    assert records[-1]["status"] == "done" and records[-1]["config"]["scales"] == [1.0, 0.5, 1.5, 2.0]
    assert [r["status"] for r in records].count("running") == 0  # the refused run left no record

    # SIGKILL the holder: the kernel drops its lock, and the next run goes ahead
    lock = chain_ws / "cams" / ".train.lock-r0"
    killed = subprocess.Popen(slow, env=ENV, stderr=subprocess.DEVNULL)
    while killed.poll() is None and not (lock.is_file() and str(killed.pid) in lock.read_text()):
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    # --force: on a loaded machine the kill can land before the holder's own --force removed the finished maps
    # of other settings, which a run without --force would then rightly refuse to replace
    ok("make-cams", "-w", chain_ws, "--split", "train", *CAMS, "--force", "--quiet")
    assert MapStore(cams).ids() == reference


@pytest.mark.parametrize(("command", "model"), [("train-cls", "cls/model.pt"), ("train-seg", "seg/model.pt")])
def test_a_second_training_run_is_refused_and_leaves_no_record(fresh_ws, command, model):
    path = fresh_ws / model
    lock = OutputLock(path.with_name(f".{path.name}.lock"), str(path)).acquire()
    try:
        options = ["--labels", "gt", "--pretrained", "none"] if command == "train-seg" else []
        result = igcam(command, "-w", fresh_ws, "--epochs", "1", *options)
        assert_error(result, 2, f"{path} is being written by another run")
    finally:
        lock.release()
    assert not (fresh_ws / "manifest.json").exists()  # no "running" record left behind by the refused run
