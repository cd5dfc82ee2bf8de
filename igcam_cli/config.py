"""Typed stage configs and igcam.toml.

A stage's effective config is: options given on the command line, else the stage's table in
igcam.toml, else the dataclass default. `igcam init` writes dataset-specific defaults into the
toml (the synthetic dataset gets a small CPU-friendly classifier, VOC gets the IRN recipe).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import tomli_w

from igcam_cli.atomic import write_text_atomically
from igcam_cli.errors import BadData, UsageError
from igcam_cli.validation import (
    Count,
    Fraction,
    NonNegative,
    NonNegativeFloat,
    Positive,
    Range,
    Rule,
    Scales,
    check,
)

TOML_NAME = "igcam.toml"
Crop = Annotated[int, Range(16)]  # a network input side, at least one stride-16 cell
CrfPreset = Literal["psa", "irn", "deeplab", "toco"]  # core/densecrf.py PRESETS
MAX_SIDE = 1024  # make-cams' and predict's cap on an image's longer side (see MakeCamsConfig.max_side)
SCALE_ORDER = Rule(("scale_min", "scale_max"), lambda c: c.scale_min <= c.scale_max, "need scale_min <= scale_max")
# Each stage config's NOT_IN_RESULTS: settings that change how fast a stage runs or what else it
# writes, never its results; a resume or `igcam run` does not count them as changed settings.


@dataclass
class RunOptions:
    """Options every command has."""

    device: str = "auto"
    seed: int = 0
    quiet: bool = False
    skip_bad: bool = False  # per-image stages: leave out unreadable images instead of stopping (map_stage.py)


@dataclass
class TrainClsConfig:
    NOT_IN_RESULTS: ClassVar[tuple[str, ...]] = ("workers", "val_split")  # val_split: only the logged val mAP

    RULES: ClassVar[tuple[Rule, ...]] = (
        SCALE_ORDER,
        Rule(("crop_height",), lambda c: c.crop_height == 0 or c.crop_height >= 16, "need 0 (square) or >= 16"),
        Rule(
            ("sample_weights", "round"),
            lambda c: c.sample_weights == "none" or c.round >= 2,
            "influence weights need --round 2 or later (round 1 is the plain training compute-influence reads)",
        ),
    )

    def idle_settings(self) -> tuple[str, ...]:
        """Round 1 does not fine-tune; later rounds never warm up (stages/train_cls.py _schedule)."""
        return ("relabel", "finetune_lr_mult", "finetune_epochs") if self.round == 1 else ("warmup_epochs",)

    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"  # models/classifier.py BACKBONES
    pretrained: str = "imagenet"  # imagenet | none | PATH to a state dict
    split: str = "train"
    val_split: str = "val"
    epochs: Count = 5
    batch_size: Count = 16
    crop: Crop = 512
    # rows of the training canvas (0: crop, a square); crop_height x crop for landscape images
    crop_height: NonNegative = 0
    scale_min: Positive = 0.625  # random rescale: the long side becomes s * crop, s in [scale_min, scale_max]
    scale_max: float = 1.25
    # Images are drawn this much larger for the classifier: the training canvas (crop, crop_height) and its rescale
    # are multiplied by it, and make-cams, compute-influence and predict's class gate draw images at it times their
    # own scales (the checkpoint keeps it). For small images, where output stride 16 leaves the CAMs a coarse grid
    # (8 x 8 at 128 px). It costs 4x train-cls's compute and 4x make-cams'. The synthetic preset sets 2 for images
    # under 256 px (stages/init.py small_image_scale, measured on all six styles); refine's fill gain follows the
    # finer CAM grid it gives.
    input_scale: Positive = 1.0
    # The defaults are IRN's train_cam (docs/METHOD.md §1), the recipe behind the field's CAM baseline
    # (48.3 % mIoU on VOC 2012 train): lr 0.1 backbone / 1.0 head, poly decay, weight decay 1e-4, batch 16,
    # 5 epochs, long side 320-640 then a 512 crop.
    lr: Positive = 0.1  # backbone; the head gets lr * head_lr_mult
    head_lr_mult: NonNegativeFloat = 10.0
    # IRN's PolyOptimizer(params, lr, weight_decay) passes its weight decay positionally into SGD's momentum
    # slot (the groups carry the real weight decay), so IRN trains with momentum 1e-4, i.e. none to speak of;
    # at lr 0.1 / 1.0 a momentum of 0.9 would be a ten times larger effective step.
    momentum: Fraction = 1e-4
    weight_decay: NonNegativeFloat = 1e-4
    warmup_epochs: NonNegative = 0  # linear learning-rate warm-up before the poly decay (rounds >= 2 never warm up)
    freeze_bn: bool = True  # BN statistics fixed (γ/β still train where gradients reach); ignored from random weights
    # Stages 1..k keep their weights and get no gradient (IRN: 2, conv1 to layer2); ignored from random weights
    frozen_stages: Annotated[int, Range(0, 3)] = 2  # stage 4 and the head always train
    workers: NonNegative = 2
    round: Count = 1  # 1: plain training (cls/model.pt); k >= 2: fine-tunes round k-1's model into cls/round<k>/
    # none | influence: per-image loss weights from influence/<split>/scores.csv
    sample_weights: Literal["none", "influence"] = "none"
    relabel: bool = True  # with sample_weights=influence: train on compute-influence's suggested labels
    finetune_lr_mult: Positive = 0.2  # rounds >= 2 fine-tune at lr * finetune_lr_mult ...
    finetune_epochs: NonNegative = 0  # ... for this many epochs (0: half of `epochs`, at least 1)


@dataclass
class MakeCamsConfig:
    NOT_IN_RESULTS: ClassVar[tuple[str, ...]] = ("workers", "batch_size")

    split: str = "train"
    scales: Scales = field(default_factory=lambda: [1.0, 0.5, 1.5, 2.0])
    flip: bool = True
    batch_size: Count = 8
    workers: NonNegative = 2
    # auto: the labels the classifier round was trained on (the image labels, with the suggestions of
    # compute-influence where train-cls --sample-weights influence relabelled) | labels: the image labels as
    # given | predicted: classes scoring above predict_threshold
    label_source: Literal["auto", "labels", "predicted"] = "auto"
    predict_threshold: Fraction = 0.5
    influence_fusion: Fraction = 0.0  # lambda: (1 - lambda) cam + lambda influence map (influence/<split>/); 0 = off
    round: Count | None = None  # classifier round (cls/model.pt = 1, cls/round<k>/model.pt); None = the latest
    # Images longer than this (px) are drawn at this longer side and their maps upsampled (0 = no cap):
    # a 4000 x 3000 photo at scale 2.0 needs more memory than most machines have, and the classifier never
    # saw objects that large. VOC (500 px) and COCO (640 px) images are below it, and so are all the synthetic
    # styles (128-160 px): the quality table's numbers do not depend on it.
    max_side: NonNegative = MAX_SIDE


@dataclass
class ComputeInfluenceConfig:
    # sample weights and label suggestions only shape scores.csv, which every complete run rewrites; the
    # classifier is compared by its checksum, so `round` (None: the latest) may name it either way
    NOT_IN_RESULTS: ClassVar[tuple[str, ...]] = (
        "workers",
        "batch_size",
        "round",
        "w_min",
        "w_max",
        "w_threshold",
        "w_temperature",
        "relabel_threshold",
        "relabel_confidence",
        "relabel_drop_below",
        "learned_low",
        "learned_high",
    )
    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(("w_min", "w_max"), lambda c: c.w_min <= 1.0 <= c.w_max, "need w_min <= 1 <= w_max"),
        Rule(
            ("learned_low", "learned_high"),
            lambda c: c.learned_low <= c.learned_high,
            "need learned_low <= learned_high",
        ),
        Rule(
            ("relabel_drop_below", "relabel_confidence"),
            lambda c: c.relabel_drop_below <= 1 - c.relabel_confidence + 1e-9,
            "need relabel_drop_below <= 1 - relabel_confidence",
        ),
    )

    split: str = "train"
    query_split: str | None = None  # None: 'val' when the dataset has it (and it is not `split`), else `split`
    hessian: Literal["ekfac", "kfac", "none"] = "ekfac"  # none: plain gradient dot products
    damping: NonNegativeFloat = 0.1
    damping_mode: Literal["relative", "absolute"] = "relative"  # relative: damping x mean eigenvalue per layer
    fisher: Literal["ggn", "sampled", "empirical"] = "ggn"  # ggn: exact, C seeds
    scope: str = "last_block"  # last_block | layer4 | comma-separated module names (e.g. head)
    maps: Literal["labelled", "all", "none"] = "labelled"  # spatial maps for: labelled classes | all classes | none
    size: NonNegative = 0  # long side the images are resized to (0: their own size x the classifier's input_scale)
    round: Count | None = None  # classifier round; None = the latest
    w_min: float = 0.2  # sample weights (core/influence.py sample_weights)
    w_max: float = 2.0
    w_threshold: float = 1.0
    w_temperature: Positive = 1.0
    relabel_threshold: float = 1.0  # label suggestions (core/influence.py suggest_labels): atypicality above this
    # ... and the classifier sees an unlabelled class with p above this. 0.7, not 0.5: suggestions on truly
    # mislabelled images (benchmarks/mislabels.py, 10 % swapped labels, 160 images, recomputed from the stored
    # scores), 0.5 / 0.7: data seed 0 on heads, textured, scales, clutter 18 of 25 / 8 of 9; data seed 1 on
    # heads, textured, scales, clutter, lookalike 19 of 29 / 16 of 20 (all before the learned-fraction guard)
    relabel_confidence: Annotated[float, Range(0.5, 1, high_open=True)] = 0.7
    relabel_drop_below: Fraction = 0.0  # ... or scores a labelled class below this (0: never drop without an addition)
    # The guard (stages/compute_influence.py _fit): g = median over images of 1 - loss / class-prior loss;
    # weights are all 1 at g <= learned_low, at full strength from learned_high, where suggestions start.
    # 0.65, not 0.7 (benchmarks/mislabels.py, 10 % swapped labels, the synthetic preset's x2 classifier; the
    # suggestions the guard would withhold, right of made): textured g 0.70 3 of 3 and (data seed 1) 0.69 4 of
    # 4, scales 0.67 7 of 7, clutter 0.67 6 of 7 (heads, g 0.87, made 6, all right); lookalike 0.38 and shapes
    # 0.29 none. Below 0.65 they were poor: the demo's 3-epoch classifier g 0.57 0 of 10, lookalike at x1 0.62
    # 6 of 11
    learned_low: float = 0.3
    learned_high: float = 0.65
    batch_size: Count = 8
    workers: NonNegative = 2


@dataclass
class InfluenceReportConfig:
    NOT_IN_RESULTS: ClassVar[tuple[str, ...]] = ()

    split: str = "train"
    top_k: Count = 24
    # list of truly mislabelled ids (default: corrupted.csv in the dataset root, or a synthetic dataset's label_noise)
    truth: str | None = None


@dataclass
class TrainIrnConfig:
    """IRN's boundary network (train_irn): defaults are IRN's, on IR labels made from the CAMs."""

    NOT_IN_RESULTS: ClassVar[tuple[str, ...]] = ("workers",)
    RULES: ClassVar[tuple[Rule, ...]] = (
        SCALE_ORDER,
        Rule(("bg_threshold", "fg_threshold"), lambda c: c.bg_threshold < c.fg_threshold, "need bg < fg threshold"),
    )

    split: str = "train"  # the CAMs (make-cams on this split) the IR labels are made from
    # IR labels: CRF of the CAMs against a constant background; above fg_threshold confident foreground,
    # below bg_threshold confident background, 255 between (IRN's conf_fg_thres / conf_bg_thres)
    fg_threshold: Fraction = 0.30
    bg_threshold: Fraction = 0.05
    # imagenet: a fresh ImageNet ResNet (IRN) | cls: the workspace classifier's backbone | PATH: a state dict
    pretrained: str = "imagenet"
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"  # with cls: the classifier's
    epochs: Count = 3
    batch_size: Count = 32
    crop: Crop = 512
    scale_min: Positive = 0.5  # random rescale of the image (and, nearest, its labels) before the crop
    scale_max: float = 1.5
    lr: Positive = 0.1
    momentum: Fraction = 1e-4  # IRN's PolyOptimizer again: its weight decay lands in SGD's momentum slot
    weight_decay: NonNegativeFloat = 1e-4
    radius: Annotated[int, Range(2, 20)] = 10  # pairs within this distance on the stride-4 grid
    workers: NonNegative = 2


@dataclass
class RefineConfig:
    NOT_IN_RESULTS: ClassVar[tuple[str, ...]] = ("workers", "batch_size")
    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(("scales",), lambda c: c.scales == sorted(c.scales), "boundary scales go coarse to fine (ascending)"),
    )

    def idle_settings(self) -> tuple[str, ...]:
        """The walk's settings do nothing without the walk; guidance and boundary nothing with the walk alone."""
        if self.method == "igcam":
            return ("walk_beta", "walk_steps", "walk_radius")
        if self.method == "irn":
            return tuple(
                f.name
                for f in fields(self)
                if f.name not in ("split", "method", "batch_size", "workers") and not f.name.startswith("walk_")
            )
        return ()

    split: str = "train"
    # igcam: guidance and boundary enhancement | irn: IRN's random walk on the CAMs (needs train-irn) |
    # both: the random walk on igcam's refined maps
    method: Literal["igcam", "irn", "both"] = "igcam"
    walk_beta: Positive = 10.0  # IRN: affinities ** beta
    walk_steps: Count = 256  # IRN: T^(2^8)
    walk_radius: Annotated[int, Range(2, 10)] = 5
    # proposals (label-free) | gt (ORACLE: GT masks as regions) | none
    guidance: Literal["proposals", "gt", "none"] = "proposals"
    boundary: bool = True
    # Defaults below marked (*) were chosen across all six synthetic styles (heads, textured, shapes,
    # lookalike, scales, clutter; 160 train images each, CAMs of the synthetic preset) with
    # benchmarks/refine_sweep.py, scored by refined mIoU and by CRF(refined) against CRF(CAM). The old
    # ones (fill_gain 2, anchor 0.5, max_area 0.5, 10 iterations at scales 0.25-1 on every image size)
    # filled whole background regions from diffuse CAMs and spread a haze over textured backgrounds:
    # CRF(refined) 39.9 vs CRF(CAM) 45.2, mean of the styles; the new ones give 48.3, >= CRF(CAM) on each.
    scales: Annotated[list[float], Range(0, 1, low_open=True)] = field(
        default_factory=lambda: [0.25, 0.5, 1.0]
    )  # boundary scales, coarse to fine
    # (*) skip boundary scales whose shorter image side would be below this (pixels): at 128 px the 0.25 scale
    # is 32 px and the largest dilation (24) spans it (CRF mean 46.6 with it, 47.7 without; 500 px VOC keeps all)
    min_scale_side: NonNegative = 64
    # (*) propagation steps per scale (10: CRF mean 46.8, 3: 47.7; on the preset's x2 CAMs, 1 / 3 / 6:
    # 56.4 / 56.4 / 56.0)
    iterations: NonNegative = 3
    batch_size: Count = 8
    workers: NonNegative | None = None  # None: every CPU this process may use (runtime/pool.py available_cpus)
    # proposals (core/proposals.py): Felzenszwalb scale, smoothing, smallest segment (fraction of the image)
    proposal_scale: Positive = 300.0
    proposal_sigma: NonNegativeFloat = 0.8
    proposal_min_size: Fraction = 1e-3
    # guidance (core/guidance.py: GuidanceParams documents each)
    # (*) 0.4 / 0.5 / 0.6 / 0.7: CRF mean 46.4 / 47.7 / 48.3 / 47.4 (on the preset's x2 CAMs, 2026-12-08,
    # 0.5 / 0.6 / 0.7: 56.6 / 56.4 / 55.6)
    anchor_threshold: Annotated[float, Range(0, 1, low_open=True)] = 0.6
    min_anchor_cover: Fraction = 0.5
    # (*) 0.25 / 0.5: CRF mean 48.3 / 47.9, on x2 CAMs 56.4 / 54.7 (heads alone prefers 0.5: 79.3 vs 76.4,
    # x2 86.7 vs 85.3); objects up to a quarter of the image. Raise it for data with larger objects (VOC has some).
    max_area: Fraction = 0.25
    select_threshold: NonNegativeFloat = 0.12  # (*) 0.12 / 0.25 / 0.4 moved the CRF mean by at most 1.5
    min_share: Fraction = 0.5
    # None: from each image's CAM grid (core/guidance.py grid_fill_gain): 1 at 8 cells across its shorter side
    # or fewer, 2 at 16 or more. (*) On the coarse CAMs of 128 px images (8 x 8 cells), 1 / 1.5 / 2: CRF mean
    # 48.0 / 46.2 / 43.7 (boundary off, max_area 0.25); on the same images drawn x2 for the classifier (16 x 16),
    # 2 is the best (README, "Drawing the classifier's images larger")
    fill_gain: Positive | None = None
    # (*) 0.25 / 0.5 / 1: CRF mean 47.9 / 48.3 / 48.8, fixed-tau maps 34.7 / 29.8 / 24.6
    outside_damping: Fraction = 0.5
    # boundary (core/boundary.py: BoundaryParams documents each)
    dilations: Annotated[list[int], Range(1)] = field(default_factory=lambda: [1, 2, 4, 8, 12, 24])
    sigma_rgb: Positive = 0.3
    sigma_xy: Positive = 16.0


@dataclass
class CrfConfig:
    # the backends agree to float rounding (>= 99.5 % of labels, tests/test_torch_crf.py): a resume on another
    # one is noted in the log and the record, not refused
    NOT_IN_RESULTS: ClassVar[tuple[str, ...]] = ("workers", "backend", "batch_size")
    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(
            ("ignore_between",),
            lambda c: (
                c.ignore_between == []
                or (len(c.ignore_between) == 2 and 0 <= c.ignore_between[0] < c.ignore_between[1] <= 1)
            ),
            "need [] (off) or [low, high] with 0 <= low < high <= 1",
        ),
    )

    split: str = "train"
    source: Literal["refined", "cams"] = "refined"
    preset: CrfPreset = "psa"
    bg_mode: Literal["power", "constant"] = "power"  # power: (1 - max)^alpha | constant: tau
    bg_alpha: Positive | None = None  # None: 4 for CAM-like maps (PSA), 1 for instance-guided maps (see stages/crf.py)
    bg_tau: Fraction = 0.25
    confidence: Fraction = 0.0  # marginals below this become 255 (ignore); 0 keeps every pixel
    # [low, high]: pixels whose source map's largest value lies strictly between become 255, which train-seg
    # ignores: neither confidently object nor background (IRN's split). [] keeps every pixel.
    ignore_between: list[float] = field(default_factory=list)
    workers: NonNegative | None = None  # None: every CPU this process may use (runtime/pool.py available_cpus)
    # pydensecrf (CPU processes) | torch (core/torch_crf.py, batched on the device) | auto: torch on a GPU
    backend: Literal["auto", "torch", "pydensecrf"] = "auto"
    batch_size: Count = 8  # images per torch CRF pass


@dataclass
class TrainSegConfig:
    NOT_IN_RESULTS: ClassVar[tuple[str, ...]] = ("workers", "val_split")  # val_split: only the logged val mIoU
    RULES: ClassVar[tuple[Rule, ...]] = (
        SCALE_ORDER,
        Rule(("batch_size",), lambda c: c.batch_size >= 2, "need >= 2: BatchNorm cannot train on one image"),
    )

    # models/segmenter.py ARCHS; the resnet18 ones are small, for CPUs
    arch: Literal["deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_resnet18", "deeplabv3plus_resnet18"] = (
        "deeplabv3_resnet101"
    )
    pretrained: str = "imagenet"  # imagenet | none | cls (this workspace's classifier backbone) | PATH (ResNet,
    #                               igcam classifier or segmenter weights)
    # pseudo: pseudo/<split> from crf | gt: GT masks (fully supervised UPPER BOUND)
    labels: Literal["pseudo", "gt"] = "pseudo"
    split: str = "train"
    val_split: str = "val"  # mIoU against GT after every epoch when it has masks; "" for none
    epochs: Count = 30  # ~30k iterations of batch 10 on VOC train_aug, as the anchors' DeepLab recipe
    min_steps: NonNegative = 0  # epochs rise until the run takes at least this many SGD steps (small datasets); 0: off
    batch_size: Count = 10
    crop: Crop = 512
    scale_min: Positive = 0.5  # random rescale of the image by s in [scale_min, scale_max] (times input_scale)
    scale_max: float = 2.0
    # Images are drawn this much larger for the segmenter: in training (the rescale range is multiplied by it),
    # in the per-epoch val mIoU, and in predict (its scales too; the checkpoint keeps it). For small images,
    # where output stride 16 leaves a coarse grid (8 x 8 on 128 px); `crop` is in the drawn pixels. It costs
    # 4x train-seg's compute. The synthetic preset sets 2 (crop 256) for images under 256 px: measured on all six
    # styles, see stages/init.py small_image_scale; 1.5 on textured gave no gain.
    input_scale: Positive = 1.0
    lr: Positive = 0.001  # backbone; the head gets lr * head_lr_mult
    head_lr_mult: NonNegativeFloat = 10.0
    momentum: Fraction = 0.9
    weight_decay: NonNegativeFloat = 1e-4
    # ce: mean cross-entropy over labelled pixels | balanced: the mean over background pixels and the mean over
    # object pixels weigh half each (the synthetic preset's default; measured there, see SYNTHETIC_DEFAULTS)
    loss: Literal["ce", "balanced"] = "ce"
    workers: NonNegative = 2


@dataclass
class PredictConfig:
    NOT_IN_RESULTS: ClassVar[tuple[str, ...]] = ("workers", "batch_size", "overlays", "crf_backend")

    split: str | None = None  # a dataset split ...
    images: str | None = None  # ... or a folder of JPEG/PNG files
    out: str | None = None  # pred/<out>/; default: the split's or the folder's name
    scales: Scales = field(default_factory=lambda: [1.0, 0.75, 1.25])
    flip: bool = True
    crf: bool = False
    preset: CrfPreset = "deeplab"
    overlays: bool = True  # pred/<name>/overlays/<id>.jpg
    batch_size: Count = 8
    workers: NonNegative | None = None  # None: every CPU this process may use (runtime/pool.py available_cpus)
    crf_backend: Literal["auto", "torch", "pydensecrf"] = "auto"  # as crf's backend
    max_side: NonNegative = MAX_SIDE  # as make-cams': larger images are predicted at this side, then upsampled
    # Drop from each image's prediction the classes the workspace's classifier scores below this probability
    # (None or 0: off). Only a classifier that learned early gates (stages/predict.py _gate_classifier). Off by
    # default: at 0.5 it helped on the `lookalike` style (val mIoU 29.6 -> 36.3) and cost on the five others
    # (textured 50.9 -> 49.3, scales 33.4 -> 29.8, heads 79.2 -> 77.9, clutter 53.3 -> 49.8, shapes 19.4 -> 15.5;
    # README, "Dropping the classes the classifier rejects").
    class_gate: Fraction | None = None


@dataclass
class ChainConfig:
    """`[run]`: what `igcam run` chains beyond the stages' own settings."""

    NOT_IN_RESULTS: ClassVar[tuple[str, ...]] = ()

    # 2: IG-CAM's influence round: train-cls, compute-influence on its split, train-cls --round 2 with the
    # influence weights and suggested labels, then make-cams onward from round 2
    rounds: Annotated[int, Range(1, 2)] = 1


@dataclass
class EvaluateConfig:
    NOT_IN_RESULTS: ClassVar[tuple[str, ...]] = ()
    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(("tau_min", "tau_max"), lambda c: c.tau_min <= c.tau_max, "need tau_min <= tau_max"),
    )

    artifact: Literal["cams", "refined", "crf", "seg"] = "cams"
    split: str = "train"
    tau_min: Fraction = 0.05
    tau_max: Fraction = 0.60
    tau_step: Positive = 0.01
    bg_tau: Fraction | None = None  # evaluate map artifacts at this fixed threshold instead of sweeping
    # Map artifacts are also scored at this fixed background threshold, beside the sweep's best (which is
    # tuned on the scored split). None: the artifact's FIXED_TAU below.
    fixed_tau: Fraction | None = None


# The field quotes CAMs at IRN's fixed 0.15. IG-CAM's refined maps keep their filled objects near 1 and
# their best threshold sits higher: 0.42, 0.53, 0.60, 0.54, 0.53, 0.50 on heads, textured, shapes,
# lookalike, scales and clutter (benchmarks/quality.py, 160 images each), so they are quoted at 0.50.
FIXED_TAU = {"cams": 0.15, "refined": 0.50}
FIXED_TAU_WALKED = 0.25  # refined maps of IRN's random walk (refine --method irn|both): IRN's sem_seg_bg_thres


# Defaults `init` writes for the embedded synthetic dataset: small images, no pretrained weights,
# a ResNet-18 that trains on two CPU cores in a few minutes.
SYNTHETIC_DEFAULTS: dict[str, dict[str, Any]] = {
    "train-cls": {
        # Chosen on the `heads` and `textured` styles (160 train images, benchmarks/quality.py's size), CAM
        # mIoU at the best threshold, heads: the old 12 epochs, scale 0.9-1.1, head lr x2 gave 35.6 (val mAP
        # 83); 15 epochs alone 36.5; no rescale alone 40.4; head lr x1 alone 40.3; all three 43.5 (val mAP
        # 98.5); textured: 31.0 -> 40.4 (val mAP 64 -> 88). At 128 px the 8 x 8 CAM grid moves with every
        # rescale, and the classifier learns the positions less well.
        "backbone": "resnet18",
        "pretrained": "none",
        "epochs": 15,
        "batch_size": 16,
        "crop": 128,  # init replaces it with the dataset's longest image side (stages/init.py whole_image_crop)
        "scale_min": 1.0,
        "scale_max": 1.0,
        "lr": 0.05,
        "head_lr_mult": 1.0,
        # from random weights: one epoch of warm-up (textured style, epoch-1 loss 0.83 -> 0.77, val mAP 31 -> 36)
        "warmup_epochs": 1,
        "momentum": 0.9,
        "freeze_bn": False,
        "frozen_stages": 0,
    },
    "make-cams": {"batch_size": 16},
    "train-irn": {
        # No ImageNet weights here: the boundary branch reads the workspace classifier's backbone. Whole
        # images at their own size, as the classifier saw them; 30 epochs of 320 images are 600 steps (IRN:
        # ~1000). NOT chosen by measurement across styles: measured only on the demo's `heads` style, where
        # the walk scores 35.7 against the CAMs' 42.6 (best tau; a frozen random backbone, 34.6), because the
        # net learns the CAM core's edge, not the object's (README, the ablation). Tune it on all six styles
        # before trusting the walk here.
        "pretrained": "cls",
        "crop": 128,  # init replaces it with the dataset's longest image side, as for train-cls
        "scale_min": 1.0,
        "scale_max": 1.0,
        "epochs": 30,
        "batch_size": 16,
    },
    # The segmenter learns only from pixels the refined maps are sure of, either way. Val mIoU of the segmenter
    # (240 steps; one scale, flips, no CRF), 160 train images, band off / [0.15, 0.45]: heads 64.6 / 68.4,
    # textured 39.2 / 45.1 ([0.25, 0.6]: 43.0), scales 30.7 / 32.1. About a fifth of the pixels are ignored, mostly
    # background-labelled ones, so the pseudo-labels' own mIoU (255 scored as background) moves by < 1 point.
    # Checked on all six styles (benchmarks/quality.py, seg val with predict's CRF, previous table -> band):
    # heads 70.1 -> 78.5, textured 38.9 -> 48.4, scales 31.9 -> 37.9, clutter 36.1 -> 47.1, lookalike
    # 25.2 -> 30.8, shapes 15.1 -> 18.2 (README, "Quality across synthetic styles").
    "crf": {"ignore_between": [0.15, 0.45]},
    "train-seg": {
        # DeepLabV3+ (stride-4 decoder): at 128 px the plain DeepLabV3's 8 x 8 grid gives blobs
        # (synthetic val mIoU 49 % vs 65 % after 6 epochs on the same pseudo-labels).
        "arch": "deeplabv3plus_resnet18",
        "pretrained": "cls",  # the workspace's classifier backbone: trained on the same image-level labels
        # 24 epochs, not fewer on larger sets: textured style, val mIoU (one scale, flips, no CRF), 320 train images:
        # 12 epochs 44.9, 24 epochs 49.4; 160 images: 24 epochs 38.4, 48 epochs 38.5 (the same pseudo-labels each)
        "epochs": 24,
        # Small datasets take more epochs: at 160 images x batch 16, 8 epochs are 80 SGD steps and the model does
        # not fit its own pseudo-labels. 240 steps (24 epochs at 160 images, 12 at the demo's 320), val mIoU %
        # (predict at scales 1, 0.75, 1.25 + CRF), 80 -> 240 steps: heads 68.5 -> 69.8, textured 32.2 -> 35.8,
        # scales 23.2 -> 31.7, lookalike 22.0 -> 21.8 (benchmarks/quality.py's workspaces, same pseudo-labels);
        # clutter 36.1 at 240 steps (no 80-step run on the same pseudo-labels); shapes not measured. With 24
        # epochs this only acts below 160 images
        "min_steps": 240,
        "batch_size": 16,
        "crop": 128,
        "scale_min": 0.75,
        "scale_max": 1.25,
        "lr": 0.05,
        "head_lr_mult": 1.0,
        # Background and object pixels weigh half each: on 160 images the plain mean lets the background's pixels
        # outvote the objects', and the segmenter calls half of an unseen object background. Seg val mIoU % (one
        # scale, flips, predict's CRF; one run each on benchmarks/quality.py's workspaces, the same pseudo-labels),
        # ce -> balanced: textured 48.8 -> 57.2, lookalike 40.9 -> 46.1, scales 48.6 -> 57.0, clutter
        # 49.9 -> 51.8, shapes 17.2 -> 18.4, heads 81.3 -> 78.2 (its flat bodies gain nothing from the push)
        "loss": "balanced",
    },
    # Single scale with flips: the 0.75 scale of a 128 px image leaves the stride-16 model a 6 x 6 grid. Val mIoU %
    # (240-step segmenters, flip + CRF) scales 1 / 1, 0.75, 1.25: heads 70.1 / 69.8, textured 38.9 / 35.8, clutter
    # 36.1 / 34.2, lookalike 25.2 / 21.8. The CRF (one scale, flips): heads +4.2, textured -1.0, clutter -0.3,
    # lookalike -0.2; kept for its gain on clean-bodied objects.
    # IRN's CRF (on the arg-max labels, gt_prob 0.7; bilateral 50 px / 5 levels), not DeepLab's (softmax, 67 / 3):
    # with the balanced loss at x2, seg val mIoU % deeplab / toco / irn / psa on the quality table's workspaces
    # (one model each, 2026-12-08): heads 78.2 / 81.2 / 84.2 / 88.5, textured 57.2 / 58.1 / 58.5 / 58.2, lookalike
    # 46.1 / 47.4 / 47.1 / 46.7, scales 57.0 / 57.8 / 57.9 / 57.9, clutter 51.8 / 51.8 / 51.7 / 51.7, shapes
    # 18.4 / 18.4 / 18.1 / 18.0. psa has the best mean but lost 2.6 on a second `textured` model (object share
    # 0.35: 57.0 / 58.8 / 58.9 / 54.4); irn was never more than 0.3 below deeplab on the seven models
    "predict": {"batch_size": 16, "crf": True, "scales": [1.0], "preset": "irn"},
}


def build(config_cls: type, toml_table: dict[str, Any] | None, overrides: dict[str, Any], table: str | None = None):
    """Dataclass from defaults < toml table < CLI overrides (None means 'not given'), every value
    checked against its field's declaration (validation.py): a bad one is a UsageError naming
    the table (`table`: the stage's name) and key, or the option, it came from."""
    names = {f.name for f in fields(config_cls)}
    table = table or config_cls.__name__
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    for key, value in (toml_table or {}).items():
        key = key.replace("-", "_")
        if key not in names:
            raise UsageError(f"{TOML_NAME} [{table}]: unknown option '{key}' (options: {', '.join(sorted(names))})")
        values[key], source[key] = value, f"{TOML_NAME} [{table}] {key}"
    for key, value in overrides.items():
        if value is not None:
            values[key], source[key] = value, f"--{key.replace('_', '-')}"
    config = config_cls(**values)
    check(config, lambda name: source.get(name, f"[{table}] {name} (default)"))
    return config


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def result_settings(config: Any) -> list[str]:
    """The settings of `config` that change its stage's results: every field but its class's NOT_IN_RESULTS
    and those its `idle_settings()` (where a config has one) says have no effect with its other values."""
    idle = set(config.idle_settings()) if hasattr(config, "idle_settings") else set()
    return [f.name for f in fields(config) if f.name not in config.NOT_IN_RESULTS and f.name not in idle]


def changed_settings(config: Any, recorded: dict[str, Any]) -> list[str]:
    """The result settings of `config` that differ from a run's recorded config (a setting the record
    predates counts as its default). The one answer to "were the settings changed", for a resume,
    `igcam run`'s staleness, a finished training run and whether two map-stage runs agree."""
    default = type(config)()
    return sorted(k for k in result_settings(config) if recorded.get(k, getattr(default, k)) != getattr(config, k))


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise BadData(f"{path} is not valid TOML: {exc}") from None


def write_toml(path: Path, data: dict[str, Any]) -> None:
    write_text_atomically(path, tomli_w.dumps(_drop_none(data)))


def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value
