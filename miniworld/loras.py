"""The miniature world's LoRAs: what each one teaches, and loading them for the harness.

Three content LoRAs, each a colour the base world never shows, on its own shape,
behind its own trigger word (like a character LoRA: "a sks circle"), and one style
LoRA (film grain over the whole picture). Files live in ``weights/`` in kohya format.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from clora_ext.concepts import Concept, Role
from clora_ext.devtools.pipeline import ConceptLoRA, TinySD
from clora_ext.lora_file import MappedLoRA, map_lora, read_lora_file

from .model import WEIGHTS_DIR
from .oracle import Subject


@dataclass(frozen=True)
class LoRASpec:
    name: str
    trigger: str
    shape: str | None = None  # content LoRAs: the shape they recolour
    colour: str | None = None  # content LoRAs: their colour (a CONCEPT_COLOURS name)
    style: bool = False

    @property
    def path(self) -> str:
        return os.path.join(WEIGHTS_DIR, f"{self.name}.safetensors")

    def subject(self) -> Subject:
        return Subject(self.shape or "", self.colour)


LORAS: dict[str, LoRASpec] = {
    spec.name: spec
    for spec in (
        LoRASpec("circle_sks", "sks", shape="circle", colour="magenta"),
        LoRASpec("square_ohwx", "ohwx", shape="square", colour="cyan"),
        LoRASpec("triangle_zwx", "zwx", shape="triangle", colour="white"),
        LoRASpec("grain_style", "grainy", style=True),
    )
}
CONTENT = [s for s in LORAS.values() if not s.style]
STYLE = LORAS["grain_style"]
BY_SHAPE = {s.shape: s for s in CONTENT}


def load_lora(model: TinySD, name: str) -> MappedLoRA:
    return map_lora(read_lora_file(LORAS[name].path), model.unet, model.text_encoder)


def concept(model: TinySD, name: str, role: Role = Role.CONTENT, subject: str | None = None) -> ConceptLoRA:
    """The harness's concept for a LoRA: its shape as the subject (or ``subject``), its trigger."""
    spec = LORAS[name]
    return ConceptLoRA(Concept(subject if subject is not None else (spec.shape or ""), name, trigger=spec.trigger,
                               role=role), load_lora(model, name))
