"""The miniature world: seeded scenes of flat coloured shapes, their captions and their pixels.

A scene is 1-3 non-overlapping objects (circle, square, triangle) on a plain
background. Every object has a colour; base scenes use the base palette only, and
the colours of the LoRA concepts (``CONCEPT_COLOURS``) never occur in them. The
"latent" the model denoises is the picture itself: RGB scaled to [-1, 1] plus one
constant channel, 32x32, standing in for the 4x32x32 latent of a 256 px SD image.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

SIZE = 32
SHAPES = ("circle", "square", "triangle")
BASE_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.15, 0.15),
    "green": (0.15, 0.70, 0.20),
    "blue": (0.15, 0.25, 0.90),
    "yellow": (0.90, 0.85, 0.15),
}
#: Colours that only the content LoRAs teach (never in a base scene).
CONCEPT_COLOURS: dict[str, tuple[float, float, float]] = {
    "magenta": (0.85, 0.15, 0.85),
    "cyan": (0.10, 0.85, 0.85),
    "white": (0.95, 0.95, 0.95),
}
PALETTE = {**BASE_COLOURS, **CONCEPT_COLOURS}
BACKGROUND = (0.30, 0.30, 0.30)
#: Amplitude of the style concept's monochrome film grain (uniform +-GRAIN).
GRAIN = 0.15
CONSTANT_CHANNEL = 0.0


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    cx: float
    cy: float
    r: float  # half extent in pixels
    rgb: tuple[float, float, float]
    named_colour: bool = True  # whether the caption names the colour


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: tuple[float, float, float] = BACKGROUND
    grain: bool = False
    order: tuple[int, ...] = field(default=())  # caption order of the objects

    def caption(self, words: dict[str, str] | None = None, suffix: str = "") -> str:
        """SD-style caption: "a red circle and a square". ``words`` maps a shape to the words before it."""
        return join_phrases([self.phrase(o, words) for o in self.ordered()]) + suffix

    def ordered(self) -> list[SceneObject]:
        """The objects in caption order."""
        return [self.objects[i] for i in self.order or range(len(self.objects))]

    @staticmethod
    def phrase(o: SceneObject, words: dict[str, str] | None = None) -> str:
        """"a red circle", "a circle" (colour unnamed) or "a sks circle" (``words`` for the shape)."""
        lead = (words or {}).get(o.shape)
        if lead is None:
            lead = o.colour if o.named_colour else ""
        return f"a {lead} {o.shape}".replace("  ", " ")


def join_phrases(phrases: list[str], connectives: list[str | None] | None = None) -> str:
    """Phrases joined as a list ("A, B and C"); ``connectives[i]`` (a relation such as "left of") joins
    phrases i and i + 1 instead where it is not None."""
    text = phrases[0]
    for i, phrase in enumerate(phrases[1:]):
        relation = connectives[i] if connectives else None
        if relation:
            text += f" {relation} {phrase}"
        else:
            text += (" and " if i == len(phrases) - 2 else ", ") + phrase
    return text


#: Spatial relations of world 2's captions ("a circle left of a square"); y grows downwards.
RELATION_WORDS = ("next to", "left of", "right of", "above", "below")


def true_relations(a: SceneObject, b: SceneObject) -> list[str]:
    """The directional relations of ``a`` to ``b`` that are clearly true: only on an axis where their
    extents do not overlap (centres further apart than the two half extents). Never "next to"."""
    out = []
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) > a.r + b.r:
        out.append("left of" if dx > 0 else "right of")
    if abs(dy) > a.r + b.r:
        out.append("above" if dy > 0 else "below")
    return out


def relation_caption(scene: Scene, rng: np.random.Generator, words: dict[str, str] | None = None,
                     suffix: str = "", p_relation: float = 0.5) -> str:
    """World 2's caption: the list caption, where each pair of neighbouring phrases is joined, with
    probability ``p_relation``, by a relation true of the layout ("next to" or one of
    ``true_relations``) instead of ", " / " and ": "a red circle left of a square and a triangle"."""
    objects = scene.ordered()
    connectives: list[str | None] = []
    for a, b in zip(objects, objects[1:]):
        if rng.random() < p_relation:
            choices = ["next to", *true_relations(a, b)]
            connectives.append(choices[int(rng.integers(len(choices)))])
        else:
            connectives.append(None)
    return join_phrases([Scene.phrase(o, words) for o in objects], connectives) + suffix


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = SIZE) -> np.ndarray:
    """Boolean (size, size) mask of one shape; pixel centres at integer + 0.5."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xs - cx) <= r) & (np.abs(ys - cy) <= r)
    if shape == "triangle":  # apex up, base 2r wide at the bottom
        return (ys <= cy + r) & (ys >= cy - r) & (np.abs(xs - cx) <= (ys - (cy - r)) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def _place(rng: np.random.Generator, n: int, r_range: tuple[float, float], tries: int = 200) -> list[tuple[float, float, float]]:
    """Non-overlapping (cx, cy, r) boxes with a 2 px gap, 1 px from the border."""
    for _ in range(tries):
        boxes: list[tuple[float, float, float]] = []
        for _ in range(n):
            for _ in range(50):
                r = float(rng.uniform(*r_range))
                cx = float(rng.uniform(1 + r, SIZE - 1 - r))
                cy = float(rng.uniform(1 + r, SIZE - 1 - r))
                if all(abs(cx - bx) > r + br + 2 or abs(cy - by) > r + br + 2 for bx, by, br in boxes):
                    boxes.append((cx, cy, r))
                    break
        if len(boxes) == n:
            return boxes
    raise RuntimeError(f"could not place {n} objects")


def random_scene(
    rng: np.random.Generator,
    n_objects: int | None = None,
    shapes: tuple[str, ...] | None = None,
    colours: dict[str, str] | None = None,
    p_unnamed: float = 0.2,
    grain: bool = False,
    jitter: float = 0.04,
) -> Scene:
    """A seeded scene. ``shapes`` fixes the objects' shapes (distinct, in order); ``colours``
    fixes a shape's colour (a name from ``PALETTE``); others get a random base colour."""
    if shapes is None:
        n = int(n_objects if n_objects is not None else rng.choice([1, 2, 3], p=[0.2, 0.5, 0.3]))
        shapes = tuple(rng.permutation(SHAPES)[:n])
    n = len(shapes)
    r_range = (4.0, 7.0) if n <= 2 else (3.5, 5.5)
    base_names = list(BASE_COLOURS)
    objects = []
    for shape, (cx, cy, r) in zip(shapes, _place(rng, n, r_range)):
        name = (colours or {}).get(shape) or base_names[int(rng.integers(len(base_names)))]
        rgb = tuple(float(np.clip(c + rng.uniform(-jitter, jitter), 0, 1)) for c in PALETTE[name])
        objects.append(SceneObject(shape, name, cx, cy, r, rgb, named_colour=bool(rng.random() >= p_unnamed)))
    order = tuple(int(i) for i in rng.permutation(n))
    return Scene(tuple(objects), grain=grain, order=order)


def render(scene: Scene, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(3, H, W) RGB in [0, 1] and (n_objects, H, W) boolean object masks."""
    img = np.empty((3, SIZE, SIZE), dtype=np.float64)
    img[:] = np.asarray(scene.background)[:, None, None]
    masks = np.zeros((len(scene.objects), SIZE, SIZE), dtype=bool)
    for i, o in enumerate(scene.objects):
        masks[i] = shape_mask(o.shape, o.cx, o.cy, o.r)
        img[:, masks[i]] = np.asarray(o.rgb)[:, None]
    if scene.grain:
        rng = rng if rng is not None else np.random.default_rng(0)
        img += rng.uniform(-GRAIN, GRAIN, size=(1, SIZE, SIZE))
    return np.clip(img, 0, 1).astype(np.float32), masks


def to_latent(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) pictures in [0, 1] -> (B, 4, H, W) model latents."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32) * 2 - 1
    const = torch.full_like(x[:, :1], CONSTANT_CHANNEL)
    return torch.cat([x, const], dim=1)


def to_image(latents: torch.Tensor) -> np.ndarray:
    """(B, 4, H, W) latents -> (B, 3, H, W) pictures in [0, 1] (the constant channel dropped)."""
    return ((latents[:, :3].detach().float().cpu().numpy() + 1) / 2).clip(0, 1)


def with_colour(scene: Scene, shape: str, colour: str) -> Scene:
    """The same scene with one shape recoloured (used to build LoRA training data)."""
    objects = tuple(replace(o, colour=colour, rgb=PALETTE[colour]) if o.shape == shape else o for o in scene.objects)
    return replace(scene, objects=objects)
