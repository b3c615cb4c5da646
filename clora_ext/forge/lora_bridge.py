"""LoRAs through the Forge host's own loader (Neo, Forge 2.x, reForge, Classic), read into the core's per-row deltas (host-facing).

A file is parsed by the host's ``load_lora`` with its own UNet and CLIP key maps (kohya,
diffusers and PEFT names). UNet adapters become deltas for the core's RowRouter,
keyed by module name in the diffusion model: LoRA, LoCon, LoHa and LoKr are routed from
their factors (``formats``, shared with the A1111 glue); anything else is built dense by the
host's own merge once per routed pass, never inside the functional gradient pass. CLIP adapters
stay the host's own objects (adapters or tuples, as its reader makes them): they are added to a clone of
the CLIP patcher while a variant is encoded. The concept LoRAs are never applied to the UNet weights.
Listing and lookup (``on_disk``) are the Lora extension's, shared with the A1111 glue.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .. import formats
from ..routing import Delta, LazyDelta
from ..webui import host as webui
from ..webui.loras import LoRACache, made_for_another_family, on_disk
from ..webui.plan import CLoRARuntimeError
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
        lora.unet[module] = _delta(name, module, read, weight, host.diffusion_module(p, module))
    if unmatched:
        print(f"CLoRA: LoRA {name!r}: {unmatched} key(s) match no layer of the loaded model and are left out")
    return lora


def _check_fits(name: str, module: str, adapter: host.Adapter, weight: torch.Tensor, p: Any) -> None:
    """Refuse a LoRA made for another model family, where its factors tell the layer's size."""
    if adapter.factors is None or weight.dim() < 2:
        return
    factors = formats.factor_shape(adapter.factors, weight.shape)
    if factors is not None and factors != tuple(weight.shape[:2]):
        raise made_for_another_family(name, host.model_family(p), module, weight.shape, factors)


def _delta(name: str, module_name: str, adapter: host.Adapter, weight: torch.Tensor,
           module: torch.nn.Module | None) -> Delta:
    """The factored form of ``formats.routed_delta`` where the format has one; otherwise the host's
    own merge, built dense once per routed pass (and before a functional gradient pass: the
    engine builds it outside the transform, where the host's in-place merge works)."""
    if adapter.factors is not None:
        grouped = isinstance(module, torch.nn.Conv2d) and module.groups != 1
        routed = formats.routed_delta(adapter.factors, weight.shape, grouped)
        if routed is not None:
            return routed
    return LazyDelta(functools.partial(_dense, name, module_name, adapter, weight))


def _dense(name: str, module: str, adapter: host.Adapter, weight: torch.Tensor) -> tuple[torch.Tensor, None]:
    """The host's merge of one layer. Its adapters log a failure and return the weight unchanged
    (the layer would silently get no delta): a logged error, like a raised one, refuses the request."""
    with _logged_errors() as errors:
        try:
            delta = adapter.delta(weight)
        except Exception as e:  # noqa: BLE001 - the host's merge
            errors.append(f"{type(e).__name__}: {e}")
    if errors:
        raise CLoRARuntimeError(f"CLoRA: LoRA {name!r} cannot act on layer {module} ({adapter.kind}): the host's merge "
                                f"failed ({' '.join(errors[0].split())[:200]})")
    return delta.reshape(weight.shape), None


class _ErrorRecords(logging.Handler):
    def __init__(self, sink: list[str]):
        super().__init__(logging.ERROR)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


@contextlib.contextmanager
def _logged_errors() -> Iterator[list[str]]:
    """The messages of the ERROR records logged (on the root logger) inside the block."""
    errors: list[str] = []
    handler = _ErrorRecords(errors)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield errors
    finally:
        root.removeHandler(handler)


def clear_cache() -> None:
    _cache.clear()
