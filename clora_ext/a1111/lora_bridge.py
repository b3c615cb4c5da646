"""LoRAs through the host's built-in Lora extension (host-facing).

Every file is parsed by the host's own loader (``networks.load_network``: LoRA,
LoCon, LoHa, LoKr, IA3, OFT, full, GLoRA, ...) into a Network object of our own,
never put in the host's cache. Its UNet modules become per-row deltas for the
core's RowRouter: plain two-factor LoRA stays low-rank, LoHa becomes an exact low-rank
delta, LoKr is applied through its Kronecker factors, and every other
module type is built with the host's ``calc_updown`` once per routed pass. The cache
between generations holds factors on the CPU; each generation copies them to the device
and drops the copies when it ends. Its text-encoder part is applied by
the host itself: the Network is put into ``networks.loaded_networks`` while a
variant is encoded. Files the host cannot map (diffusers/PEFT keys) go through the
core's reader instead; their text-encoder deltas are routed onto every row of the
encoder for the duration of an encoding.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from ..lora_file import LoRAFileError, map_lora, read_lora_file
from .. import formats
from ..routing import Delta, LazyDelta, Route, RowRouter, routable
from ..webui import host as webui
from ..webui.loras import LoRACache, made_for_another_family, on_disk
from ..webui.plan import CLoRARuntimeError
from . import host


@dataclass
class HostLoRA:
    """One LoRA file, ready for per-row UNet routing and for text-encoder activation."""

    name: str
    mtime: float
    unet: dict[str, Delta] = field(default_factory=dict)  # UNet module name -> delta at multiplier 1
    te_network: Any = None  # host Network whose text-encoder modules the host merges while encoding
    te_deltas: dict[str, Delta] = field(default_factory=dict)  # reader fallback: encoder module name -> delta
    skipped: int = 0  # modules the router cannot target (norm layers)


_cache = LoRACache()


def load(name: str) -> HostLoRA:
    """The LoRA ``name`` for the current model, its UNet deltas on the CPU.

    Cached (least recently used first out, at most ``CACHE_SIZE``) until the file or the
    model changes; a checkpoint change drops every entry of the old model.
    """
    entry = on_disk(name)
    model = host.sd_model()
    _check_version(name, entry, model)
    path = webui.lora_path(entry)
    mtime = os.path.getmtime(path)
    return _cache.load(name, path, mtime, model, lambda: _load(name, entry, mtime, model))


def _check_version(name: str, entry: Any, model: Any) -> None:
    version = host.lora_family(entry)
    family = host.model_family(model)
    if version not in ("Unknown", family):
        raise CLoRARuntimeError(f"CLoRA: LoRA {name!r} is made for {version}, but the loaded model is {family}")


def _load(name: str, entry: Any, mtime: float, model: Any) -> HostLoRA:
    unet_root = host.unet(model)
    try:
        net = host.load_network(name, entry)
    except Exception as e:  # the host's reader: safetensors errors, unknown module types, ...
        raise CLoRARuntimeError(f"CLoRA: LoRA {name!r} cannot be read ({type(e).__name__}: {e}); is the file complete?") from None
    lora = HostLoRA(name, mtime)
    modules = host.network_modules(net)
    unbuilt: list[str] = []  # layers whose merge fails in the host itself
    if modules:
        names = {id(m): n for n, m in unet_root.named_modules()}
        for module in modules:
            problem = _check_fits(name, module, model)
            if problem is not None:  # the host's own merge fails on this layer: the host leaves it out too
                unbuilt.append(f"{module.key} ({problem})")
                continue
            if id(module.target) not in names:
                lora.te_network = net  # a text-encoder module: the host applies it while encoding
                continue
            if not routable(module.target):
                lora.skipped += 1
                continue
            lora.unet[names[id(module.target)]] = _delta(module).cached()
    else:
        _load_with_reader(lora, entry, model)
    if lora.skipped:
        print(f"CLoRA: LoRA {name!r}: {lora.skipped} module(s) on normalisation layers cannot be routed per row and are left out")
    if unbuilt:
        print(f"CLoRA: LoRA {name!r}: {len(unbuilt)} layer(s) the host's Lora code cannot apply are left out, as the host "
              f"leaves them out (first: {unbuilt[0]})")
    if lora.te_network is not None:  # keep only the text-encoder modules the host applies; the UNet's are ours
        unet_ids = {id(m) for m in unet_root.modules()}
        host.keep_network_modules(net, lambda target: id(target) not in unet_ids)
    if not lora.unet and lora.te_network is None and not lora.te_deltas:
        if unbuilt:
            raise CLoRARuntimeError(f"CLoRA: LoRA {name!r}: the host's Lora code cannot apply any of its layers "
                                    f"(first: {unbuilt[0]})")
        raise CLoRARuntimeError(f"CLoRA: LoRA {name!r} has no layer that matches the loaded model")
    return lora


def _check_fits(name: str, module: host.NetworkModule, model: Any) -> str | None:
    """Refuse a LoRA whose layer shapes do not fit the model (another model family). Where the factors
    do not tell the layer's size, the host's own merge of that layer is tried: the host's error if it
    fails (a layer the host cannot apply, e.g. IA3 on a 3x3 conv, is left out by the host too; a file
    whose every layer fails is refused with the host's reason)."""
    weight = getattr(module.target, "weight", None)
    if weight is None:
        return None
    factors = formats.factor_shape(_factors(module), weight.shape)  # (out, in), without building the delta
    if factors is None:
        try:
            with torch.no_grad():
                module.updown(weight)
        except RuntimeError as e:
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return None
    if factors != (weight.shape[0], weight.shape[1]):
        raise made_for_another_family(name, host.model_family(model), module.key, weight.shape, factors)
    return None


def _factors(module: host.NetworkModule) -> formats.Factors:
    return formats.Factors(module.kind, module.factors, module.scale, module.plain)


def _delta(module: host.NetworkModule) -> Delta:
    """The cheapest exact form of one host module's weight delta (multiplier 1): the factored forms
    of ``formats.routed_delta``; anything else (CP/Tucker factors, bias or DoRA terms, OFT, full,
    IA3, ...) is built by the host's ``calc_updown`` once per routed pass."""
    target = module.target
    grouped = isinstance(target, nn.Conv2d) and target.groups != 1
    routed = formats.routed_delta(_factors(module), target.weight.shape, grouped)
    return routed if routed is not None else LazyDelta(functools.partial(_build_dense, module))


def _build_dense(module: host.NetworkModule) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = module.target.weight
    with torch.no_grad():
        updown, ex_bias = module.updown(weight)
    return updown.detach().reshape(weight.shape), None if ex_bias is None else ex_bias.detach()


def _load_with_reader(lora: HostLoRA, entry: Any, model: Any) -> None:
    if host.model_family(model) != "SD1":
        raise CLoRARuntimeError(
            f"CLoRA: the host cannot read LoRA {lora.name!r}, and the fallback reader handles SD1.x files only"
        )
    try:
        weights = read_lora_file(webui.lora_path(entry))
        mapped = map_lora(weights, host.unet(model), text_encoder=host.text_encoder(model))
    except LoRAFileError as e:
        raise CLoRARuntimeError(f"CLoRA: {e}") from None
    lora.unet = {k: d.cached() for k, d in mapped.unet.items()}
    lora.te_deltas = dict(mapped.text_encoder)


@contextlib.contextmanager
def text_encoder_loras(uses: Sequence[tuple[HostLoRA, float]]) -> Iterator[None]:
    """Text-encoder parts of ``uses`` [(lora, te_weight)] active on top of the prompt's own LoRAs."""
    routes = [Route(lora.te_deltas, [0], weight, lora.name) for lora, weight in uses if lora.te_deltas]
    # batch_rows=1: the router repeats row 0's route over every row the encoder sees
    router = RowRouter(host.text_encoder(host.sd_model())) if routes else None
    nets = [(lora.te_network, weight) for lora, weight in uses if lora.te_network is not None]
    try:
        if router is not None:
            router.set_routes(routes, 1)
        with host.text_encoder_networks(nets):
            yield
    finally:
        if router is not None:
            router.remove()


def clear_cache() -> None:
    _cache.clear()
