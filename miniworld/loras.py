"""The miniature world's LoRAs: what each one teaches, and loading them for the harness.

Three content LoRAs, each a colour the base world never shows, on its own shape,
behind its own trigger word (like a character LoRA: "a sks circle"), and one style
LoRA (film grain over the whole picture). Files live in ``weights/`` in kohya format.
Each world (``miniworld.worlds``) has its own four; a LoRA is found by its name in any world.
"""

from __future__ import annotations

from clora_ext.concepts import Concept, Role
from clora_ext.devtools.pipeline import ConceptLoRA, TinySD
from clora_ext.lora_file import MappedLoRA, map_lora, read_lora_file

from .worlds import DEFAULT, LoRASpec, lora_spec

__all__ = ["BY_SHAPE", "CONTENT", "LORAS", "LoRASpec", "STYLE", "concept", "load_lora"]

# The default world's LoRAs (world 1); other worlds' are in miniworld.worlds.
LORAS: dict[str, LoRASpec] = DEFAULT.lora_specs
CONTENT = DEFAULT.content
STYLE = DEFAULT.style
BY_SHAPE = DEFAULT.by_shape


def load_lora(model: TinySD, name: str) -> MappedLoRA:
    return map_lora(read_lora_file(lora_spec(name).path), model.unet, model.text_encoder)


def concept(model: TinySD, name: str, role: Role = Role.CONTENT, subject: str | None = None) -> ConceptLoRA:
    """The harness's concept for a LoRA: its shape as the subject (or ``subject``), its trigger."""
    spec = lora_spec(name)
    return ConceptLoRA(Concept(subject if subject is not None else (spec.shape or ""), name, trigger=spec.trigger,
                               role=role), load_lora(model, name))
