"""The 7 corruptions of the paper's robustness experiment (after Hendrycks & Dietterich's
ImageNet-C, as in the ``imagecorruptions`` package), written with numpy, scipy and PIL for
uint8 images of any size: motion blur, impulse noise, gaussian noise, pixelate, spatter,
contrast, JPEG compression, each at severity 1..5.

Size-dependent parameters (blur length, splash scale) are scaled from ImageNet's 224 px to
the image size. Every function takes (N, H, W, 3) or (H, W, 3) uint8 and a numpy Generator
and returns uint8 of the same shape.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage

CORRUPTIONS = ("motion_blur", "impulse_noise", "gaussian_noise", "pixelate", "spatter", "contrast",
               "jpeg_compression")


def _batch(images: np.ndarray) -> tuple[np.ndarray, bool]:
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise ValueError(f"corruptions take uint8 (N, H, W, 3) or (H, W, 3) images, got {images.dtype} {images.shape}")
    return (images[None], True) if images.ndim == 3 else (images, False)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = [0.08, 0.12, 0.18, 0.26, 0.38][severity - 1]
    f = x / 255.0
    return _to_uint8(f + rng.normal(0, c, f.shape))


def impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt-and-pepper noise on a fraction ``c`` of the entries."""
    c = [0.03, 0.06, 0.09, 0.17, 0.27][severity - 1]
    out = x.copy()
    hit = rng.random(x.shape) < c
    out[hit] = np.where(rng.random(int(hit.sum())) < 0.5, 0, 255).astype(np.uint8)
    return out


def contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = [0.4, 0.3, 0.2, 0.1, 0.05][severity - 1]
    f = x / 255.0
    means = f.mean(axis=(1, 2, 3), keepdims=True)
    return _to_uint8((f - means) * c + means)


def pixelate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Box-downsample to a fraction ``c`` of the size, then back up with nearest neighbours."""
    c = [0.6, 0.5, 0.4, 0.3, 0.25][severity - 1]
    h, w = x.shape[1:3]
    small = (max(1, int(w * c)), max(1, int(h * c)))
    return np.stack([np.asarray(Image.fromarray(im).resize(small, Image.BOX).resize((w, h), Image.NEAREST))
                     for im in x])


def jpeg_compression(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    quality = [25, 18, 15, 10, 7][severity - 1]
    out = []
    for im in x:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    return np.stack(out)


def _line_kernel(length: float, angle: float) -> np.ndarray:
    """A normalised kernel of a line of ``length`` pixels at ``angle`` (radians) from the
    centre backwards (a motion trail)."""
    radius = max(1, int(np.ceil(length)))
    size = 2 * radius + 1
    kernel = np.zeros((size, size), np.float64)
    for t in np.linspace(0, length, 4 * radius + 1):
        r, c = radius - t * np.sin(angle), radius - t * np.cos(angle)
        kernel[int(round(r)), int(round(c))] = 1.0
    return kernel / kernel.sum()


def motion_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Blur along a random direction per image; trail length ImageNet-C's radius scaled."""
    length = [10, 15, 15, 15, 20][severity - 1] * x.shape[1] / 224 * [1.0, 1.2, 1.6, 2.0, 2.4][severity - 1]
    length = max(length, 1.0 + 0.5 * severity)
    out = np.empty_like(x)
    for i, im in enumerate(x):
        kernel = _line_kernel(length, rng.uniform(-np.pi / 4, np.pi / 4))
        f = im / 255.0
        out[i] = _to_uint8(np.stack([ndimage.convolve(f[..., ch], kernel, mode="nearest") for ch in range(3)], -1))
    return out


def spatter(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Water (severity 1-3) or mud (4-5) splashes: thresholded blurred noise blended in."""
    # (mean, std, blur sigma at 224 px, threshold, strength) after ImageNet-C's spatter
    loc, scale, sigma, thresh, strength = [
        (0.65, 0.3, 4, 0.69, 0.6), (0.65, 0.3, 3, 0.68, 0.6), (0.65, 0.3, 2, 0.68, 0.5),
        (0.65, 0.3, 1, 0.65, 1.5), (0.67, 0.4, 1, 0.65, 1.5)][severity - 1]
    n, h, w, _ = x.shape
    f = x / 255.0
    noise = rng.normal(loc, scale, (n, h, w))
    s = max(0.6, sigma * h / 224 * 4)
    noise = np.stack([ndimage.gaussian_filter(m, s) for m in noise])
    noise = (noise - noise.mean(axis=(1, 2), keepdims=True)) / (noise.std(axis=(1, 2), keepdims=True) + 1e-8)
    noise = noise * scale + loc
    mask = np.clip((noise - thresh) * 4, 0, 1)[..., None]
    if severity <= 3:  # water: bluish, brightening
        colour = np.array([238, 238, 175], np.float64)[::-1] / 255.0
        out = f * (1 - 0.6 * strength * mask) + colour * 0.6 * strength * mask
    else:  # mud: brown, darkening
        colour = np.array([63, 42, 20], np.float64) / 255.0
        m = np.clip(mask * strength * 0.55, 0, 1)
        out = f * (1 - m) + colour * m
    return _to_uint8(out)


FUNCTIONS = {name: globals()[name] for name in CORRUPTIONS}


def corrupt(images: np.ndarray, name: str, severity: int = 3, seed: int = 0) -> np.ndarray:
    """``images`` (uint8, (N, H, W, 3) or (H, W, 3)) under corruption ``name`` at ``severity``."""
    if name not in FUNCTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {list(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise ValueError(f"corruption severity must be 1..5, got {severity}")
    batch, single = _batch(images)
    out = FUNCTIONS[name](batch, severity, np.random.default_rng(seed))
    return out[0] if single else out
