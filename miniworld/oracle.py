"""The pixel oracle: finds the objects in a picture and reads their shape and colour.

Independent of the model: plain image analysis. The background is the median colour
of the border. Objects are first found as 4-connected components (at least
``MIN_PIXELS``) where a 3x3 median-filtered picture differs from the background by more
than ``FOREGROUND`` in some channel; the filter removes grain and noise but clips
corners, so each object's outline is then redrawn from the raw pixels around it: a
pixel is the object's where it is nearer the object's median colour than the
background's. Holes are filled.
Shape: a triangle (apex up) is much narrower in its top quarter than in its bottom
quarter; otherwise a square fills the corners of its bounding box and a circle leaves
them empty: for objects 10 px and larger, the 2x2 corner blocks (a drawn square may
lose its corner pixel; an elongated box filled to 80 % is a drawn square too, since a
circle is never elongated); for smaller ones the corner pixels themselves, since a
rasterised small circle fills most of those blocks (the fill of the box no longer
tells a small circle from a square either).
Colour is the nearest palette entry to the median colour of the component's interior. Grain (the style
concept) is the high-pass energy of the brightness, measured on the background and
inside each object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from .scenes import PALETTE

FOREGROUND = 0.2  # max channel difference from the background
MIN_PIXELS = 10
MAX_COLOUR_DISTANCE = 0.35  # farther from every palette colour: "unknown"
#: High-pass std of the brightness above which a region counts as grainy. Flat renders
#: measure 0; rendered grain (uniform +-0.15) about 0.08; set between the two.
GRAIN_THRESHOLD = 0.035


@dataclass(frozen=True)
class Found:
    shape: str
    colour: str
    pixels: int
    fill: float
    centroid: tuple[float, float]
    mask: np.ndarray  # (H, W) bool
    grain: float


@dataclass(frozen=True)
class Analysis:
    objects: tuple[Found, ...]
    background: tuple[float, float, float]
    background_grain: float


def _shape(component: np.ndarray) -> tuple[str, float]:
    ys, xs = np.nonzero(component)
    top, h = ys.min(), ys.max() - ys.min() + 1
    w = xs.max() - xs.min() + 1
    fill = len(ys) / float(h * w)
    widths = component[top : top + h].sum(1)
    quarter = max(1, h // 4)
    narrowing = widths[:quarter].mean() / max(1.0, widths[-quarter:].mean())  # triangle ~0.25, others ~0.6-1
    if narrowing < 0.5 or fill < 0.6:
        return "triangle", fill
    box = component[top : top + h, xs.min() : xs.min() + w]
    if min(h, w) >= 10:  # large enough for 2x2 corner blocks: a drawn square may lose its corner pixel
        blocks = [box[:2, :2], box[:2, -2:], box[-2:, :2], box[-2:, -2:]]
        # a drawn square can come out as a boxy rectangle with ragged corners; a circle is never elongated
        boxy_rectangle = min(h, w) / max(h, w) < 0.75 and fill >= 0.8
        square = float(np.mean([b.mean() for b in blocks])) >= 0.5 or boxy_rectangle
    else:  # small: a rasterised circle fills 2x2 corner blocks too, but never the corner pixel itself
        square = int(box[0, 0]) + int(box[0, -1]) + int(box[-1, 0]) + int(box[-1, -1]) >= 2
    return ("square" if square else "circle"), fill


def _colour(rgb: np.ndarray, palette: Mapping[str, tuple[float, float, float]]) -> str:
    names = list(palette)
    d = np.linalg.norm(np.asarray([palette[n] for n in names]) - rgb[None], axis=1)
    return names[int(d.argmin())] if d.min() <= MAX_COLOUR_DISTANCE else "unknown"


def _grain(brightness_highpass: np.ndarray, region: np.ndarray) -> float:
    return float(brightness_highpass[region].std()) if region.sum() >= MIN_PIXELS else 0.0


def analyse(image: np.ndarray, palette: Mapping[str, tuple[float, float, float]] = PALETTE) -> Analysis:
    """Objects of one (3, H, W) picture in [0, 1]."""
    img = np.asarray(image, dtype=np.float64)
    smooth = ndimage.median_filter(img, size=(1, 3, 3), mode="nearest")
    border = np.concatenate([smooth[:, 0], smooth[:, -1], smooth[:, :, 0], smooth[:, :, -1]], axis=1)
    background = np.median(border, axis=1)
    seeds = np.abs(smooth - background[:, None, None]).max(0) > FOREGROUND
    labels, n = ndimage.label(seeds)
    to_background = np.linalg.norm(img - background[:, None, None], axis=0)
    brightness = img.mean(0)
    highpass = brightness - ndimage.median_filter(brightness, size=3, mode="nearest")
    found = []
    foreground = np.zeros(seeds.shape, dtype=bool)
    for i in range(1, n + 1):
        seed = labels == i
        if seed.sum() < MIN_PIXELS:
            continue
        own_rgb = np.median(img[:, seed], axis=1)
        nearer = np.linalg.norm(img - own_rgb[:, None, None], axis=0) < to_background
        # one pixel around the seed (what the filter can clip), never another object's seed
        around = ndimage.binary_dilation(seed) & ((labels == 0) | seed)
        outline, _ = ndimage.label(nearer & around)
        overlap = np.bincount(outline[seed], minlength=outline.max() + 1)
        overlap[0] = 0
        component = ndimage.binary_fill_holes(outline == overlap.argmax()) if overlap.max() else seed
        foreground |= component
        shape, fill = _shape(component)
        core = ndimage.binary_erosion(component, iterations=1)
        colour = _colour(np.median(img[:, core if core.sum() >= 4 else component], axis=1), palette)
        ys, xs = np.nonzero(component)
        found.append(Found(shape, colour, int(component.sum()), round(fill, 3), (float(ys.mean()), float(xs.mean())),
                           component, _grain(highpass, core)))
    outside = ~ndimage.binary_dilation(foreground, iterations=2)
    return Analysis(tuple(found), tuple(float(c) for c in background), _grain(highpass, outside))


@dataclass(frozen=True)
class Subject:
    """A requested subject: its shape and the colour its LoRA gives it (None: no LoRA)."""

    shape: str
    colour: str | None = None


def judge(analysis: Analysis, subjects: Sequence[Subject]) -> dict:
    """Per subject ``present``, ``own_attribute``, ``other_attribute``, ``count``; plus the image's
    ``success`` (every subject present once, in its own colour, none in another subject's),
    ``bleed``, ``omission``, ``duplicate``."""
    lora_colours = {s.colour for s in subjects if s.colour}
    per_subject = {}
    for s in subjects:
        mine = [o for o in analysis.objects if o.shape == s.shape]
        others = lora_colours - {s.colour}
        per_subject[s.shape] = {
            "present": bool(mine),
            "count": len(mine),
            "own_attribute": bool(s.colour) and any(o.colour == s.colour for o in mine),
            "other_attribute": any(o.colour in others for o in mine),
        }
    values = per_subject.values()
    omission = any(not v["present"] for v in values)
    duplicate = any(v["count"] > 1 for v in values)
    bleed = any(v["other_attribute"] for v in values)
    own = all(v["own_attribute"] for v, s in zip(values, subjects) if s.colour)
    return {
        "subjects": per_subject,
        "success": not omission and not duplicate and not bleed and own,
        "bleed": bleed,
        "omission": omission,
        "duplicate": duplicate,
    }


def is_grainy(grain: float) -> bool:
    return grain > GRAIN_THRESHOLD
