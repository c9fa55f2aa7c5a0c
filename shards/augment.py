"""Training augmentation: the settings both backends share, and the NumPy/OpenCV version the torch
backend runs per sample in its workers (the DALI backend builds the same steps from DALI operators
in shards/dali_pipeline.py).

Order: random resized crop -> brightness/contrast/saturation -> grayscale -> blur -> erase -> flip.
Every step maps uint8 RGB HxW to uint8 RGB HxW, so shape, dtype and range never change. The
flip is an exact mirror (no resampling). Randomness comes only from the generator passed in, so a
seed reproduces a batch whatever the number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from common.cli import UserError
from common.settings import PROBABILITY, Range, range_error, setting

# Fixed ranges: kept here so the two backends draw from the same distributions.
CROP_ASPECT = (0.9, 1.1)  # aligned faces: keep the crop close to square
BLUR_SIGMA = (0.5, 1.5)  # pixels
ERASE_AREA = (0.02, 0.2)  # fraction of the image
ERASE_ASPECT = (0.3, 3.3)
ERASE_FILL = 128  # mid-gray: ~0 after normalization


@dataclass
class AugmentConfig:
    """All off except the horizontal flip by default."""

    flip: bool = setting(True, "horizontal flip, half of the images")
    crop_scale: tuple[float, float] | None = setting(
        None,
        "random resized crop: [low, high] share of the area, e.g. [0.85, 1.0]; null = off",
        range=Range(0, 1, "(]"),
    )
    color_jitter: float = setting(
        0.0, "brightness/contrast/saturation factor in 1 +- this", range=Range(0, 1, "[)")
    )
    grayscale_p: float = setting(0.0, "probability of a grayscale image", range=PROBABILITY)
    blur_p: float = setting(0.0, "probability of a Gaussian blur", range=PROBABILITY)
    erase_p: float = setting(0.0, "probability of erasing a box (random erasing)", range=PROBABILITY)

    def validate(self) -> AugmentConfig:
        """Raise UserError naming the setting when a value is out of range; returns self."""
        outside = range_error(self)
        if outside is not None:
            name, value, allowed = outside
            raise UserError(f"augment.{name}={value}: must be {allowed}")
        if self.crop_scale is not None:
            lo, hi = (float(v) for v in self.crop_scale)
            if lo > hi:
                raise UserError(f"augment.crop_scale={list(self.crop_scale)}: need low <= high")
            self.crop_scale = (lo, hi)
        return self

    @property
    def needs_pixels(self) -> bool:
        """True when anything beyond the flip is on."""
        return bool(self.crop_scale or self.color_jitter or self.grayscale_p or self.blur_p or self.erase_p)


@dataclass
class AugmentDraw:
    """One image's random choices, drawn before any pixel is touched (both backends apply them).

    Boxes are (y, x, height, width) in pixels of the input; None means the step is skipped.
    """

    crop: tuple[int, int, int, int] | None = None
    color: tuple[float, float, float] | None = None  # brightness, contrast, saturation factors
    gray: bool = False
    blur_sigma: float | None = None
    erase: tuple[int, int, int, int] | None = None
    flip: bool = False


def _crop_box(
    h: int, w: int, scale: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    area = h * w * rng.uniform(*scale)
    ratio = np.exp(rng.uniform(np.log(CROP_ASPECT[0]), np.log(CROP_ASPECT[1])))
    cw = int(round(min(w, np.sqrt(area * ratio))))
    ch = int(round(min(h, np.sqrt(area / ratio))))
    y = int(rng.integers(0, h - ch + 1))
    x = int(rng.integers(0, w - cw + 1))
    return y, x, ch, cw


def _erase_box(h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    area = h * w * rng.uniform(*ERASE_AREA)
    ratio = np.exp(rng.uniform(np.log(ERASE_ASPECT[0]), np.log(ERASE_ASPECT[1])))
    eh, ew = min(h, max(1, int(np.sqrt(area / ratio)))), min(w, max(1, int(np.sqrt(area * ratio))))
    y, x = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
    return y, x, eh, ew


def draw_augment(cfg: AugmentConfig, h: int, w: int, rng: np.random.Generator) -> AugmentDraw:
    """The random choices for one h x w image, in the order of the steps.

    They depend only on the generator, never on pixels: a batch's draws follow from its seed words
    alone, which is what makes a resumed epoch (any backend) repeat the uninterrupted one.
    """
    d = AugmentDraw()
    if cfg.crop_scale:
        d.crop = _crop_box(h, w, cfg.crop_scale, rng)
    if cfg.color_jitter:
        b, c, s = rng.uniform(1 - cfg.color_jitter, 1 + cfg.color_jitter, size=3)
        d.color = (b, c, s)  # NumPy float64 scalars: _color then computes in float64
    d.gray = bool(cfg.grayscale_p and rng.random() < cfg.grayscale_p)
    if cfg.blur_p and rng.random() < cfg.blur_p:
        d.blur_sigma = float(rng.uniform(*BLUR_SIGMA))
    if cfg.erase_p and rng.random() < cfg.erase_p:
        d.erase = _erase_box(h, w, rng)
    d.flip = bool(cfg.flip and rng.random() < 0.5)
    return d


def _color(img: np.ndarray, factors: tuple[float, float, float]) -> np.ndarray:
    b, c, s = factors
    x = img.astype(np.float32) * b
    gray = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = (x - gray.mean()) * c + gray.mean()
    gray = (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    x = gray + (x - gray) * s
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def apply_augment(img: np.ndarray, d: AugmentDraw) -> np.ndarray:
    """The NumPy/OpenCV steps of one draw: uint8 HxWx3 RGB in, the same size and type out."""
    h, w = img.shape[:2]
    if d.crop is not None:
        y, x, ch, cw = d.crop
        img = cv2.resize(img[y : y + ch, x : x + cw], (w, h), interpolation=cv2.INTER_LINEAR)
    if d.color is not None:
        img = _color(img, d.color)
    if d.gray:
        img = np.repeat(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    if d.blur_sigma is not None:
        img = cv2.GaussianBlur(img, (0, 0), sigmaX=d.blur_sigma)
    if d.erase is not None:
        y, x, eh, ew = d.erase
        img = img.copy()  # never write into the caller's array
        img[y : y + eh, x : x + ew] = ERASE_FILL
    if d.flip:
        img = img[:, ::-1]
    return img


def augment_image(img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """One uint8 HxWx3 RGB image in, the augmented uint8 HxWx3 RGB image out (same size)."""
    return apply_augment(img, draw_augment(cfg, *img.shape[:2], rng))
