"""The embedded synthetic dataset: generated on the fly from a seed, no files.

Why it looks the way it does
----------------------------
Plain class activation maps (CAMs) cover only the most *discriminative* part of an
object, and the whole point of IG-CAM's later stages (region proposals, affinity
propagation, dense CRF) is to grow them to the full extent. A toy dataset where a
classifier must look at the whole object would give complete CAMs and leave those
stages nothing to do. So every object here is built to be *partly* discriminative:

* a large **body** -- a superellipse blob with a wobbly outline, random size, aspect
  and orientation -- whose appearance (a moderately saturated, near-uniform colour
  with gentle shading) is drawn from ONE distribution shared by all classes. A body
  alone says nothing about its class;
* a small **head** (about a fifth of the object) attached to the body's edge, whose
  appearance is class-specific: its own vivid colour pair and its own pattern
  (stripes at a class-specific angle and period, dots, checker, rings, outline...).

A classifier learns the heads, so its CAM covers mostly the head, while the ground
truth is the whole object (body + head). The background is duller and busier
(low-frequency coloured noise, grain and small clutter shapes, some of them in body
colours but never in head colours or patterns), so colour/texture segmentation can
usually -- not always -- separate a body from the background: that is the cue the
refinement stages can exploit to complete the CAMs.

Determinism: image ``i`` of split ``s`` comes from ``np.random.default_rng([seed, s, i])``
(spawned into a layout stream and a paint stream), so an id always has the same pixels
whatever the generation order, and `labels()` needs only the (cheap) layout.
Generation is vectorised numpy over small windows: a few milliseconds per 128 px image.
"""

from __future__ import annotations

import colorsys
import csv
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from igcam_cli.data.base import Dataset, Sample
from igcam_cli.errors import BadData, UsageError

CLASS_NAMES: tuple[str, ...] = (
    "ambra",
    "brio",
    "cobal",
    "dune",
    "ember",
    "fjord",
    "gala",
    "hazel",
    "indo",
    "jade",
)
SPLITS: tuple[str, ...] = ("train", "val")


# --------------------------------------------------------------------------- head styles


@dataclass(frozen=True)
class HeadStyle:
    """Class-specific head appearance: `color` everywhere, `accent` where the pattern is on."""

    color: tuple[int, int, int]
    accent: tuple[int, int, int]
    pattern: str  # "stripes" | "dots" | "checker" | "outline" | "rings" | "grid"
    period: float  # pattern period in pixels (outline: its width)
    angle: float  # pattern orientation in degrees (image frame)


HEAD_STYLES: tuple[HeadStyle, ...] = (
    HeadStyle((245, 175, 20), (70, 35, 10), "stripes", 6.0, 0.0),  # ambra: amber, dark vertical bands
    HeadStyle((225, 40, 170), (250, 250, 250), "dots", 6.0, 0.0),  # brio: magenta, white dots
    HeadStyle((30, 70, 225), (240, 240, 240), "checker", 3.0, 0.0),  # cobal: cobalt/white checker
    HeadStyle((215, 25, 25), (15, 15, 15), "outline", 2.5, 0.0),  # dune: solid red, black rim
    HeadStyle((40, 195, 60), (10, 40, 10), "stripes", 5.0, 90.0),  # ember: green, dark horizontal bars
    HeadStyle((20, 205, 215), (10, 20, 80), "rings", 5.0, 0.0),  # fjord: cyan, navy rings
    HeadStyle((140, 50, 215), (240, 230, 60), "stripes", 7.0, 45.0),  # gala: violet, yellow diagonals
    HeadStyle((245, 245, 240), (20, 20, 20), "grid", 5.0, 0.0),  # hazel: white, black grid
    HeadStyle((255, 150, 190), (0, 90, 90), "checker", 4.0, 45.0),  # indo: pink, teal diamonds
    HeadStyle((25, 25, 25), (170, 240, 40), "dots", 5.0, 30.0),  # jade: black, lime dots
)


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Body:
    cx: float
    cy: float
    a: float  # semi-axis along theta, pixels
    b: float  # semi-axis across theta
    theta: float
    power: float  # superellipse exponent: 2 = ellipse, larger = boxier
    wobble: tuple[tuple[float, float], ...]  # (amplitude, phase) of outline harmonics 2, 3, 4


@dataclass(frozen=True)
class _Head:
    cx: float
    cy: float
    a: float
    b: float
    theta: float


@dataclass(frozen=True)
class _Object:
    cls: int  # 1..C
    body: _Body
    head: _Head


@dataclass
class _Scene:
    """One generated image with everything a test may want to measure."""

    image: np.ndarray  # H x W x 3 uint8
    mask: np.ndarray  # H x W uint8, 0 background, k class k
    owner: np.ndarray  # H x W int8, -1 background, j = index of the visible object
    head: np.ndarray  # H x W bool, visible head pixels
    classes: list[int]  # class of object j
    labels: np.ndarray  # sorted int64 classes present


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), float32, size x size."""
    c = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(c, c, indexing="ij")


def _window(cx: float, cy: float, radius: float, size: int) -> tuple[slice, slice]:
    y0, y1 = max(0, int(cy - radius)), min(size, int(cy + radius) + 2)
    x0, x1 = max(0, int(cx - radius)), min(size, int(cx + radius) + 2)
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def _local_frame(yy: np.ndarray, xx: np.ndarray, cx: float, cy: float, theta: float) -> tuple[np.ndarray, np.ndarray]:
    dx, dy = xx - cx, yy - cy
    c, s = math.cos(theta), math.sin(theta)
    return c * dx + s * dy, -s * dx + c * dy


def _body_extent(body: _Body) -> float:
    return max(body.a, body.b) * math.sqrt(2.0) * (1.0 + sum(amp for amp, _ in body.wobble)) + 1.0


def _body_mask(body: _Body, size: int) -> np.ndarray:
    """Superellipse with a wobbly outline, rasterised on a size x size grid."""
    out = np.zeros((size, size), dtype=bool)
    sy, sx = _window(body.cx, body.cy, _body_extent(body), size)
    yy, xx = _grid(size)
    u, v = _local_frame(yy[sy, sx], xx[sy, sx], body.cx, body.cy, body.theta)
    u, v = u / body.a, v / body.b
    radius = (np.abs(u) ** body.power + np.abs(v) ** body.power) ** (1.0 / body.power)
    out[sy, sx] = radius <= _wobble(body, np.arctan2(v, u))
    return out


def _wobble(body: _Body, phi: np.ndarray | float) -> np.ndarray | float:
    w: np.ndarray | float = 1.0
    for k, (amp, phase) in enumerate(body.wobble, start=2):
        w = w + amp * np.cos(k * phi + phase)
    return w


def _body_edge_point(body: _Body, phi: float) -> tuple[float, float]:
    """Image coordinates of the body outline in local direction `phi` (normalised frame)."""
    cu, su = math.cos(phi), math.sin(phi)
    norm = (abs(cu) ** body.power + abs(su) ** body.power) ** (1.0 / body.power)
    r = float(_wobble(body, phi)) / norm
    lx, ly = r * cu * body.a, r * su * body.b
    c, s = math.cos(body.theta), math.sin(body.theta)
    return body.cx + c * lx - s * ly, body.cy + s * lx + c * ly


def _head_local(head: _Head, size: int) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    sy, sx = _window(head.cx, head.cy, max(head.a, head.b) + 1.0, size)
    yy, xx = _grid(size)
    u, v = _local_frame(yy[sy, sx], xx[sy, sx], head.cx, head.cy, head.theta)
    return (sy, sx), u, v


def _head_mask(head: _Head, size: int, shrink: float = 0.0) -> np.ndarray:
    """Ellipse; `shrink` pixels taken off both semi-axes (used for the outline pattern)."""
    out = np.zeros((size, size), dtype=bool)
    (sy, sx), u, v = _head_local(head, size)
    a, b = max(head.a - shrink, 0.5), max(head.b - shrink, 0.5)
    out[sy, sx] = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    return out


# --------------------------------------------------------------------------- layout


_PLACEMENT_TRIES = 60

# `igcam synth` leaves this in the folder it writes; `igcam init --preset auto` picks the synthetic settings for it.
SYNTH_MARKER = "igcam-synth.json"


def _sample_body(
    rng: np.random.Generator,
    size: int,
    scale: float,
    semi_range: tuple[float, float] = (0.10, 0.225),
    centre_range: tuple[float, float] = (0.18, 0.82),
) -> _Body:
    """Semi-axis and centre ranges are fractions of the image side (data/styles.py widens them)."""
    semi = rng.uniform(*semi_range) * size * scale
    return _Body(
        cx=rng.uniform(*centre_range) * size,
        cy=rng.uniform(*centre_range) * size,
        a=semi,
        b=semi * rng.uniform(0.55, 1.0),
        theta=rng.uniform(0.0, math.pi),
        power=rng.uniform(2.0, 4.0),
        wobble=tuple((rng.uniform(0.0, 0.06), rng.uniform(0.0, 2 * math.pi)) for _ in range(3)),
    )


def _sample_head(rng: np.random.Generator, body: _Body, body_area: int) -> _Head:
    """An ellipse with ~20-30 % of the body's area, centred just outside the body's edge."""
    area = rng.uniform(0.20, 0.32) * body_area
    aspect = rng.uniform(0.7, 1.0)
    a = math.sqrt(area / (math.pi * aspect))
    ex, ey = _body_edge_point(body, rng.uniform(0.0, 2 * math.pi))
    dx, dy = ex - body.cx, ey - body.cy
    d = math.hypot(dx, dy) or 1.0
    push = rng.uniform(0.05, 0.45) * a
    return _Head(ex + dx / d * push, ey + dy / d * push, a, a * aspect, rng.uniform(0.0, math.pi))


def _object_classes(rng: np.random.Generator, num_classes: int, max_objects: int) -> list[int]:
    """Classes of the objects in drawing order: 1..max_objects objects, 1..3 distinct classes."""
    n_obj = int(rng.integers(1, max_objects + 1))
    n_cls = int(rng.integers(1, min(3, num_classes, n_obj) + 1))
    distinct = [int(c) + 1 for c in rng.choice(num_classes, n_cls, replace=False)]
    extra = [int(c) for c in rng.choice(distinct, n_obj - n_cls)]
    return distinct + extra


@dataclass
class _Layout:
    objects: list[_Object]
    owner: np.ndarray  # int8, -1 background
    head: np.ndarray  # bool, visible head pixels


def _acceptable(
    owner: np.ndarray,
    head: np.ndarray,
    new_obj: np.ndarray,
    new_head: np.ndarray,
    new_head_area: float,
    own_areas: list[tuple[int, int]],
    allow_overlap: bool,
) -> bool:
    """Placement rules: the new head lies mostly (70 %) inside the image; earlier objects keep at
    least 60 % of their pixels and of their head; any overlap only in images that allow it."""
    if new_head.sum() < 0.7 * new_head_area:
        return False
    covered = owner[new_obj]
    if not allow_overlap and (covered >= 0).any():
        return False
    for j, (area, head_area) in enumerate(own_areas):
        lost = int((covered == j).sum())
        if lost == 0:
            continue
        visible = int((owner == j).sum()) - lost
        head_left = int((head & (owner == j) & ~new_obj).sum())
        if visible < 0.6 * area or head_left < 0.6 * head_area:
            return False
    return True


def _layout(rng: np.random.Generator, size: int, num_classes: int, max_objects: int) -> _Layout:
    """Place objects one by one (later ones on top); re-draw any placement that breaks the rules,
    shrinking objects in crowded images; an object that still does not fit is left out."""
    owner = np.full((size, size), -1, dtype=np.int8)
    head = np.zeros((size, size), dtype=bool)
    objects: list[_Object] = []
    own_areas: list[tuple[int, int]] = []
    allow_overlap = bool(rng.random() < 0.4)
    for cls in _object_classes(rng, num_classes, max_objects):
        for attempt in range(_PLACEMENT_TRIES):
            scale = 0.88 ** (attempt // 12)  # crowded image: try smaller objects
            body = _sample_body(rng, size, scale)
            body_px = _body_mask(body, size)
            body_area = int(body_px.sum())
            if body_area < 0.02 * size * size * scale**2:  # mostly outside the image
                continue
            hd = _sample_head(rng, body, body_area)
            head_px = _head_mask(hd, size)
            obj_px = body_px | head_px
            if not _acceptable(owner, head, obj_px, head_px, math.pi * hd.a * hd.b, own_areas, allow_overlap):
                continue
            j = len(objects)
            owner[obj_px] = j
            head[obj_px] = head_px[obj_px]
            objects.append(_Object(cls, body, hd))
            own_areas.append((int(obj_px.sum()), int(head_px.sum())))
            break
    return _Layout(objects, owner, head)


def _class_mask(layout: _Layout) -> np.ndarray:
    lut = np.zeros(len(layout.objects) + 1, dtype=np.uint8)
    lut[1:] = [o.cls for o in layout.objects]
    return lut[layout.owner.astype(np.int64) + 1]


# --------------------------------------------------------------------------- painting


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


@functools.lru_cache(maxsize=16)
def _interp_matrix(g: int, size: int) -> np.ndarray:
    """size x g matrix of bilinear weights from g grid nodes (spanning the image) to pixel centres."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * (g - 1)
    i0 = np.minimum(t.astype(np.int64), g - 2)
    w = np.zeros((size, g), dtype=np.float32)
    w[np.arange(size), i0] = 1.0 - (t - i0)
    w[np.arange(size), i0 + 1] = t - i0
    return w


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a g x g x c grid to size x size x c."""
    w = _interp_matrix(grid.shape[0], size)
    return np.einsum("yi,ijc,xj->yxc", w, grid.astype(np.float32), w, optimize=True)


def _noise(rng: np.random.Generator, sigma: float, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)


def _paint_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Dull base colour + low-frequency coloured noise + mid-frequency shading + grain."""
    base = _hsv(rng.random(), rng.uniform(0.04, 0.22), rng.uniform(0.35, 0.65))
    img = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    img = img + _upsample(_noise(rng, 13.0, (4, 4, 3)), size)
    img = img + _upsample(_noise(rng, 14.0, (12, 12, 1)), size)
    img = img + _upsample(_noise(rng, 8.0, (32, 32, 1)), size)
    img = img + _noise(rng, 9.0, (size, size, 1))
    return img


def _clutter_colour(rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.3:  # shares the body colour distribution: segmentation is not trivial
        return _body_colour(rng)
    return _hsv(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.2, 0.85))


def _paint_clutter(rng: np.random.Generator, img: np.ndarray) -> None:
    """Small discs, boxes and bars scattered over the background (objects are painted later)."""
    size = img.shape[0]
    yy, xx = _grid(size)
    for _ in range(int(rng.integers(12, 25))):
        cx, cy = rng.uniform(0, size, 2)
        kind = rng.integers(3)
        r = rng.uniform(2.0, 6.5) if kind < 2 else rng.uniform(4.0, 10.0)
        sy, sx = _window(cx, cy, r + 1.0, size)
        u, v = _local_frame(yy[sy, sx], xx[sy, sx], cx, cy, rng.uniform(0, math.pi))
        if kind == 0:
            shape = u**2 + v**2 <= r * r
        elif kind == 1:
            shape = (np.abs(u) <= r) & (np.abs(v) <= r * rng.uniform(0.4, 1.0))
        else:
            shape = (np.abs(u) <= r) & (np.abs(v) <= rng.uniform(0.7, 1.4))
        img[sy, sx][shape] = _clutter_colour(rng)


def _body_colour(rng: np.random.Generator) -> np.ndarray:
    """The ONE body colour distribution, shared by every class."""
    return _hsv(rng.random(), rng.uniform(0.35, 0.65), rng.uniform(0.5, 0.85))


def _head_pattern(style: HeadStyle, head: _Head, size: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean map (size x size) of where the head shows its accent colour."""
    yy, xx = _grid(size)
    t = math.radians(style.angle)
    # pattern coordinates in the image frame at the class angle, with a random phase
    u = math.cos(t) * xx + math.sin(t) * yy + rng.uniform(0, style.period)
    v = -math.sin(t) * xx + math.cos(t) * yy + rng.uniform(0, style.period)
    p = style.period
    if style.pattern == "stripes":
        return (u % p) < 0.5 * p
    if style.pattern == "dots":
        du, dv = (u % p) - 0.5 * p, (v % p) - 0.5 * p
        return du * du + dv * dv <= (0.3 * p) ** 2
    if style.pattern == "checker":
        return (np.floor(u / p) + np.floor(v / p)) % 2 == 0
    if style.pattern == "grid":
        return ((u % p) < 1.3) | ((v % p) < 1.3)
    if style.pattern == "rings":
        return (np.hypot(xx - head.cx, yy - head.cy) % p) < 0.5 * p
    if style.pattern == "outline":
        return ~_head_mask(head, size, shrink=p)
    raise ValueError(f"unknown head pattern {style.pattern!r}")


def _paint_objects(rng: np.random.Generator, img: np.ndarray, layout: _Layout) -> None:
    size = img.shape[0]
    shade = 1.0 + _upsample(_noise(rng, 0.07, (6, 6, 1)), size)
    for j, obj in enumerate(layout.objects):
        mine = layout.owner == j
        body_px = mine & ~layout.head
        img[body_px] = (_body_colour(rng) * shade[body_px]).astype(np.float32)
        style = HEAD_STYLES[obj.cls - 1]
        head_px = mine & layout.head
        accent = _head_pattern(style, obj.head, size, rng)
        colours = np.where(
            accent[head_px][:, None], np.asarray(style.accent, np.float32), np.asarray(style.color, np.float32)
        )
        img[head_px] = colours


def _finish(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Slight [1 2 1] blur (soft edges, like a camera), Gaussian noise, uint8."""
    pad = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    img = 0.25 * pad[:-2, 1:-1] + 0.5 * pad[1:-1, 1:-1] + 0.25 * pad[2:, 1:-1]
    pad = np.pad(img, ((0, 0), (1, 1), (0, 0)), mode="edge")
    img = 0.25 * pad[:, :-2] + 0.5 * pad[:, 1:-1] + 0.25 * pad[:, 2:]
    img = img + _noise(rng, 3.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- generation


def _streams(
    seed: int, split_index: int, index: int, style: str = "heads"
) -> tuple[np.random.Generator, np.random.Generator]:
    """Layout and paint generators of one image, from `default_rng([seed, split_index, index])`
    (other styles than heads append their index, so that each style has its own scenes)."""
    from igcam_cli.data.styles import STYLES

    key = [seed, split_index, index] + ([STYLES.index(style)] if style != "heads" else [])
    layout_rng, paint_rng = np.random.default_rng(key).spawn(2)
    return layout_rng, paint_rng


def _make_layout(seed: int, split_index: int, index: int, size: int, num_classes: int, max_objects: int) -> _Layout:
    layout_rng, _ = _streams(seed, split_index, index)
    return _layout(layout_rng, size, num_classes, max_objects)


def _render(
    seed: int,
    split_index: int,
    index: int,
    size: int = 128,
    num_classes: int = 5,
    max_objects: int = 3,
    style: str = "heads",
) -> _Scene:
    """Generate one image with its GT mask and its per-object / head bookkeeping."""
    if style != "heads":
        return _render_styled(seed, split_index, index, size, num_classes, max_objects, style)
    layout_rng, paint_rng = _streams(seed, split_index, index)
    layout = _layout(layout_rng, size, num_classes, max_objects)
    img = _paint_background(paint_rng, size)
    _paint_clutter(paint_rng, img)
    _paint_objects(paint_rng, img, layout)
    mask = _class_mask(layout)
    return _Scene(
        image=_finish(paint_rng, img),
        mask=mask,
        owner=layout.owner,
        head=layout.head,
        classes=[o.cls for o in layout.objects],
        labels=_labels_of(mask),
    )


def _render_styled(
    seed: int, split_index: int, index: int, size: int, num_classes: int, max_objects: int, style: str
) -> _Scene:
    from igcam_cli.data import styles

    spec = styles.STYLE_SPECS[style]
    layout_rng, paint_rng = _streams(seed, split_index, index, style)
    lay = styles.layout(spec, layout_rng, size, num_classes, max_objects)
    mask = styles.class_mask(lay)
    img = styles.paint(spec, paint_rng, lay, size)
    return _Scene(
        image=_finish(paint_rng, img),
        mask=mask,
        owner=lay.owner,
        head=lay.head,
        classes=lay.classes,
        labels=_labels_of(mask),
    )


def _layout_mask(
    seed: int, split_index: int, index: int, size: int, num_classes: int, max_objects: int, style: str
) -> np.ndarray:
    """The GT mask from the layout stream alone (no painting)."""
    if style == "heads":
        return _class_mask(_make_layout(seed, split_index, index, size, num_classes, max_objects))
    from igcam_cli.data import styles

    layout_rng, _ = _streams(seed, split_index, index, style)
    return styles.class_mask(styles.layout(styles.STYLE_SPECS[style], layout_rng, size, num_classes, max_objects))


def _labels_of(mask: np.ndarray) -> np.ndarray:
    values = np.unique(mask)
    return values[(values > 0) & (values != 255)].astype(np.int64)


# --------------------------------------------------------------------------- dataset


class SyntheticDataset(Dataset):
    """Heads-and-bodies toy dataset (see the module docstring), splits `train` and `val`; `style`
    picks the demo's look (`heads`) or one of the harder ones in data/styles.py."""

    name = "synthetic"

    def __init__(
        self,
        n_train: int = 320,
        n_val: int = 80,
        size: int = 128,
        seed: int = 0,
        num_classes: int = 5,
        max_objects: int = 3,
        style: str = "heads",
        label_noise: float = 0.0,
        noise_kind: str = "swap",
    ):
        from igcam_cli.data.styles import STYLES

        if style not in STYLES:
            raise UsageError(f"synthetic dataset: unknown style '{style}' (choose from {', '.join(STYLES)})")
        if not 1 <= num_classes <= len(CLASS_NAMES):
            raise UsageError(f"synthetic dataset: num_classes must be in 1..{len(CLASS_NAMES)}, got {num_classes}")
        if size < 32:
            raise UsageError(f"synthetic dataset: size must be at least 32, got {size}")
        if max_objects < 1:
            raise UsageError(f"synthetic dataset: max_objects must be at least 1, got {max_objects}")
        if n_train < 0 or n_val < 0:
            raise UsageError("synthetic dataset: n_train and n_val must not be negative")
        self.counts = {"train": int(n_train), "val": int(n_val)}
        self.size = int(size)
        self.seed = int(seed)
        self.max_objects = int(max_objects)
        self.style = style
        self.classes = list(CLASS_NAMES[:num_classes])
        self._labels: dict[str, np.ndarray] = {}
        from igcam_cli.data.noise import NOISE_KINDS

        if not 0 <= label_noise <= 1:
            raise UsageError(f"synthetic dataset: label_noise must be in [0, 1], got {label_noise}")
        if noise_kind not in NOISE_KINDS:
            raise UsageError(f"synthetic dataset: unknown noise_kind '{noise_kind}' (one of {', '.join(NOISE_KINDS)})")
        self.label_noise, self.noise_kind = float(label_noise), noise_kind
        self._noisy: dict[str, np.ndarray] | None = None

    def splits(self) -> list[str]:
        return list(SPLITS)

    def image_size(self, image_id: str) -> tuple[int, int]:
        self._parse(image_id)  # BadData for an id outside the dataset
        return self.size, self.size

    def ids(self, split: str) -> list[str]:
        if split not in self.counts:
            raise BadData(f"synthetic dataset has no split {split!r} (it has {', '.join(SPLITS)})")
        return [f"{split}_{i:05d}" for i in range(self.counts[split])]

    def _parse(self, image_id: str) -> tuple[int, int]:
        split, _, number = image_id.rpartition("_")
        if split in self.counts and number.isdigit() and int(number) < self.counts[split]:
            return SPLITS.index(split), int(number)
        raise BadData(f"synthetic dataset has no image {image_id!r}")

    def labels(self, image_id: str) -> np.ndarray:
        noisy = self._noisy_labels().get(image_id)
        return noisy.copy() if noisy is not None else self.true_labels(image_id)

    def true_labels(self, image_id: str) -> np.ndarray:
        """The classes in the image's mask (`labels` differ from them on the images `label_noise` corrupted)."""
        if image_id not in self._labels:
            split_index, index = self._parse(image_id)
            self._labels[image_id] = _labels_of(
                _layout_mask(self.seed, split_index, index, self.size, self.num_classes, self.max_objects, self.style)
            )
        return self._labels[image_id].copy()

    def _noisy_labels(self) -> dict[str, np.ndarray]:
        """The train images whose labels `label_noise` corrupts (data/noise.py; seeded by the dataset's seed)."""
        if self._noisy is None:
            self._noisy = {}
            if self.label_noise > 0:
                from igcam_cli.data.noise import corrupt_labels

                train = {i: self.true_labels(i) for i in self.ids("train")}
                self._noisy = corrupt_labels(train, self.num_classes, self.label_noise, self.seed, self.noise_kind)
        return self._noisy

    def known_mislabelled(self) -> set[str] | None:
        return set(self._noisy_labels()) if self.label_noise > 0 else None

    def load(self, image_id: str, with_mask: bool = True) -> Sample:
        split_index, index = self._parse(image_id)
        scene = _render(self.seed, split_index, index, self.size, self.num_classes, self.max_objects, self.style)
        self._labels.setdefault(image_id, scene.labels)
        return Sample(image_id, scene.image, self.labels(image_id), scene.mask if with_mask else None)

    def has_masks(self, split: str) -> bool:
        return split in self.counts

    @property
    def gt_source(self) -> str:
        return "synthetic"


# --------------------------------------------------------------------------- folder export


def _voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 RGB entries, flattened)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def write_folder(dataset: Dataset, out: Path) -> None:
    """Write any dataset in the `folder` layout: images/, masks/, labels.csv, classes.txt, splits/."""
    from PIL import Image

    out = Path(out)
    for sub in ("images", "masks", "splits"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    palette = _voc_palette()
    rows: list[tuple[str, str]] = []
    for split in dataset.splits():
        ids = dataset.ids(split)
        with_mask = dataset.has_masks(split)
        for image_id in ids:
            sample = dataset.load(image_id, with_mask=with_mask)
            Image.fromarray(sample.image).save(out / "images" / f"{image_id}.png")
            if sample.mask is not None:
                mask = Image.fromarray(sample.mask)  # mode L; putpalette turns it into P
                mask.putpalette(palette)
                mask.save(out / "masks" / f"{image_id}.png")
            rows.append((image_id, " ".join(dataset.classes[k - 1] for k in sample.labels)))
        (out / "splits" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(("id", "labels"))
        writer.writerows(rows)
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in dataset.classes))
