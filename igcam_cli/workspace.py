"""The workspace: one directory holding a run's config, artifacts and manifest.

The manifest (`manifest.json`) keeps one record per stage run: its config, the runs it read
from, what it wrote, status, times, host, versions and metrics. It is rewritten atomically
under a file lock, so shards started by a cluster scheduler can share a workspace.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from igcam_cli import __version__
from igcam_cli.atomic import write_text_atomically
from igcam_cli.config import TOML_NAME, changed_settings, read_toml, write_toml
from igcam_cli.errors import BadData, MissingArtifact, UsageError
from igcam_cli.registry import BY_NAME, MAP_KINDS, PRODUCER, TRAINED_MODELS
from igcam_cli.store import LabelStore, MapStore


def default_workspace() -> Path:
    return Path(os.environ.get("IGCAM_WORKSPACE", "."))


@dataclass
class StageRun:
    """A manifest record being written by a running stage."""

    workspace: Workspace
    record: dict[str, Any]
    on_exit: Callable[[], None] | None = None  # e.g. releasing the output's lock

    @property
    def id(self) -> str:
        return self.record["id"]

    def finish(self, outputs: list[str] | None = None, metrics: dict[str, Any] | None = None, **extra) -> None:
        self._update(status="done", outputs=outputs or [], metrics=metrics or {}, **extra)

    def fail(self, error: str) -> None:
        self._update(status="failed", error=error)

    def __enter__(self) -> StageRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Marks the record failed when the stage's work raises (Ctrl-C included); never swallows it."""
        try:
            if exc_type is not None and self.record.get("status") == "running":
                self.fail(f"{exc_type.__name__}: {exc}")
        finally:
            if self.on_exit is not None:
                self.on_exit()

    def _update(self, **changes) -> None:
        self.record.update(changes, ended=_now())
        self.workspace._put_record(self.record)


class Workspace:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._toml: dict[str, Any] | None = None
        self._dataset = None

    # ---- creation and config -------------------------------------------------------------
    @classmethod
    def create(
        cls,
        root: Path,
        dataset_spec: dict[str, Any],
        stage_defaults: dict[str, dict] | None = None,
        overwrite: bool = False,
    ) -> Workspace:
        ws = cls(root)
        if ws.root.exists() and not ws.root.is_dir():
            raise UsageError(f"-w {root} is a file, not a directory; choose another workspace path")
        if ws.toml_path.exists() and not overwrite:
            raise UsageError(f"{ws.toml_path} already exists; pass --force to overwrite it")
        try:
            ws.root.mkdir(parents=True, exist_ok=True)
            write_toml(ws.toml_path, {"dataset": dataset_spec, **(stage_defaults or {})})
        except OSError as exc:
            raise UsageError(f"cannot create the workspace {root}: {exc.strerror or exc}") from None
        return ws

    @classmethod
    def open(cls, root: Path) -> Workspace:
        ws = cls(root)
        if not ws.toml_path.is_file():
            raise MissingArtifact(
                f"{root} is not an igcam workspace (no {TOML_NAME}): run `igcam init -w {root} ...` first"
            )
        return ws

    @property
    def toml_path(self) -> Path:
        return self.root / TOML_NAME

    @property
    def toml(self) -> dict[str, Any]:
        if self._toml is None:
            self._toml = read_toml(self.toml_path)
        return self._toml

    def stage_table(self, stage: str) -> dict[str, Any]:
        return dict(self.toml.get(stage, {}))

    def set_stage_options(self, stage: str, values: dict[str, Any]) -> None:
        """Write `values` into the stage's table of igcam.toml (None values are left out)."""
        toml = read_toml(self.toml_path)
        toml[stage] = {**toml.get(stage, {}), **{k: v for k, v in values.items() if v is not None}}
        write_toml(self.toml_path, toml)
        self._toml = None

    @property
    def dataset_spec(self) -> dict[str, Any]:
        return dict(self.toml["dataset"])

    def dataset(self):
        if self._dataset is None:
            from igcam_cli.data import open_dataset

            self._dataset = open_dataset(self.dataset_spec)
        return self._dataset

    # ---- paths and stores ----------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def cls_dir(self) -> Path:
        return self.path("cls")

    def cls_round_dir(self, round: int = 1) -> Path:
        """Where train-cls round `round` keeps model.pt and last.pt: cls/ (round 1), cls/round<k>/."""
        return self.cls_dir if round <= 1 else self.cls_dir / f"round{round}"

    def cls_model(self, round: int | None = None) -> tuple[Path, int]:
        """(checkpoint, round) of a classifier round; None = the latest round that has a model.pt."""
        if round is None:
            done = [int(p.parent.name[5:]) for p in self.cls_dir.glob("round*/model.pt") if p.parent.name[5:].isdigit()]
            round = max(done, default=1)
        if round < 1:
            raise UsageError(f"--round must be >= 1, got {round}")
        return self.cls_round_dir(round) / "model.pt", round

    def classifier_run(self, round: int, done: bool = True) -> dict[str, Any] | None:
        """The latest train-cls record of classifier round `round` (only finished ones if `done`)."""
        return _newest(self.records(), "train-cls", done=done, round_=round)

    def influence_dir(self, split: str) -> Path:
        """`influence/<split>/`: compute-influence's statistics, HDF5 parts and weights."""
        return self.path("influence", split)

    def log_path(self, stage: str) -> Path:
        return self.path("logs", f"{stage}.log")

    def maps(self, kind: str, split: str) -> MapStore:
        if kind not in MAP_KINDS:
            raise UsageError(f"unknown map artifact '{kind}' (choose from {', '.join(MAP_KINDS)})")
        return MapStore(self.path(kind, split))

    def pseudo(self, split: str) -> LabelStore:
        return LabelStore(self.path("pseudo", split))

    @property
    def seg_dir(self) -> Path:
        return self.path("seg")

    def predictions(self, name: str) -> LabelStore:
        """`pred/<name>/`: predict's label maps of a split or an image folder."""
        return LabelStore(self.path("pred", name))

    def outputs(self, artifact: str, split: str) -> MapStore | LabelStore:
        """The per-image store of an artifact a map stage writes (registry.ARTIFACTS) for a split (predict:
        its output name)."""
        if artifact in MAP_KINDS:
            return self.maps(artifact, split)
        if artifact == "influence":
            return MapStore(self.influence_dir(split))
        if artifact == "crf":
            return self.pseudo(split)
        if artifact == "pred":
            return self.predictions(split)
        raise ValueError(f"no per-image store for artifact '{artifact}'")

    def model_path(self, artifact: str, round: int = 1) -> Path:
        """model.pt of a training stage's artifact: `cls` (classifier round `round`), `irn` or `seg`."""
        if artifact == "irn":
            return self.path("irn", "model.pt")
        return (self.cls_round_dir(round) if artifact == "cls" else self.seg_dir) / "model.pt"

    def command(self, stage: str, split: str | None = None) -> str:
        """The command line a user should run to produce a stage's output."""
        cmd = f"igcam {stage} -w {self.root}"
        return f"{cmd} --split {split}" if split else cmd

    def cls_command(self, round_: int = 1) -> str:
        """The train-cls command line that makes classifier round `round_`."""
        return self.command("train-cls") + (f" --round {round_}" if round_ > 1 else "")

    # ---- requirements ---------------------------------------------------------------------
    def require_done(self, stage: str, split: str | None = None, what: str | None = None) -> dict[str, Any]:
        """The latest finished record of `stage` (for `split`), or MissingArtifact naming the command."""
        record = self.latest(stage, split)
        if record is None or record["status"] != "done":
            state = "has not finished" if record else "has not run"
            thing = what or f"{stage} output" + (f" for split '{split}'" if split else "")
            raise MissingArtifact(f"{thing} missing ({stage} {state}): run `{self.command(stage, split)}` first")
        return record

    def complete_maps(self, kind: str, split: str, ids: list[str]) -> MapStore:
        """The map store of `kind` for `split`, or MissingArtifact if it lacks any of `ids` (images a
        --skip-bad run skipped are accounted for: `store.skipped()`)."""
        store = self.maps(kind, split)
        have = store.ids() | set(store.skipped())
        missing = [i for i in ids if i not in have]
        if missing:
            state = "missing" if not have else f"incomplete ({len(ids) - len(missing)} of {len(ids)} images)"
            raise MissingArtifact(
                f"{kind} for split '{split}' {state}: run `{self.command(PRODUCER[kind], split)}` first"
            )
        return store

    def check_resumable(
        self,
        stage: str,
        split: str,
        cfg: Any,
        has_output: bool,
        inputs: Mapping[str, str | None] | None = None,
        what: str | None = None,
        remedy: str = "pass --force to redo it",
    ) -> None:
        """Refuse to add to a split's output that an earlier run made with other settings (those of
        the stage config `cfg`, less its NOT_IN_RESULTS) or, for each of `inputs` (input key -> run
        id now), from another run of that input."""
        previous = self.latest(stage, split)
        if not has_output or previous is None:
            return
        changed = changed_settings(cfg, previous["config"])
        made_from = previous.get("inputs", {})
        changed += [
            f"{key.partition(':')[0]} ran again"
            for key, run in (inputs or {}).items()
            if not self.same_results(made_from.get(key), run)
        ]
        if changed:
            raise UsageError(
                f"{what or f'{stage} output for split {split!r}'} was made with other settings "
                f"({', '.join(changed)}); {remedy}"
            )

    def same_results(self, first: str | None, second: str | None) -> bool:
        """Whether two runs of a stage stand for the same results: the same run, or two map-stage runs
        (records with a shard) with the same split and settings (those that change results) made
        from inputs that are the same in turn. The shards of one map-stage run each write a record of
        their own; they agree here, while a redo with other settings, or from another classifier, does not."""
        if first == second:
            return True
        by_id = {r["id"]: r for r in self.records()}  # read once for the whole walk

        def same(x: str | None, y: str | None) -> bool:
            if x == y:
                return True
            a, b = by_id.get(x or ""), by_id.get(y or "")
            if a is None or b is None or a["stage"] != b["stage"] or "shard" not in a or "shard" not in b:
                return False  # a training run is its own: another one with the same settings gives other weights
            if a.get("split") != b.get("split") or a["stage"] not in BY_NAME:
                return False
            config_cls = BY_NAME[a["stage"]].config
            known = {f.name for f in fields(config_cls)}
            if changed_settings(config_cls(**{k: v for k, v in a["config"].items() if k in known}), b["config"]):
                return False
            a_in, b_in = a.get("inputs", {}), b.get("inputs", {})
            return a_in.keys() == b_in.keys() and all(same(a_in[k], b_in[k]) for k in a_in)

        return same(first, second)

    # ---- manifest -------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path("manifest.json")

    def records(self) -> list[dict[str, Any]]:
        """Every run's record, oldest first. A damaged manifest is one line naming it (BadData), never a traceback:
        it is the workspace's history, so nothing is rewritten or guessed."""
        path = self.manifest_path
        if not path.exists():
            return []
        try:
            runs = json.loads(path.read_text())["runs"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise BadData(
                f"{path} is damaged ({type(exc).__name__}: {exc}); restore it from a backup, or move it aside to "
                "start the workspace's history afresh"
            ) from None
        if not isinstance(runs, list) or not all(isinstance(r, dict) and "id" in r and "stage" in r for r in runs):
            raise BadData(f"{path} is damaged (its 'runs' are not a list of run records)")
        return runs

    def latest(self, stage: str, split: str | None = None, done: bool = False) -> dict[str, Any] | None:
        """The most recently started record of a stage (and split), whatever its status unless `done`."""
        return _newest(self.records(), stage, split, done)

    def start(
        self,
        stage: str,
        config: dict[str, Any],
        split: str | None = None,
        inputs: dict[str, str] | None = None,
        **extra,
    ) -> StageRun:
        record = {
            "id": f"{stage}:{time.strftime('%Y%m%dT%H%M%S')}:{uuid.uuid4().hex[:6]}",
            "stage": stage,
            "split": split,
            "status": "running",
            "config": config,
            "inputs": inputs or {},
            "started": _now(),
            "ended": None,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "versions": _versions(),
            **extra,
        }
        self._put_record(record)
        return StageRun(self, record)

    def share_records(self, records: list[dict[str, Any]]) -> None:
        """Write another workspace's run records here (the ablation's sub-workspaces, which link the parent's
        classifier, CAMs and boundary network, record where those came from)."""
        for record in records:
            self._put_record(record)

    def _put_record(self, record: dict[str, Any]) -> None:
        with self._manifest_lock():
            runs = self.records()
            runs = [r for r in runs if r["id"] != record["id"]] + [record]
            write_text_atomically(self.manifest_path, json.dumps({"runs": runs}, indent=1, default=str))

    @contextmanager
    def _manifest_lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.path(".manifest.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def is_stale(self, record: dict[str, Any]) -> bool:
        """A finished run is stale when an input it read has since been rerun, or is stale itself."""
        return self.stale_reason(record) is not None

    def stale_reason(self, record: dict[str, Any]) -> str | None:
        """Why a run is stale ("make-cams:train ran again", "its input refine:train is stale"), or None."""
        runs = self.records()
        by_id = {r["id"]: r for r in runs}

        def latest_id(stage: str, split: str | None) -> str | None:
            stage, _, round_ = stage.partition("@")  # "train-cls@2": the latest run of classifier round 2
            # A training stage writes model.pt only when it finishes: a failed or running one changed nothing yet
            trains = stage in BY_NAME and BY_NAME[stage].writes in TRAINED_MODELS
            newest = _newest(runs, stage, split, done=trains, round_=int(round_) if round_ else None)
            return newest["id"] if newest else None

        def reason(rec: dict[str, Any]) -> str | None:
            for key, run_id in rec.get("inputs", {}).items():
                stage, _, split = key.partition(":")
                if latest_id(stage, split or None) != run_id:
                    return f"{key} ran again"
                if run_id in by_id and reason(by_id[run_id]) is not None:
                    return f"its input {key} is stale"
            return None

        return reason(record)


def process_gone(record: dict) -> bool:
    """Whether the run's process, on this host, no longer exists (a run on another host cannot be checked)."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. another user's process: it exists
        return False
    return False


def _newest(
    runs: list[dict[str, Any]], stage: str, split: str | None = None, done: bool = False, round_: int | None = None
) -> dict[str, Any] | None:
    """The most recently started of `runs` of a stage (and split, classifier round; finished if `done`)."""
    for r in reversed(runs):
        if (
            r["stage"] == stage
            and (split is None or r.get("split") == split)
            and (not done or r["status"] == "done")
            and (round_ is None or int(r.get("round") or 1) == round_)
        ):
            return r
    return None


def input_key(stage: str, split: str | None = None) -> str:
    return f"{stage}:{split}" if split else stage


def classifier_key(round_: int) -> str:
    """Input key of a classifier round: a later round does not make users of an earlier one stale."""
    return f"train-cls@{round_}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _versions() -> dict[str, str]:
    import numpy
    import torch

    return {
        "igcam": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }
