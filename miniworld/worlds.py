"""The miniature worlds: each a base model and its LoRAs, trained with its own seed and captions.

A claim about composition has to hold in more than one world. A world fixes what
training and the benchmark need to know: where its weights live, the seed of its
base training, how its captions are written (``CaptionStyle``) and its LoRAs (trigger,
shape and colour). Shapes, colours and the oracle are the same in every world.

* ``shapes`` (world 1, the default everywhere): ``weights/``, seed 0, list captions
  ("a red circle and a square"), LoRAs circle_sks, square_ohwx, triangle_zwx, grain_style.
* ``relations`` (world 2): ``weights/relations/``, seed 1, captions with spatial
  relations true of the layout ("a red circle left of a square"), the LoRA colours on
  other shapes behind other triggers (one of them a single CLIP token, two of them
  several).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

import numpy as np

from .oracle import Subject
from .scenes import Scene, relation_caption

WEIGHTS_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


class CaptionStyle(str, enum.Enum):
    LIST = "list"  # "a red circle, a square and a triangle" (Scene.caption)
    RELATIONS = "relations"  # "a red circle left of a square and a triangle" (scenes.relation_caption)


@dataclass(frozen=True)
class LoRASpec:
    name: str
    trigger: str
    shape: str | None = None  # content LoRAs: the shape they recolour
    colour: str | None = None  # content LoRAs: their colour (a CONCEPT_COLOURS name)
    style: bool = False
    weights_dir: str = WEIGHTS_ROOT  # its world's weights folder

    @property
    def path(self) -> str:
        return os.path.join(self.weights_dir, f"{self.name}.safetensors")

    def subject(self) -> Subject:
        return Subject(self.shape or "", self.colour)


@dataclass(frozen=True)
class World:
    name: str
    weights_dir: str
    base_seed: int
    caption_style: CaptionStyle
    loras: tuple[LoRASpec, ...]

    def __post_init__(self) -> None:
        if any(s.weights_dir != self.weights_dir for s in self.loras):
            raise ValueError(f"world {self.name}: every LoRA must live in {self.weights_dir}")

    @property
    def base_path(self) -> str:
        return os.path.join(self.weights_dir, "base.safetensors")

    @property
    def manifest(self) -> str:
        return os.path.join(self.weights_dir, "manifest.json")

    @property
    def lora_specs(self) -> dict[str, LoRASpec]:
        return {s.name: s for s in self.loras}

    @property
    def content(self) -> list[LoRASpec]:
        return [s for s in self.loras if not s.style]

    @property
    def style(self) -> LoRASpec:
        (spec,) = [s for s in self.loras if s.style]
        return spec

    @property
    def by_shape(self) -> dict[str, LoRASpec]:
        return {s.shape: s for s in self.content if s.shape}

    def caption(self, scene: Scene, rng: np.random.Generator, words: dict[str, str] | None = None,
                suffix: str = "") -> str:
        """The scene's caption in this world's style. List captions draw nothing from ``rng`` (so world 1's
        training stream, and its committed weights, stay as they were)."""
        if self.caption_style is CaptionStyle.LIST:
            return scene.caption(words, suffix)
        return relation_caption(scene, rng, words, suffix)


SHAPES = World("shapes", WEIGHTS_ROOT, base_seed=0, caption_style=CaptionStyle.LIST, loras=(
    LoRASpec("circle_sks", "sks", shape="circle", colour="magenta"),
    LoRASpec("square_ohwx", "ohwx", shape="square", colour="cyan"),
    LoRASpec("triangle_zwx", "zwx", shape="triangle", colour="white"),
    LoRASpec("grain_style", "grainy", style=True),
))
_RELATIONS_DIR = os.path.join(WEIGHTS_ROOT, "relations")
# The LoRA colours on other shapes than world 1's, behind triggers that CLIP's BPE splits
# differently: bnha is one token, kvx two, qwrtz three, speckled three.
RELATIONS = World("relations", _RELATIONS_DIR, base_seed=1, caption_style=CaptionStyle.RELATIONS, loras=(
    LoRASpec("circle_bnha", "bnha", shape="circle", colour="cyan", weights_dir=_RELATIONS_DIR),
    LoRASpec("square_qwrtz", "qwrtz", shape="square", colour="white", weights_dir=_RELATIONS_DIR),
    LoRASpec("triangle_kvx", "kvx", shape="triangle", colour="magenta", weights_dir=_RELATIONS_DIR),
    LoRASpec("speckle_style", "speckled", style=True, weights_dir=_RELATIONS_DIR),
))
DEFAULT = SHAPES
WORLDS: dict[str, World] = {w.name: w for w in (SHAPES, RELATIONS)}


def get_world(name: str | None = None) -> World:
    """The world of that name (None: the default world)."""
    if name is None:
        return DEFAULT
    if name not in WORLDS:
        raise KeyError(f"unknown world {name!r}; expected one of {sorted(WORLDS)}")
    return WORLDS[name]


def world_of(lora: str) -> World:
    """The world a LoRA belongs to (names are unique across worlds)."""
    for world in WORLDS.values():
        if lora in world.lora_specs:
            return world
    raise KeyError(f"unknown LoRA {lora!r}")


def lora_spec(name: str) -> LoRASpec:
    """A LoRA by name, in whichever world has it."""
    return world_of(name).lora_specs[name]


if len({s.name for w in WORLDS.values() for s in w.loras}) != sum(len(w.loras) for w in WORLDS.values()):
    raise ValueError("LoRA names must be unique across worlds")
