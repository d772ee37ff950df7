"""Procedural image-caption scenes and the synthetic task catalogue.

Every 32x32 RGB scene carries all attributes at once (shape, shape colour, background,
stripes, dot count, quadrant, size, border, and optionally a bar orientation or a real
scikit-learn digit). A task asks for one attribute; it owns a fixed image domain (a shared
"downstream" shift plus a task-specific one), as separate real datasets do, so the
fine-tuned encoders conflict when merged. Everything is a pure function of a seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

IMAGE_SIZE = 32
MEAN, STD = 0.5, 0.25  # image normalisation of the synthetic zoo (every channel)

SHAPES = ["circle", "square", "triangle", "cross", "ring", "diamond"]
COLOURS = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.80, 0.15),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "magenta": (0.90, 0.15, 0.85),
    "cyan": (0.10, 0.85, 0.90),
    "orange": (1.00, 0.55, 0.05),
    "white": (0.97, 0.97, 0.97),
}
BACKGROUNDS = {
    "black": (0.02, 0.02, 0.02),
    "gray": (0.45, 0.45, 0.45),
    "navy": (0.05, 0.08, 0.40),
    "olive": (0.30, 0.35, 0.05),
    "maroon": (0.40, 0.05, 0.10),
}
STRIPES = ["plain", "horizontal", "vertical", "diagonal"]
COUNTS = ["one", "two", "three", "four", "five"]
QUADRANTS = ["top left", "top right", "bottom left", "bottom right"]
SIZES = ["small", "medium", "large"]
BORDERS = ["no", "thin", "thick", "dashed"]
ORIENTATIONS = ["horizontal", "vertical", "rising", "falling"]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass(frozen=True)
class Attribute:
    """One labelled property of a scene, with the phrases that describe it."""

    name: str
    classnames: list[str]
    templates: list[str]
    caption_weight: float = 1.0


ATTRIBUTES: dict[str, Attribute] = {
    a.name: a
    for a in [
        Attribute("shape", SHAPES, ["{}", "a {}"], caption_weight=2.5),
        Attribute("colour", list(COLOURS), ["{} shape", "a {} shape"]),
        Attribute("background", list(BACKGROUNDS), ["{} background", "on {} background"]),
        Attribute("stripes", STRIPES, ["{} stripes", "with {} stripes"]),
        Attribute("count", COUNTS, ["{} dots", "with {} dots"]),
        Attribute("quadrant", QUADRANTS, ["in the {}", "shape in the {}"], caption_weight=2.0),
        Attribute("size", SIZES, ["{} size", "a {} size shape"]),
        Attribute("border", BORDERS, ["{} border", "with {} border"]),
        Attribute("orientation", ORIENTATIONS, ["{} bar", "a {} bar"]),
        Attribute("digit", DIGITS, ["digit {}", "the digit {}"]),
    ]
}

# Which optional overlay a task's images carry ("bar" or "digit"); the others have none.
OVERLAY_OF = {"orientation": "bar", "digit": "digit"}


@dataclass(frozen=True)
class Domain:
    """The fixed image shift of one task's dataset (hue is kept for colour tasks)."""

    invert: bool = False
    hue_shift: float = 0.0  # radians, rotation around the grey axis
    contrast: float = 1.0
    noise: float = 0.0
    texture: float = 0.0  # strength of a fixed per-task luminance pattern
    texture_seed: int = 0


@dataclass
class Scenes:
    """A batch of rendered scenes: images (N, 32, 32, 3) uint8 and integer attributes."""

    images: np.ndarray
    labels: dict[str, np.ndarray] = field(default_factory=dict)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def _shape_masks(kind: np.ndarray, cx, cy, r) -> np.ndarray:
    """Boolean masks (N, H, W) of each scene's main shape."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    r = r[:, None, None]
    dist = np.sqrt(dx**2 + dy**2)
    masks = np.stack(
        [
            dist <= r,
            np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r,
            (dy <= 0.8 * r) & (np.abs(dx) <= 0.55 * (dy + r)),
            ((np.abs(dx) <= r / 3) & (np.abs(dy) <= r)) | ((np.abs(dy) <= r / 3) & (np.abs(dx) <= r)),
            (dist <= r) & (dist >= 0.55 * r),
            np.abs(dx) + np.abs(dy) <= r,
        ]
    )
    return masks[kind, np.arange(len(kind))]


def _stripe_mask(kind: np.ndarray, phase: np.ndarray) -> np.ndarray:
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    p = phase[:, None, None]
    masks = np.stack(
        [
            np.zeros((len(kind), IMAGE_SIZE, IMAGE_SIZE), bool),
            ((yy[None] + p) % 6) < 2,
            ((xx[None] + p) % 6) < 2,
            ((xx[None] + yy[None] + p) % 7) < 2,
        ]
    )
    return masks[kind, np.arange(len(kind))]


def _border_mask(kind: np.ndarray) -> np.ndarray:
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    edge = np.minimum(np.minimum(xx, yy), np.minimum(IMAGE_SIZE - 1 - xx, IMAGE_SIZE - 1 - yy))
    dashes = ((xx + yy) // 3) % 2 == 0
    masks = np.stack([np.zeros_like(edge, bool), edge < 1, edge < 3, (edge < 2) & dashes])
    return masks[kind]


def _bar_mask(kind: np.ndarray, offset: np.ndarray) -> np.ndarray:
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    c = IMAGE_SIZE / 2 - 0.5 + offset[:, None, None]
    dx, dy = xx[None] - c, yy[None] - c
    half = 1.3
    masks = np.stack(
        [
            np.abs(dy) <= half,
            np.abs(dx) <= half,
            np.abs(dx + dy) <= half * 1.42,
            np.abs(dx - dy) <= half * 1.42,
        ]
    ) & (np.maximum(np.abs(dx), np.abs(dy)) <= 11)
    return masks[kind, np.arange(len(kind))]


def render(n: int, seed: int, overlay: str | None = None, digit_pool: np.ndarray | None = None) -> Scenes:
    """Render ``n`` random scenes; ``overlay`` adds a bar ("bar") or a real digit ("digit")."""
    rng = np.random.default_rng(seed)
    lab = {
        "shape": rng.integers(0, len(SHAPES), n),
        "colour": rng.integers(0, len(COLOURS), n),
        "background": rng.integers(0, len(BACKGROUNDS), n),
        "stripes": rng.integers(0, len(STRIPES), n),
        "count": rng.integers(0, len(COUNTS), n),
        "quadrant": rng.integers(0, len(QUADRANTS), n),
        "size": rng.integers(0, len(SIZES), n),
        "border": rng.integers(0, len(BORDERS), n),
    }
    colours = np.array(list(COLOURS.values()), np.float32)
    backgrounds = np.array(list(BACKGROUNDS.values()), np.float32)

    bg = backgrounds[lab["background"]][:, None, None, :] * np.ones((1, IMAGE_SIZE, IMAGE_SIZE, 1), np.float32)
    stripes = _stripe_mask(lab["stripes"], rng.integers(0, 6, n))
    img = np.where(stripes[..., None], np.clip(bg + 0.35, 0, 1), bg)

    qx, qy = lab["quadrant"] % 2, lab["quadrant"] // 2
    cx = 8 + 16 * qx + rng.uniform(-1.0, 1.0, n)
    cy = 8 + 16 * qy + rng.uniform(-1.0, 1.0, n)
    radius = np.array([3.6, 5.6, 7.8], np.float32)[lab["size"]] * rng.uniform(0.96, 1.04, n)
    shape = _shape_masks(lab["shape"], cx.astype(np.float32), cy.astype(np.float32), radius.astype(np.float32))
    img = np.where(shape[..., None], colours[lab["colour"]][:, None, None, :], img)

    # dots: 2x2 squares on 12 slots of the three quadrants without the shape
    slots = np.array([(x, y) for y in (3, 9) for x in (3, 9)], np.int64)  # inside a 16x16 quadrant
    order = np.argsort(rng.random((n, 3 * len(slots))), axis=1)
    dot_mask = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), bool)
    for i in range(n):
        others = [q for q in range(4) if q != lab["quadrant"][i]]
        for j in order[i, : lab["count"][i] + 1]:
            q, s = others[j // len(slots)], slots[j % len(slots)]
            x0, y0 = 16 * (q % 2) + s[0], 16 * (q // 2) + s[1]
            dot_mask[i, y0 : y0 + 3, x0 : x0 + 3] = True
    img = np.where(dot_mask[..., None], np.float32(1.0), img)

    border = _border_mask(lab["border"])
    img = np.where(border[..., None], np.float32(0.85), img)

    if overlay == "bar":
        lab["orientation"] = rng.integers(0, len(ORIENTATIONS), n)
        bar = _bar_mask(lab["orientation"], rng.uniform(-2, 2, n).astype(np.float32))
        img = np.where(bar[..., None], np.float32(1.0) - img * 0.2, img)
    elif overlay == "digit":
        pool_x, pool_y = digit_pool if digit_pool is not None else _digits()
        pick = rng.integers(0, len(pool_x), n)
        lab["digit"] = pool_y[pick]
        glyph = np.kron(pool_x[pick], np.ones((1, 3, 3), np.float32))  # 24x24
        ox, oy = rng.integers(2, 7, n), rng.integers(2, 7, n)
        canvas = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), np.float32)
        for i in range(n):
            canvas[i, oy[i] : oy[i] + 24, ox[i] : ox[i] + 24] = glyph[i]
        img = img * (1 - canvas[..., None]) * 0.4 + canvas[..., None] * np.float32(1.0)
    return Scenes((np.clip(img, 0, 1) * 255).round().astype(np.uint8), lab)


def apply_domain(images: np.ndarray, domain: Domain, seed: int) -> np.ndarray:
    """Apply a task's fixed image shift to uint8 images; returns uint8."""
    x = images.astype(np.float32) / 255.0
    if domain.hue_shift:
        # rotation around the grey axis: keeps lightness and the distinctness of hues
        k = np.ones(3, np.float32) / np.sqrt(3)
        c, s = np.cos(domain.hue_shift), np.sin(domain.hue_shift)
        kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], np.float32)
        rot = c * np.eye(3, dtype=np.float32) + s * kx + (1 - c) * np.outer(k, k)
        x = x @ rot.T
    if domain.invert:
        x = 1.0 - x
    if domain.contrast != 1.0:
        x = 0.5 + (x - 0.5) * domain.contrast
    if domain.texture:
        trng = np.random.default_rng(domain.texture_seed)
        coarse = trng.standard_normal((8, 8)).astype(np.float32)
        pattern = np.kron(coarse, np.ones((4, 4), np.float32))
        x = x + domain.texture * pattern[None, :, :, None]
    if domain.noise:
        x = x + np.random.default_rng(seed).normal(0, domain.noise, x.shape).astype(np.float32)
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def task_domain(task: str, seed: int, shared: dict, specific: dict) -> Domain:
    """The fixed domain of a task: the shared downstream shift plus a task-specific one
    drawn deterministically from the task name and the zoo seed."""
    h = int(hashlib.sha256(f"{seed}:{task}".encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(h)
    hue = shared.get("hue_shift", 0.0) + rng.uniform(-1, 1) * specific.get("hue_shift", 0.0)
    return Domain(
        invert=bool(shared.get("invert", False)) ^ (rng.random() < specific.get("invert_prob", 0.0)),
        hue_shift=float(hue),
        contrast=float(shared.get("contrast", 1.0) * (1 + rng.uniform(-1, 1) * specific.get("contrast", 0.0))),
        noise=float(shared.get("noise", 0.0) + rng.uniform(0, 1) * specific.get("noise", 0.0)),
        texture=float(specific.get("texture", 0.0)),
        texture_seed=h % (2**31),
    )


def caption_batch(labels: dict[str, np.ndarray], rng: np.random.Generator, max_phrases: int = 3):
    """Random captions of 1..max_phrases attribute phrases, and the phrases' (attribute, class) pairs."""
    names = list(labels)
    weights = np.array([ATTRIBUTES[a].caption_weight for a in names], np.float64)
    weights /= weights.sum()
    n = len(next(iter(labels.values())))
    captions, parts = [], []
    for i in range(n):
        k = rng.integers(1, max_phrases + 1)
        chosen = rng.choice(len(names), size=min(k, len(names)), replace=False, p=weights)
        phrases, pairs = [], []
        for j in chosen:
            attr = ATTRIBUTES[names[j]]
            cls = int(labels[names[j]][i])
            template = attr.templates[rng.integers(0, len(attr.templates))]
            phrases.append(template.format(attr.classnames[cls]))
            pairs.append((names[j], cls))
        captions.append(" and ".join(phrases))
        parts.append(pairs)
    return captions, parts


def vocabulary() -> list[str]:
    """Every word any caption or zero-shot prompt can contain, sorted."""
    words = {"and"}
    for attr in ATTRIBUTES.values():
        for t in attr.templates:
            for c in attr.classnames:
                words.update(t.format(c).split())
    return sorted(words)


def normalise(images: torch.Tensor, mean: float | torch.Tensor = MEAN,
              std: float | torch.Tensor = STD) -> torch.Tensor:
    """uint8 NCHW images -> float32 ``(x / 255 - mean) / std``, the operations of
    torchvision's ToTensor and Normalize (``mean``, ``std``: scalars or (3, 1, 1) tensors)."""
    return images.float().div_(255.0).sub_(mean).div_(std)  # in place: one new buffer


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC images -> normalised float32 NCHW tensor."""
    return normalise(torch.from_numpy(images).permute(0, 3, 1, 2))
