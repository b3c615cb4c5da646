"""The LoRAs installed in the web UI host, as the built-in Lora extension lists them (shared by
every web UI host): names for the UI, lookup with a clear refusal, the activation text, and the
cache both host families keep their loaded LoRAs in."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Sequence

from . import host
from .plan import CLoRARuntimeError, suggest_names


def lora_names() -> list[str]:
    try:
        return host.lora_names()
    except host.LoraExtensionMissing:
        return []


def refresh() -> None:
    try:
        host.refresh_loras()
    except host.LoraExtensionMissing:
        pass


def on_disk(name: str) -> Any:
    """The host's entry for the installed LoRA ``name``; refused with a message when it is missing."""
    try:
        found = host.find_lora(name)
    except host.LoraExtensionMissing as e:
        raise CLoRARuntimeError(str(e)) from None
    if found is None:
        raise CLoRARuntimeError(f"CLoRA: LoRA {name!r} is not installed; {suggest_names(name, lora_names())}")
    if not host.lora_path(found).lower().endswith(".safetensors"):  # the host would unpickle .pt/.ckpt
        raise CLoRARuntimeError(f"CLoRA: LoRA {name!r} is not a .safetensors file; CLoRA never unpickles files")
    return found


def activation_text(name: str) -> str:
    """The LoRA's "activation text" user metadata (the .json beside the file), or ''."""
    try:
        entry = on_disk(name)
    except CLoRARuntimeError:
        return ""
    return str(host.user_metadata(host.lora_path(entry)).get("activation text", "") or "")


def made_for_another_family(name: str, family: str, layer: str, weight_shape: Sequence[int],
                            factors: tuple[int, int] | None) -> CLoRARuntimeError:
    """The refusal of a LoRA whose layer ``layer`` does not fit the loaded model (``factors``: the
    (out, in) the LoRA's factors make there, where they tell). The hosts match keys by name only (an
    SD1.x file's keys exist in SDXL too, with other widths) and their merge skips what does not fit;
    a routed layer that does not fit would fail mid-sampling instead."""
    detail = "" if factors is None else (f": out x in is {weight_shape[0]}x{weight_shape[1]} in the model, "
                                         f"{factors[0]}x{factors[1]} in the LoRA")
    return CLoRARuntimeError(f"CLoRA: LoRA {name!r} does not fit the loaded {family} model (layer {layer}{detail}); "
                             "it is made for another model family")


CACHE_SIZE = 8  # LoRAs kept between generations (one generation's worth); CPU memory, about their files' size


class LoRACache(OrderedDict):
    """Loaded LoRAs by (name, path, mtime, model id), least recently used first out, at most
    ``CACHE_SIZE``, kept until the file or the model changes: a checkpoint change drops every
    entry of the old model. Every host family keeps its loaded LoRAs in one."""

    def load(self, name: str, path: str, mtime: float, model: Any, build: Callable[[], Any]) -> Any:
        key = (name, path, mtime, id(model))
        if key in self:
            self.move_to_end(key)
            return self[key]
        for old in [k for k in self if k[0] == name or k[3] != id(model)]:
            del self[old]
        self[key] = build()
        while len(self) > CACHE_SIZE:
            self.popitem(last=False)
        return self[key]
