"""The harder synthetic styles: real textures, shape classes, look-alike classes, many sizes, clutter.

The demo's style (`heads`, data/synthetic.py) paints flat-colour bodies on a blurry noise
background: exactly the case where a region proposal fills a body from its head. These styles
take that crutch away, one difficulty at a time, so that no default is tuned on one kind of image:

| style | what tells the classes apart | what makes it hard |
|---|---|---|
| `textured` | the class-specific head (as `heads`) | bodies and background are crops of real photos and textures |
| `shapes` | the object's outline (star, cross, ring, ...) | no head, no class colour: every object is filled from one texture pool |
| `lookalike` | heads in pairs that share colours and pattern, differing in angle or period | classes are confused with their twin |
| `scales` | the head | objects from tiny to large, up to six per image, often several of one class |
| `clutter` | the head | texture clutter that looks like bodies, and occluders that cut objects apart |

The textures are the sample images that scikit-image ships (brick, grass, gravel, the camera man,
the cat, coffee, the rocket, ...): real photographic statistics, no download. Grey ones are tinted.
Like `heads`, image `i` of split `s` comes from `default_rng([seed, s, i])`: a layout stream (object
geometry, occluders: all a mask needs) and a paint stream, so `labels()` never paints.
"""  # noqa: E501 (a markdown table's rows cannot wrap)

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from igcam_cli.data import synthetic as syn

STYLES: tuple[str, ...] = ("heads", "textured", "shapes", "lookalike", "scales", "clutter")

_TEXTURE_FILES = (
    "brick.png",
    "grass.png",
    "gravel.png",
    "camera.png",
    "moon.png",
    "coins.png",
    "page.png",
    "text.png",
    "cell.png",
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "ihc.png",
    "retina.jpg",
    "motorcycle_left.png",
)
# object bodies and clutter come from the strongly textured sources only; backgrounds from the
# whole pool, photographs included
_OBJECT_TEXTURES = tuple(
    _TEXTURE_FILES.index(name)
    for name in (
        "brick.png",
        "grass.png",
        "gravel.png",
        "coins.png",
        "page.png",
        "text.png",
        "cell.png",
        "hubble_deep_field.jpg",
        "ihc.png",
        "retina.jpg",
    )
)
_TEXTURE_SIDE = 256  # each source resized so that its short side is this many pixels


@dataclass(frozen=True)
class Style:
    cue: str  # head | shape: what carries the class
    semi: tuple[float, float] = (0.10, 0.225)  # body semi-axis range, fraction of the image side
    max_objects: int = 3  # per image, at least this many when the dataset's max_objects is smaller
    lookalike: bool = False  # head styles come in twin pairs
    clutter: int = 0  # extra texture patches that look like bodies
    occluders: int = 0  # background-texture bars drawn over the objects (up to this many)


STYLE_SPECS: dict[str, Style] = {
    "textured": Style("head"),
    "shapes": Style("shape", semi=(0.14, 0.26)),
    "lookalike": Style("head", lookalike=True),
    "scales": Style("head", semi=(0.05, 0.30), max_objects=6),
    "clutter": Style("head", clutter=6, occluders=3),
}

# Twins share head colours and pattern kind; the second of each pair differs in angle or period.
_LOOKALIKE_HEADS: tuple[syn.HeadStyle, ...] = (
    syn.HeadStyle((245, 175, 20), (70, 35, 10), "stripes", 6.0, 0.0),
    syn.HeadStyle((245, 175, 20), (70, 35, 10), "stripes", 6.0, 35.0),
    syn.HeadStyle((225, 40, 170), (250, 250, 250), "dots", 6.0, 0.0),
    syn.HeadStyle((225, 40, 170), (250, 250, 250), "dots", 4.0, 0.0),
    syn.HeadStyle((30, 70, 225), (240, 240, 240), "checker", 3.0, 0.0),
    syn.HeadStyle((30, 70, 225), (240, 240, 240), "checker", 3.0, 45.0),
    syn.HeadStyle((40, 195, 60), (10, 40, 10), "stripes", 5.0, 90.0),
    syn.HeadStyle((40, 195, 60), (10, 40, 10), "grid", 5.0, 0.0),
    syn.HeadStyle((20, 205, 215), (10, 20, 80), "rings", 5.0, 0.0),
    syn.HeadStyle((20, 205, 215), (10, 20, 80), "rings", 3.0, 0.0),
)

SHAPE_NAMES: tuple[str, ...] = (
    "blob",
    "star",
    "cross",
    "triangle",
    "crescent",
    "ring",
    "ell",
    "tee",
    "arrow",
    "hourglass",
)


def head_style(style: Style, cls: int) -> syn.HeadStyle:
    return (_LOOKALIKE_HEADS if style.lookalike else syn.HEAD_STYLES)[cls - 1]


# --------------------------------------------------------------------------- textures


@functools.lru_cache(maxsize=1)
def _textures() -> tuple[np.ndarray, ...]:
    """The texture pool: float32 H x W x 3 in [0, 255], short side _TEXTURE_SIDE; grey sources kept grey."""
    import skimage.data
    from PIL import Image

    folder = Path(skimage.data.__file__).parent
    pool = []
    for name in _TEXTURE_FILES:
        with Image.open(folder / name) as source:
            im = source.convert("RGB")
            scale = _TEXTURE_SIDE / min(im.size)
            im = im.resize(
                (max(_TEXTURE_SIDE, round(im.size[0] * scale)), max(_TEXTURE_SIDE, round(im.size[1] * scale))),
                Image.Resampling.BILINEAR,
            )
            pool.append(np.asarray(im, dtype=np.float32))
    return tuple(pool)


def texture_patch(rng: np.random.Generator, size: int, vivid: bool) -> np.ndarray:
    """A size x size crop of a random pool texture at a random zoom, recoloured: `vivid` for
    objects (saturated tint), dull for backgrounds. float32 size x size x 3."""
    pool = _textures()
    src = pool[int(rng.choice(_OBJECT_TEXTURES))] if vivid else pool[int(rng.integers(len(pool)))]
    zoom = rng.uniform(0.5, 1.6)  # < 1: the texture looks finer
    span = min(src.shape[0], src.shape[1], max(8, round(size / zoom)))
    y0 = int(rng.integers(0, src.shape[0] - span + 1))
    x0 = int(rng.integers(0, src.shape[1] - span + 1))
    idx = (np.arange(size) * span / size).astype(np.int64)
    patch = src[y0 + idx][:, x0 + idx]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    grey = patch.mean(axis=2, keepdims=True)
    contrast = rng.uniform(0.9, 1.5) if vivid else rng.uniform(0.5, 1.1)
    grey = (grey - grey.mean()) * contrast + grey.mean()
    tint = syn._hsv(
        rng.random(),
        rng.uniform(0.35, 0.8) if vivid else rng.uniform(0.05, 0.3),
        rng.uniform(0.55, 0.9) if vivid else rng.uniform(0.35, 0.7),
    )
    keep = rng.uniform(0.0, 0.5)  # how much of the source's own colour survives
    tinted = grey / 128.0 * tint
    return (keep * patch + (1 - keep) * tinted).astype(np.float32)


# --------------------------------------------------------------------------- shapes


def shape_mask(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a class shape in its normalised frame (the shape spans about [-1, 1]^2)."""
    r, phi = np.hypot(u, v), np.arctan2(v, u)
    au, av = np.abs(u), np.abs(v)
    if kind == "blob":
        return (au**2.5 + av**2.5) <= 0.8
    if kind == "star":
        return r <= 0.45 + 0.55 * np.abs(np.cos(2.5 * phi)) ** 1.5
    if kind == "cross":
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    if kind == "triangle":
        return (v <= 0.6) & (v >= 1.9 * au - 1.0)
    if kind == "crescent":
        return (r <= 1.0) & (np.hypot(u - 0.45, v) > 0.75)
    if kind == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if kind == "ell":
        return ((u >= -0.9) & (u <= -0.3) & (av <= 0.95)) | ((v >= 0.35) & (v <= 0.95) & (u >= -0.9) & (u <= 0.9))
    if kind == "tee":
        return ((v >= -0.95) & (v <= -0.4) & (au <= 0.95)) | ((au <= 0.28) & (v >= -0.95) & (v <= 0.95))
    if kind == "arrow":
        return ((av <= 0.25) & (u >= -0.95) & (u <= 0.2)) | ((u >= 0.0) & (u <= 0.95) & (av <= 0.8 * (0.95 - u)))
    if kind == "hourglass":
        return (av <= 0.95) & (au <= 0.15 + 0.75 * av) & (au <= 0.9)
    raise ValueError(f"unknown shape {kind!r}")


def _shape_pixels(kind: str, cx: float, cy: float, radius: float, theta: float, size: int) -> np.ndarray:
    out = np.zeros((size, size), dtype=bool)
    sy, sx = syn._window(cx, cy, radius * 1.5 + 1.0, size)
    yy, xx = syn._grid(size)
    u, v = syn._local_frame(yy[sy, sx], xx[sy, sx], cx, cy, theta)
    out[sy, sx] = shape_mask(kind, u / radius, v / radius)
    return out


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class _Occluder:
    cx: float
    cy: float
    length: float
    width: float
    theta: float


@dataclass
class StyledLayout:
    classes: list[int]  # class of object j
    heads: list[syn._Head | None]
    owner: np.ndarray  # int8, -1 background (occluders included)
    head: np.ndarray  # bool, visible head pixels
    occluders: list[_Occluder]


def _bar(o: _Occluder, size: int) -> np.ndarray:
    out = np.zeros((size, size), dtype=bool)
    sy, sx = syn._window(o.cx, o.cy, o.length + 1.0, size)
    yy, xx = syn._grid(size)
    u, v = syn._local_frame(yy[sy, sx], xx[sy, sx], o.cx, o.cy, o.theta)
    out[sy, sx] = (np.abs(u) <= o.length) & (np.abs(v) <= o.width)
    return out


def layout(style: Style, rng: np.random.Generator, size: int, num_classes: int, max_objects: int) -> StyledLayout:
    """Objects placed one by one under `heads`' placement rules (data/synthetic.py `_acceptable`),
    then occluders that leave every object at least half of its pixels and of its head."""
    owner = np.full((size, size), -1, dtype=np.int8)
    head = np.zeros((size, size), dtype=bool)
    classes: list[int] = []
    heads: list[syn._Head | None] = []
    own_areas: list[tuple[int, int]] = []
    allow_overlap = bool(rng.random() < 0.4)
    lo, hi = style.semi
    for cls in syn._object_classes(rng, num_classes, max(max_objects, style.max_objects)):
        for attempt in range(syn._PLACEMENT_TRIES):
            shrink = 0.88 ** (attempt // 12)
            if style.cue == "shape":
                semi = rng.uniform(lo, hi) * size * shrink
                kind = SHAPE_NAMES[cls - 1]
                obj_px = _shape_pixels(
                    kind,
                    rng.uniform(0.15, 0.85) * size,
                    rng.uniform(0.15, 0.85) * size,
                    semi,
                    rng.uniform(0, 2 * math.pi),
                    size,
                )
                head_px, hd, head_area = np.zeros_like(obj_px), None, 0.0
                if obj_px.sum() < 0.4 * semi * semi:  # mostly outside the image
                    continue
            else:
                body = syn._sample_body(rng, size, shrink, semi_range=style.semi, centre_range=(0.15, 0.85))
                body_px = syn._body_mask(body, size)
                body_area = int(body_px.sum())
                if body_area < 0.3 * math.pi * body.a * body.b:  # mostly outside the image
                    continue
                hd = syn._sample_head(rng, body, body_area)
                head_px = syn._head_mask(hd, size)
                head_area = math.pi * hd.a * hd.b
                obj_px = body_px | head_px
            if not syn._acceptable(owner, head, obj_px, head_px, head_area, own_areas, allow_overlap):
                continue
            j = len(classes)
            owner[obj_px] = j
            head[obj_px] = head_px[obj_px]
            classes.append(cls)
            heads.append(hd)
            own_areas.append((int(obj_px.sum()), int(head_px.sum())))
            break
    occluders = _occlude(style, rng, owner, head, own_areas, size)
    return StyledLayout(classes, heads, owner, head, occluders)


def _occlude(
    style: Style,
    rng: np.random.Generator,
    owner: np.ndarray,
    head: np.ndarray,
    own_areas: list[tuple[int, int]],
    size: int,
) -> list[_Occluder]:
    placed = []
    for _ in range(int(rng.integers(0, style.occluders + 1))):
        o = _Occluder(
            rng.uniform(0.1, 0.9) * size,
            rng.uniform(0.1, 0.9) * size,
            rng.uniform(0.15, 0.45) * size,
            rng.uniform(0.02, 0.06) * size,
            rng.uniform(0, math.pi),
        )
        bar = _bar(o, size)
        ok = all(
            int(((owner == j) & ~bar).sum()) >= 0.5 * area
            and int(((owner == j) & head & ~bar).sum()) >= 0.5 * head_area
            for j, (area, head_area) in enumerate(own_areas)
        )
        if ok:
            owner[bar] = -1
            head[bar] = False
            placed.append(o)
    return placed


def class_mask(lay: StyledLayout) -> np.ndarray:
    lut = np.zeros(len(lay.classes) + 1, dtype=np.uint8)
    lut[1:] = lay.classes
    return lut[lay.owner.astype(np.int64) + 1]


# --------------------------------------------------------------------------- painting


def paint(style: Style, rng: np.random.Generator, lay: StyledLayout, size: int) -> np.ndarray:
    """float32 size x size x 3: textured background, clutter, textured objects, heads, occluders."""
    img = texture_patch(rng, size, vivid=False)
    img = img * (1.0 + syn._upsample(syn._noise(rng, 0.12, (4, 4, 1)), size))
    yy, xx = syn._grid(size)
    for _ in range(style.clutter + int(rng.integers(0, 3))):  # background patches cut like bodies
        cx, cy, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0.04, 0.12) * size
        sy, sx = syn._window(cx, cy, r * 1.5, size)
        u, v = syn._local_frame(yy[sy, sx], xx[sy, sx], cx, cy, rng.uniform(0, math.pi))
        blob = (np.abs(u / r) ** 2.5 + np.abs(v / (r * rng.uniform(0.5, 1.0))) ** 2.5) <= 1.0
        img[sy, sx][blob] = texture_patch(rng, size, vivid=True)[sy, sx][blob]
    shade = 1.0 + syn._upsample(syn._noise(rng, 0.08, (6, 6, 1)), size)
    for j, cls in enumerate(lay.classes):
        mine = lay.owner == j
        body_px = mine & ~lay.head
        img[body_px] = (texture_patch(rng, size, vivid=True) * shade)[body_px]
        hd = lay.heads[j]
        if hd is None:
            continue
        hs = head_style(style, cls)
        head_px = mine & lay.head
        accent = syn._head_pattern(hs, hd, size, rng)
        colours = np.where(
            accent[head_px][:, None], np.asarray(hs.accent, np.float32), np.asarray(hs.color, np.float32)
        )
        grain = texture_patch(rng, size, vivid=False)[head_px].mean(axis=1, keepdims=True) / 128.0
        img[head_px] = colours * (0.8 + 0.2 * grain)  # heads keep their colours, with a little real grain
    for o in lay.occluders:
        bar = _bar(o, size)
        img[bar] = texture_patch(rng, size, vivid=False)[bar]
    gain, offset = rng.uniform(0.8, 1.2), rng.uniform(-20, 20)  # exposure of the "camera"
    return img * gain + offset
