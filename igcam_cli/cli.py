"""The `igcam` command line. Thin: options in, a stage config out, stages.<x>.run() called."""

from __future__ import annotations

import functools
import json
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer
from typer.core import TyperCommand, TyperOption

from igcam_cli import __version__
from igcam_cli.config import RunOptions, build, to_dict
from igcam_cli.errors import IgcamError, UsageError, storage_error
from igcam_cli.registry import config_class, stage_config
from igcam_cli.runtime.distributed import parse_shard
from igcam_cli.validation import allowed, says_more_than_its_type
from igcam_cli.workspace import Workspace, default_workspace

app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    help="Weakly supervised semantic segmentation: image-level labels in, pixel labels out.\n\n"
    "Every stage takes its settings from its table in the workspace's igcam.toml (\\[train-cls], "
    "\\[make-cams], ...; written by `igcam init`); an option given on the command line overrides "
    "that value for this run, and manifest.json records what each run used.",
)

# ---- shared options ------------------------------------------------------------------------
WorkspaceOpt = Annotated[
    Path | None, typer.Option("--workspace", "-w", help="Workspace directory \\[default: $IGCAM_WORKSPACE or .]")
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")]
SeedOpt = Annotated[int, typer.Option(help="Random seed")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and results")]
SplitOpt = Annotated[str | None, typer.Option(help="Dataset split, e.g. train, val, train_aug")]
ShardOpt = Annotated[str | None, typer.Option(help="Process shard i/n of the images (automatic under torchrun)")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo images that are already done")]
SkipBadOpt = Annotated[
    bool,
    typer.Option(
        "--skip-bad",
        help="Leave out images that cannot be read (listed in the run's record and the final line) instead of "
        "stopping at the first",
    ),
]
TrainForceOpt = Annotated[bool, typer.Option("--force", help="Train a new model over a finished model.pt")]
WorkersOpt = Annotated[int | None, typer.Option(help="Worker processes")]
CpuWorkersOpt = Annotated[
    int | None, typer.Option("--workers", help="Worker processes; none given: every CPU this process may use")
]


class DatasetFormat(str, Enum):
    voc = "voc"
    folder = "folder"
    coco = "coco"
    synthetic = "synthetic"


class NoiseKind(str, Enum):
    swap = "swap"
    add = "add"
    drop = "drop"


class SynthStyle(str, Enum):
    heads = "heads"
    textured = "textured"
    shapes = "shapes"
    lookalike = "lookalike"
    scales = "scales"
    clutter = "clutter"


StyleOpt = Annotated[
    SynthStyle,
    typer.Option(
        help="Synthetic look: heads (the demo's), or a harder one: textured, "
        "shapes, lookalike, scales, clutter (docs in data/styles.py)"
    ),
]


class Preset(str, Enum):
    auto = "auto"
    synthetic = "synthetic"
    standard = "standard"


class StageCommand(TyperCommand):
    """A stage's command, whose --help shows for every option that sets a config field the value a
    run would use: from the igcam.toml of the workspace that -w or $IGCAM_WORKSPACE names, else the
    built-in default."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        ctx.meta["igcam_args"] = list(args)  # --help is eager: -w is not parsed yet when it runs
        return super().parse_args(ctx, args)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        stage = self.name or ""
        shown = _effective_settings(stage, ctx.meta.get("igcam_args", []))
        hints = get_type_hints(config_class(stage), include_extras=True)
        saved = {param: (param.default, param.help) for param in self.params if isinstance(param, TyperOption)}
        try:
            for param in saved:
                name = param.name or ""
                if shown.get(name) is not None:
                    value = shown[name]
                    param.default = ",".join(str(v) for v in value) if isinstance(value, list) else value
                if name in hints and says_more_than_its_type(hints[name]):  # choices and ranges, from the config
                    param.help = f"{param.help or ''} ({allowed(hints[name])})".strip()
            super().format_help(ctx, formatter)
        finally:
            for param, (default, help_text) in saved.items():
                param.default, param.help = default, help_text


def _effective_settings(stage: str, args: list[str]) -> dict:
    """The config a stage would run with, without command-line overrides (defaults if the workspace
    or its igcam.toml cannot be read)."""
    path = next((args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-w", "--workspace")), None)
    path = path or next((a.split("=", 1)[1] for a in args if a.startswith("--workspace=")), None)
    path = path or os.environ.get("IGCAM_WORKSPACE")
    table: dict = {}
    if path:
        try:
            table = Workspace.open(Path(path)).stage_table(stage)
        except IgcamError:
            pass
    try:
        return to_dict(build(config_class(stage), table, {}, table=stage))
    except IgcamError:
        return to_dict(config_class(stage)())


def handles_errors(fn):
    """One line and the documented exit code for every error a user can act on."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except IgcamError as exc:
            typer.echo(f"igcam: error: {exc.message}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("igcam: interrupted; finished work is kept, rerun the same command to resume", err=True)
            raise typer.Exit(130) from None
        except OSError as exc:  # a full disk or a read-only workspace, wherever the write was
            error = storage_error(exc)
            if error is None:
                raise
            typer.echo(f"igcam: error: {error.message}", err=True)
            raise typer.Exit(error.exit_code) from None

    return wrapper


def _ws(path: Path | None) -> Workspace:
    return Workspace.open(path if path is not None else default_workspace())


def _opts(device: str, seed: int, quiet: bool, skip_bad: bool = False) -> RunOptions:
    return RunOptions(device=device, seed=seed, quiet=quiet, skip_bad=skip_bad)


def _train(
    stage: Any, cfg: Any, ws: Workspace, opts: RunOptions, resume: bool, init_from: Path | None, force: bool
) -> None:
    """Run a training stage (train-cls, train-seg) with its --resume, --init-from and --force."""
    init = str(init_from) if init_from else None
    stage.run(cfg, ws, opts, stage.TrainOptions(resume=resume, init_from=init, force=force))


def _floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{option} expects comma-separated numbers, e.g. 1.0,0.5,1.5,2.0; got '{text}'") from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"igcam {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version")
    ] = False,
):
    """igcam: CAMs, IG-CAM refinement, dense CRF and evaluation as one resumable pipeline."""


# ---- commands ------------------------------------------------------------------------------
@app.command()
@handles_errors
def init(
    workspace: WorkspaceOpt = None,
    dataset: Annotated[DatasetFormat, typer.Option(help="Dataset layout")] = DatasetFormat.synthetic,
    root: Annotated[Path | None, typer.Option(help="Dataset root (voc, folder, coco)")] = None,
    classes: Annotated[str | None, typer.Option(help="Class list: a file (one per line) or a,b,c")] = None,
    n_train: Annotated[int, typer.Option(min=1, help="Synthetic: training images")] = 320,
    n_val: Annotated[int, typer.Option(min=1, help="Synthetic: validation images")] = 80,
    image_size: Annotated[int, typer.Option(min=32, help="Synthetic: image side in pixels")] = 128,
    style: StyleOpt = SynthStyle.heads,
    preset: Annotated[
        Preset,
        typer.Option(
            help="Stage settings: synthetic (small images, ResNet-18 from scratch, "
            "CPU-sized), standard (ImageNet ResNet-50, the IRN recipe), or auto: "
            "synthetic for the synthetic dataset and folders written by `igcam synth`"
        ),
    ] = Preset.auto,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing igcam.toml")] = False,
):
    """Create a workspace for a dataset (writes igcam.toml)."""
    from igcam_cli.stages import init as init_stage

    path = workspace if workspace is not None else default_workspace()
    chosen = init_stage.choose_preset(dataset.value, root, preset.value)
    synthetic = dict(n_train=n_train, n_val=n_val, size=image_size) | (
        {"style": style.value} if style.value != "heads" else {}
    )
    ws = init_stage.run(path, dataset.value, root, classes, synthetic, force, preset=chosen)
    typer.echo(
        f"workspace {ws.root} ready: {ws.dataset().name} dataset, {ws.dataset().num_classes} classes, "
        f"splits {', '.join(ws.dataset().splits())}; {chosen} settings in {ws.toml_path}"
    )


@app.command()
@handles_errors
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder (folder layout)")],
    n_train: Annotated[int, typer.Option(min=1)] = 320,
    n_val: Annotated[int, typer.Option(min=1)] = 80,
    image_size: Annotated[int, typer.Option(min=32)] = 128,
    label_noise: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Corrupt this fraction of the train labels (listed in corrupted.csv)"),
    ] = 0.0,
    noise_kind: Annotated[
        NoiseKind, typer.Option(help="swap a class for a wrong one, add a wrong one, or drop one of two or more")
    ] = NoiseKind.swap,
    style: StyleOpt = SynthStyle.heads,
    seed: SeedOpt = 0,
):
    """Write the synthetic dataset to disk in the `folder` layout (images/, masks/, labels.csv, splits/)."""
    from igcam_cli.data.synthetic import SYNTH_MARKER, SyntheticDataset, write_folder

    dataset = SyntheticDataset(n_train=n_train, n_val=n_val, size=image_size, seed=seed, style=style.value)
    write_folder(dataset, out)
    (out / SYNTH_MARKER).write_text(
        json.dumps(
            {
                "written_by": f"igcam {__version__} synth",
                "n_train": n_train,
                "n_val": n_val,
                "image_size": image_size,
                "style": style.value,
                "seed": seed,
                "label_noise": label_noise,
                "noise_kind": noise_kind.value,
            },
            indent=1,
        )
        + "\n"
    )
    typer.echo(f"wrote {n_train + n_val} images to {out}")
    if label_noise > 0:
        from igcam_cli.data.noise import CORRUPTED_NAME, write_noisy_labels

        train = {i: dataset.labels(i) for i in dataset.ids("train")}
        bad = write_noisy_labels(out, dataset.classes, train, label_noise, seed, noise_kind.value)
        typer.echo(
            f"corrupted the labels of {len(bad)} train images ({noise_kind.value}; listed in {out / CORRUPTED_NAME})"
        )


@app.command("train-cls", cls=StageCommand)
@handles_errors
def train_cls(
    workspace: WorkspaceOpt = None,
    backbone: Annotated[str | None, typer.Option(help="Classifier backbone")] = None,
    pretrained: Annotated[str | None, typer.Option(help="imagenet, none, or a weights file")] = None,
    split: SplitOpt = None,
    val_split: Annotated[str | None, typer.Option(help="Split for the per-epoch validation mAP")] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    crop: Annotated[int | None, typer.Option()] = None,
    crop_height: Annotated[int | None, typer.Option(help="Rows of the training canvas (0: --crop, a square)")] = None,
    input_scale: Annotated[
        float | None,
        typer.Option(
            help="Draw the images this much larger, here and in every stage that runs the classifier (small images)"
        ),
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Backbone learning rate (head: x head-lr-mult)")] = None,
    freeze_bn: Annotated[bool | None, typer.Option("--freeze-bn/--no-freeze-bn")] = None,
    frozen_stages: Annotated[
        int | None, typer.Option(help="Stages 1..k keep their pretrained weights (IRN: 2, conv1 to layer2)")
    ] = None,
    warmup_epochs: Annotated[
        int | None, typer.Option(help="Epochs of linear learning-rate warm-up (at most a quarter of the run)")
    ] = None,
    workers: WorkersOpt = None,
    round: Annotated[
        int | None,
        typer.Option(
            "--round", help="1: plain training (cls/); k >= 2: fine-tune round k-1's model into cls/round<k>/"
        ),
    ] = None,
    sample_weights: Annotated[
        str | None, typer.Option(help="influence: per-image loss weights from compute-influence (round >= 2)")
    ] = None,
    relabel: Annotated[
        bool | None,
        typer.Option(
            "--relabel/--no-relabel",
            help="With --sample-weights influence: train on compute-influence's suggested labels",
        ),
    ] = None,
    finetune_lr_mult: Annotated[float | None, typer.Option(help="Rounds >= 2 fine-tune at lr x this (> 0)")] = None,
    finetune_epochs: Annotated[int | None, typer.Option(help="Epochs of a round >= 2 (0: half of --epochs)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from cls/last.pt")] = False,
    force: TrainForceOpt = False,
    skip_bad: SkipBadOpt = False,
    init_from: Annotated[Path | None, typer.Option(help="Start from this classifier checkpoint")] = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
):
    """Train the multi-label CAM classifier (cls/model.pt; cls/last.pt after every epoch).

    Progressive training: `--round 2 --sample-weights influence` fine-tunes the round-1 model with
    the per-image weights and suggested labels of `igcam compute-influence` into cls/round2/ (round 1
    is kept; cls/round2/relabelled.csv lists the relabelled images).
    """
    from igcam_cli.stages import train_cls as stage

    ws = _ws(workspace)
    cfg = stage_config(
        ws,
        "train-cls",
        backbone=backbone,
        pretrained=pretrained,
        split=split,
        val_split=val_split,
        epochs=epochs,
        batch_size=batch_size,
        crop=crop,
        crop_height=crop_height,
        input_scale=input_scale,
        lr=lr,
        freeze_bn=freeze_bn,
        frozen_stages=frozen_stages,
        warmup_epochs=warmup_epochs,
        workers=workers,
        round=round,
        sample_weights=sample_weights,
        relabel=relabel,
        finetune_lr_mult=finetune_lr_mult,
        finetune_epochs=finetune_epochs,
    )
    _train(stage, cfg, ws, _opts(device, seed, quiet, skip_bad), resume, init_from, force)


@app.command("make-cams", cls=StageCommand)
@handles_errors
def make_cams(
    workspace: WorkspaceOpt = None,
    split: SplitOpt = None,
    scales: Annotated[str | None, typer.Option(help="Comma-separated scales")] = None,
    max_side: Annotated[
        int | None,
        typer.Option(min=0, help="Draw images longer than this (px) at this longer side, then upsample (0: no cap)"),
    ] = None,
    flip: Annotated[bool | None, typer.Option("--flip/--no-flip", help="Add horizontally flipped passes")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    label_source: Annotated[
        str | None,
        typer.Option(
            help="Classes that get CAMs: auto = the labels the classifier round trained on, labels = as given, "
            "predicted = the classifier's scores"
        ),
    ] = None,
    influence_fusion: Annotated[
        float | None,
        typer.Option(help="Mix lambda of the spatial influence maps into the CAMs (0 = off)"),
    ] = None,
    round: Annotated[int | None, typer.Option("--round", help="Classifier round \\[default: the latest]")] = None,
    workers: WorkersOpt = None,
    shard: ShardOpt = None,
    force: ForceOpt = False,
    skip_bad: SkipBadOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
):
    """Class activation maps for a split (cams/<split>/part-*.h5), from the latest classifier round."""
    from igcam_cli.stages import make_cams as stage

    ws = _ws(workspace)
    cfg = stage_config(
        ws,
        "make-cams",
        split=split,
        scales=_floats(scales, "--scales"),
        max_side=max_side,
        flip=flip,
        batch_size=batch_size,
        label_source=label_source,
        workers=workers,
        influence_fusion=influence_fusion,
        round=round,
    )
    stage.run(cfg, ws, _opts(device, seed, quiet, skip_bad), parse_shard(shard), force)


@app.command("compute-influence", cls=StageCommand)
@handles_errors
def compute_influence(
    workspace: WorkspaceOpt = None,
    split: SplitOpt = None,
    query_split: Annotated[
        str | None, typer.Option(help="Query images, aggregated per class \\[default: val, else the split]")
    ] = None,
    hessian: Annotated[str | None, typer.Option(help="Curvature (none: plain gradient dot products)")] = None,
    damping: Annotated[float | None, typer.Option(help="Damping (relative: x mean eigenvalue per layer)")] = None,
    damping_mode: Annotated[
        str | None, typer.Option(help="Damping relative to each layer's mean eigenvalue, or absolute")
    ] = None,
    fisher: Annotated[str | None, typer.Option(help="Fisher of the curvature (ggn: exact)")] = None,
    scope: Annotated[str | None, typer.Option(help="Tracked layers: last_block, layer4, or module names a,b")] = None,
    maps: Annotated[
        str | None, typer.Option(help="Spatial influence maps: for the labelled classes, all classes, or none")
    ] = None,
    size: Annotated[int | None, typer.Option(help="Resize the long side to this (0: as they are)")] = None,
    round: Annotated[int | None, typer.Option("--round", help="Classifier round \\[default: the latest]")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    workers: WorkersOpt = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait for the other shards' statistics (default under torchrun)")
    ] = False,
    shard: ShardOpt = None,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
):
    """Influence of each training image: self-influence, per-class scores, spatial maps, sample weights (influence/<split>/).

    scores.csv also suggests labels for atypical images whose classifier confidently sees a class
    they are not labelled with (`relabel_threshold`, `relabel_confidence`, `relabel_drop_below` and the sample-weight
    `w_*` settings are in \\[compute-influence] of igcam.toml). Influence is always measured against
    the labels as given. A classifier that has not learned its labels (learned fraction below
    `learned_high`, 0.7) suggests none, and its weights are pulled towards 1 (all 1 at `learned_low`, 0.3).

    Sharded: each `--shard i/n` writes its curvature sums; once all n are there, every shard fits the
    same preconditioner from their total and scores its images. Without --wait a shard stops after
    its own statistics; run it again when the others have theirs.
    """  # noqa: E501 (the first line is the command's one-line help in `igcam --help`: it stays one line)
    import os

    from igcam_cli.stages import compute_influence as stage

    ws = _ws(workspace)
    cfg = stage_config(
        ws,
        "compute-influence",
        split=split,
        query_split=query_split,
        hessian=hessian,
        damping=damping,
        damping_mode=damping_mode,
        fisher=fisher,
        scope=scope,
        maps=maps,
        size=size,
        round=round,
        batch_size=batch_size,
        workers=workers,
    )
    torchrun = shard is None and int(os.environ.get("WORLD_SIZE", "1")) > 1
    stage.run(cfg, ws, _opts(device, seed, quiet), parse_shard(shard), force, wait=wait or torchrun)


@app.command("influence-report", cls=StageCommand)
@handles_errors
def influence_report(
    workspace: WorkspaceOpt = None,
    split: SplitOpt = None,
    top_k: Annotated[int | None, typer.Option(help="Images to list")] = None,
    truth: Annotated[
        Path | None,
        typer.Option(
            help="Ids known to be mislabelled (default: corrupted.csv in the dataset root, "
            "or a synthetic dataset's label_noise)"
        ),
    ] = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
):
    """Training images most likely to have wrong labels (eval/influence-<split>.md, .json, .png)."""
    from igcam_cli.stages import influence_report as stage

    ws = _ws(workspace)
    cfg = stage_config(ws, "influence-report", split=split, top_k=top_k, truth=str(truth) if truth else None)
    result = stage.run(cfg, ws, _opts(device, seed, quiet))
    if quiet:  # the result, in one line
        typer.echo(stage.summary(result))


@app.command("train-irn", cls=StageCommand)
@handles_errors
def train_irn(
    workspace: WorkspaceOpt = None,
    split: SplitOpt = None,
    fg_threshold: Annotated[float | None, typer.Option(help="IR labels: confident foreground above (IRN 0.30)")] = None,
    bg_threshold: Annotated[float | None, typer.Option(help="IR labels: confident background below (IRN 0.05)")] = None,
    pretrained: Annotated[
        str | None, typer.Option(help="Backbone: imagenet (IRN), cls (this workspace's classifier), or a file")
    ] = None,
    backbone: Annotated[str | None, typer.Option(help="Backbone with imagenet or a file")] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    crop: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    radius: Annotated[int | None, typer.Option(help="Training pairs within this radius on the stride-4 grid")] = None,
    workers: WorkersOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from irn/last.pt")] = False,
    force: TrainForceOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
):
    """Train IRN's boundary network on IR labels made from the CAMs (irn/model.pt), for `refine --method irn`."""
    from igcam_cli.stages import train_irn as stage

    ws = _ws(workspace)
    cfg = stage_config(
        ws,
        "train-irn",
        split=split,
        fg_threshold=fg_threshold,
        bg_threshold=bg_threshold,
        pretrained=pretrained,
        backbone=backbone,
        epochs=epochs,
        batch_size=batch_size,
        crop=crop,
        lr=lr,
        radius=radius,
        workers=workers,
    )
    stage.run(cfg, ws, _opts(device, seed, quiet), stage.TrainOptions(resume=resume, force=force))


@app.command(cls=StageCommand)
@handles_errors
def refine(
    workspace: WorkspaceOpt = None,
    split: SplitOpt = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="igcam: guidance + boundary; irn: IRN's random walk (after train-irn); both: igcam, then walk"
        ),
    ] = None,
    walk_beta: Annotated[float | None, typer.Option(help="Random walk: affinities ** beta (IRN 10)")] = None,
    walk_steps: Annotated[int | None, typer.Option(help="Random walk: steps of the transition (IRN 256)")] = None,
    walk_radius: Annotated[
        int | None, typer.Option(help="Random walk: pair radius on the stride-4 grid (IRN 5)")
    ] = None,
    guidance: Annotated[
        str | None, typer.Option(help="Guidance regions: proposals are label-free; gt is an ORACLE (GT masks)")
    ] = None,
    boundary: Annotated[
        bool | None, typer.Option("--boundary/--no-boundary", help="Multi-scale boundary enhancement")
    ] = None,
    scales: Annotated[str | None, typer.Option(help="Boundary scales, coarse to fine")] = None,
    iterations: Annotated[int | None, typer.Option(help="Propagation steps per scale")] = None,
    fill_gain: Annotated[float | None, typer.Option(help="Guidance: fill = min(1, gain * region score)")] = None,
    outside_damping: Annotated[float | None, typer.Option(help="Guidance: factor outside selected regions")] = None,
    max_area: Annotated[float | None, typer.Option(help="Guidance: largest region, fraction of the image")] = None,
    proposal_scale: Annotated[float | None, typer.Option(help="Proposals: graph-segmentation scale")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    workers: CpuWorkersOpt = None,
    shard: ShardOpt = None,
    force: ForceOpt = False,
    skip_bad: SkipBadOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
):
    """Instance guidance + multi-scale boundary enhancement of CAMs, or IRN's random walk (refined/<split>/part-*.h5).

    More parameters (anchor_threshold, select_threshold, min_share, dilations, sigma_rgb, sigma_xy)
    are set in the \\[refine] table of igcam.toml.
    """
    from igcam_cli.stages import refine as stage

    ws = _ws(workspace)
    cfg = stage_config(
        ws,
        "refine",
        split=split,
        method=method,
        walk_beta=walk_beta,
        walk_steps=walk_steps,
        walk_radius=walk_radius,
        guidance=guidance,
        boundary=boundary,
        scales=_floats(scales, "--scales"),
        iterations=iterations,
        fill_gain=fill_gain,
        outside_damping=outside_damping,
        max_area=max_area,
        proposal_scale=proposal_scale,
        batch_size=batch_size,
        workers=workers,
    )
    stage.run(cfg, ws, _opts(device, seed, quiet, skip_bad), parse_shard(shard), force)


@app.command(cls=StageCommand)
@handles_errors
def crf(
    workspace: WorkspaceOpt = None,
    split: SplitOpt = None,
    source: Annotated[str | None, typer.Option(help="Maps the CRF starts from")] = None,
    preset: Annotated[str | None, typer.Option(help="CRF parameters")] = None,
    bg_mode: Annotated[str | None, typer.Option(help="power: (1-max)^alpha, or constant: tau")] = None,
    bg_alpha: Annotated[float | None, typer.Option()] = None,
    bg_tau: Annotated[float | None, typer.Option()] = None,
    confidence: Annotated[float | None, typer.Option(help="Marginals below this become 255")] = None,
    ignore_between: Annotated[
        str | None,
        typer.Option(help="LOW,HIGH: pixels whose map value lies between become 255 (ignored by train-seg); '' off"),
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(help="pydensecrf (CPU processes), torch (batched on the device), auto (torch on a GPU)"),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per torch CRF pass")] = None,
    workers: CpuWorkersOpt = None,
    shard: ShardOpt = None,
    force: ForceOpt = False,
    skip_bad: SkipBadOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
):
    """Dense-CRF pseudo-labels (pseudo/<split>/<id>.png, VOC palette, 255 = ignore)."""
    from igcam_cli.stages import crf as stage

    ws = _ws(workspace)
    cfg = stage_config(
        ws,
        "crf",
        split=split,
        source=source,
        preset=preset,
        bg_mode=bg_mode,
        bg_alpha=bg_alpha,
        bg_tau=bg_tau,
        confidence=confidence,
        ignore_between=_floats(ignore_between, "--ignore-between"),
        workers=workers,
        backend=backend,
        batch_size=batch_size,
    )
    stage.run(cfg, ws, _opts(device, seed, quiet, skip_bad), parse_shard(shard), force)


@app.command("train-seg", cls=StageCommand)
@handles_errors
def train_seg(
    workspace: WorkspaceOpt = None,
    arch: Annotated[
        str | None,
        typer.Option(help="Segmentation model (the resnet18 ones are small, for CPUs)"),
    ] = None,
    pretrained: Annotated[
        str | None, typer.Option(help="imagenet, none, or a weights file (ResNet, classifier or segmenter)")
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(help="pseudo: crf pseudo-labels; gt: GT masks (the fully supervised UPPER BOUND)"),
    ] = None,
    split: SplitOpt = None,
    val_split: Annotated[str | None, typer.Option(help="Split for the per-epoch validation mIoU ('' for none)")] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    min_steps: Annotated[
        int | None, typer.Option(help="Raise --epochs until the run takes this many SGD steps (0: off)")
    ] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    crop: Annotated[int | None, typer.Option()] = None,
    input_scale: Annotated[
        float | None,
        typer.Option(help="Draw the images this much larger, in training, validation and predict (small images)"),
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Backbone learning rate (head: x head-lr-mult)")] = None,
    workers: WorkersOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from seg/last.pt")] = False,
    force: TrainForceOpt = False,
    skip_bad: SkipBadOpt = False,
    init_from: Annotated[Path | None, typer.Option(help="Start from this segmenter checkpoint (seg/model.pt)")] = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
):
    """Train DeepLabV3 on the pseudo-labels (seg/model.pt; seg/last.pt after every epoch)."""
    from igcam_cli.stages import train_seg as stage

    ws = _ws(workspace)
    cfg = stage_config(
        ws,
        "train-seg",
        arch=arch,
        pretrained=pretrained,
        labels=labels,
        split=split,
        val_split=val_split,
        epochs=epochs,
        min_steps=min_steps,
        batch_size=batch_size,
        crop=crop,
        input_scale=input_scale,
        lr=lr,
        workers=workers,
    )
    _train(stage, cfg, ws, _opts(device, seed, quiet, skip_bad), resume, init_from, force)


@app.command(cls=StageCommand)
@handles_errors
def predict(
    workspace: WorkspaceOpt = None,
    split: Annotated[str | None, typer.Option(help="Predict a dataset split ...")] = None,
    images: Annotated[
        Path | None, typer.Option(help="... or every JPEG/PNG file of a folder (ids = file stems)")
    ] = None,
    out: Annotated[
        str | None, typer.Option(help="Output name: pred/<out>/ \\[default: the split's or folder's name]")
    ] = None,
    scales: Annotated[str | None, typer.Option(help="Comma-separated scales")] = None,
    max_side: Annotated[
        int | None,
        typer.Option(min=0, help="Draw images longer than this (px) at this longer side, then upsample (0: no cap)"),
    ] = None,
    flip: Annotated[bool | None, typer.Option("--flip/--no-flip", help="Add horizontally flipped passes")] = None,
    crf: Annotated[
        bool | None, typer.Option("--crf/--no-crf", help="Dense CRF over the predicted probabilities")
    ] = None,
    preset: Annotated[str | None, typer.Option(help="CRF parameters (with --crf)")] = None,
    class_gate: Annotated[
        float | None,
        typer.Option(
            help="Drop the classes the workspace's classifier scores below this probability in an image (0: off)"
        ),
    ] = None,
    overlays: Annotated[bool | None, typer.Option("--overlays/--no-overlays", help="Write overlays/<id>.jpg")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    crf_backend: Annotated[
        str | None, typer.Option(help="The CRF's backend: pydensecrf, torch or auto (torch on a GPU)")
    ] = None,
    workers: CpuWorkersOpt = None,
    shard: ShardOpt = None,
    force: ForceOpt = False,
    skip_bad: SkipBadOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
):
    """Label maps from the segmentation model (pred/<name>/<id>.png + overlays/<id>.jpg)."""
    from igcam_cli.stages import predict as stage

    ws = _ws(workspace)
    cfg = stage_config(
        ws,
        "predict",
        split=split,
        images=str(images) if images is not None else None,
        out=out,
        scales=_floats(scales, "--scales"),
        max_side=max_side,
        flip=flip,
        crf=crf,
        preset=preset,
        class_gate=class_gate,
        overlays=overlays,
        batch_size=batch_size,
        workers=workers,
        crf_backend=crf_backend,
    )
    stage.run(cfg, ws, _opts(device, seed, quiet, skip_bad), parse_shard(shard), force)


@app.command(cls=StageCommand)
@handles_errors
def evaluate(
    workspace: WorkspaceOpt = None,
    artifact: Annotated[
        str | None,
        typer.Option(help="What to score (seg: predict's pred/<split>/; also influence: the mislabel report)"),
    ] = None,
    split: SplitOpt = None,
    bg_tau: Annotated[float | None, typer.Option(help="Fixed background threshold instead of a sweep")] = None,
    fixed_tau: Annotated[
        float | None,
        typer.Option(help="Maps are also scored at this threshold (default: 0.15 for cams as IRN, 0.50 for refined)"),
    ] = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
):
    """mIoU of an artifact against GT masks (eval/<artifact>-<split>.json and .md)."""
    from igcam_cli.stages import evaluate as stage

    ws = _ws(workspace)
    if artifact == "influence":  # the same as `igcam influence-report`
        from igcam_cli.stages import influence_report

        report_cfg = stage_config(ws, "influence-report", split=split)
        result = influence_report.run(report_cfg, ws, _opts(device, seed, quiet))
        if quiet:
            typer.echo(influence_report.summary(result))
        return
    cfg = stage_config(ws, "evaluate", artifact=artifact, split=split, bg_tau=bg_tau, fixed_tau=fixed_tau)
    result = stage.run(cfg, ws, _opts(device, seed, quiet))
    if quiet:  # the result, in one line
        typer.echo(stage.summary(result))


@app.command()
@handles_errors
def ablate(
    workspace: WorkspaceOpt = None,
    split: Annotated[str, typer.Option(help="Split to run and evaluate on")] = "train",
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
):
    """CAM, +guidance, +boundary, +both, each with and without CRF: one mIoU table (eval/ablation-<split>.md)."""
    from igcam_cli import ablation

    ablation.run(_ws(workspace), split, _opts(device, seed, quiet), workers=workers)


@app.command()
@handles_errors
def status(workspace: WorkspaceOpt = None):
    """What is done, stale, running or failed in a workspace."""
    from igcam_cli.stages import status as stage

    stage.run(_ws(workspace))


@app.command()
@handles_errors
def report(
    workspace: WorkspaceOpt = None,
    sample: Annotated[int, typer.Option(min=0, help="Images per split in the contact sheets (seeded)")] = 8,
    out: Annotated[Path | None, typer.Option(help="Where to write the page \\[default: WS/report/index.html]")] = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
):
    """One self-contained HTML page of the workspace (pictures, evaluations, provenance) that opens offline."""
    from igcam_cli.html_report import write_report

    path = write_report(_ws(workspace), out=out, sample=sample, seed=seed)
    typer.echo(str(path) if quiet else f"wrote {path}")


@app.command()
@handles_errors
def demo(
    workspace: Annotated[
        Path | None,
        typer.Option(
            "--workspace", "-w", help="Workspace \\[default: ./igcam-demo, with --influence ./igcam-demo-influence]"
        ),
    ] = None,
    n_train: Annotated[int | None, typer.Option(min=8, help="\\[default: 320, with --influence 160]")] = None,
    n_val: Annotated[int | None, typer.Option(min=4, help="\\[default: 80, with --influence 40]")] = None,
    influence: Annotated[
        bool,
        typer.Option(
            "--influence",
            help="Show IG-CAM's influence round instead: noisy train labels, classifier rounds 1 and 2, "
            "the mislabel finder",
        ),
    ] = False,
    label_noise: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="With --influence: the fraction of train labels swapped")
    ] = 0.1,
    epochs: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Both models train this many epochs, with no step minimum (a quick look; with --influence: the "
            "classifier) \\[default: the synthetic preset's]",
        ),
    ] = None,
    workers: Annotated[int, typer.Option(min=0)] = 2,
    force: Annotated[bool, typer.Option("--force", help="Start from a fresh workspace")] = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
):
    """Synthetic data and the whole chain on it, on the CPU, with one table of mIoU per stage."""
    from igcam_cli import demo as stage

    opts = _opts(device, seed, quiet)
    if influence:
        stage.run_influence(
            workspace if workspace is not None else Path("igcam-demo-influence"),
            opts,
            n_train=n_train or 160,
            n_val=n_val or 40,
            label_noise=label_noise,
            epochs=epochs,
            workers=workers,
            force=force,
        )
        return
    path = workspace if workspace is not None else Path("igcam-demo")
    stage.run(path, opts, n_train=n_train or 320, n_val=n_val or 80, epochs=epochs, workers=workers, force=force)


@app.command("run")
@handles_errors
def run_chain(
    workspace: WorkspaceOpt = None,
    until: Annotated[str | None, typer.Option(help="Stop after this stage")] = None,
    start: Annotated[
        str | None, typer.Option("--from", help="Rerun this stage and every later one from scratch")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Pseudo-label split \\[default: train-seg's split]")] = None,
    val_split: Annotated[
        str | None,
        typer.Option(
            help="Split to predict and evaluate the model on ('' for none) \\[default: train-seg's val_split]"
        ),
    ] = None,
    rounds: Annotated[
        int | None,
        typer.Option(
            help="2: IG-CAM's influence round (compute-influence, then train-cls --round 2 with its weights and "
            "suggested labels) before make-cams \\[default: igcam.toml's \\[run] rounds, else 1]",
        ),
    ] = None,
    skip_bad: SkipBadOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
):
    """The whole chain (train-cls, make-cams, refine, crf, train-seg, predict, evaluate), skipping fresh stages.

    With `--rounds 2` (or `[run] rounds = 2`) compute-influence and classifier round 2 follow train-cls,
    and make-cams onward use round 2. Settings come from the stage tables of igcam.toml. A stage reruns
    when its settings, its seed or an upstream run changed, and resumes when it was interrupted.
    """
    from igcam_cli import chain

    chain.run(
        _ws(workspace),
        _opts(device, seed, quiet, skip_bad),
        until=until,
        start=start,
        split=split,
        val_split=val_split,
        rounds=rounds,
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
