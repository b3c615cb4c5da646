"""LoRAs through the Forge host's own loader (Neo, Forge 2.x, reForge, Classic), read into the core's per-row deltas (host-facing).

A file is parsed by the host's ``load_lora`` with its own UNet and CLIP key maps (kohya,
diffusers and PEFT names). UNet adapters become deltas for the core's RowRouter,
keyed by module name in the diffusion model: plain LoRA stays low-rank, anything else
is built by the adapter's own ``calculate_weight`` once per routed pass. CLIP adapters
stay the host's own objects (adapters or tuples, as its reader makes them): they are added to a clone of
the CLIP patcher while a variant is encoded. The concept LoRAs are never applied to the UNet weights.
Listing and lookup (``on_disk``) are the Lora extension's, shared with the A1111 glue.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..routing import Delta, LazyDelta, LowRankDelta
from ..a1111 import host as webui
from ..a1111.lora_bridge import LoRACache, on_disk
from ..a1111.plan import CLoRARuntimeError
from . import host

PREFIX, SUFFIX = "diffusion_model.", ".weight"


@dataclass
class ForgeLoRA:
    name: str
    path: str
    mtime: float
    unet: dict[str, Delta] = field(default_factory=dict)  # diffusion-model module name -> delta at strength 1
    clip: dict = field(default_factory=dict)  # the host's CLIP patches, for the CLIP patcher


_cache = LoRACache()


def load(name: str, p: Any) -> ForgeLoRA:
    entry = on_disk(name)
    path = webui.lora_path(entry)
    mtime = os.path.getmtime(path)
    model = p.sd_model
    return _cache.load(name, path, mtime, model, lambda: _load(name, path, mtime, p))


def _load(name: str, path: str, mtime: float, p: Any) -> ForgeLoRA:
    try:
        state = host.load_lora_file(path)
        unet, clip, unmatched = host.lora_patches(state, p)
    except Exception as e:  # the host's reader
        raise CLoRARuntimeError(f"CLoRA: LoRA {name!r} cannot be read ({type(e).__name__}: {e}); is the file complete?") from None
    if not unet and not clip:
        raise CLoRARuntimeError(f"CLoRA: LoRA {name!r} has no layer that matches the loaded model")
    lora = ForgeLoRA(name, path, mtime, clip=clip)
    for key, adapter in unet.items():
        if not (key.startswith(PREFIX) and key.endswith(SUFFIX)):
            continue
        module = key[len(PREFIX):-len(SUFFIX)]
        weight = host.model_parameter(p, key)
        read = host.read_adapter(key, adapter, p)
        _check_fits(name, module, read, weight, p)
        lora.unet[module] = _delta(read, weight)
    if unmatched:
        print(f"CLoRA: LoRA {name!r}: {unmatched} key(s) match no layer of the loaded model and are left out")
    return lora


def _check_fits(name: str, module: str, adapter: host.Adapter, weight: torch.Tensor, p: Any) -> None:
    """Refuse a LoRA made for another model family. The host matches keys by name only (an SD1.x
    file's ``down_blocks_1`` keys exist in SDXL too, with other widths) and its merge skips what does
    not fit; a routed layer that does not fit would fail mid-sampling instead."""
    if adapter.kind != "lora" or adapter.up is None or adapter.down is None or weight.dim() < 2:
        return
    factors = (adapter.up.shape[0], adapter.down.shape[1])
    if factors != tuple(weight.shape[:2]):
        raise CLoRARuntimeError(
            f"CLoRA: LoRA {name!r} does not fit the loaded {host.model_family(p)} model (layer {module}: out x in is "
            f"{weight.shape[0]}x{weight.shape[1]} in the model, {factors[0]}x{factors[1]} in the LoRA); "
            "it is made for another model family")


def _delta(adapter: host.Adapter, weight: torch.Tensor) -> Delta:
    if adapter.kind == "lora" and adapter.plain and weight.dim() == 2:
        down, up = adapter.down.detach(), adapter.up.detach()
        if up.shape[0] == weight.shape[0] and down.shape[1] == weight.shape[1]:
            scale = adapter.alpha / down.shape[0] if adapter.alpha is not None else 1.0
            return LowRankDelta(down=down, up=up, scale=scale)
    return LazyDelta(functools.partial(_dense, adapter, weight))


def _dense(adapter: host.Adapter, weight: torch.Tensor) -> tuple[torch.Tensor, None]:
    return adapter.delta(weight).reshape(weight.shape), None


def on_device(deltas: dict[str, Delta], device: torch.device, dtype: torch.dtype) -> dict[str, Delta]:
    return {k: d if isinstance(d, LazyDelta) else d.to(device, dtype) for k, d in deltas.items()}


def clear_cache() -> None:
    _cache.clear()
