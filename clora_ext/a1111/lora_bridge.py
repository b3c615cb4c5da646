"""LoRAs through the host's built-in Lora extension (host-facing).

Every file is parsed by the host's own loader (``networks.load_network``: LoRA,
LoCon, LoHa, LoKr, IA3, OFT, full, GLoRA, ...) into a Network object of our own,
never put in the host's cache. Its UNet modules become per-row deltas for the
core's RowRouter: plain two-factor LoRA stays low-rank, every other module type is
materialised with the host's ``calc_updown``. Its text-encoder part is applied by
the host itself: the Network is put into ``networks.loaded_networks`` while a
variant is encoded. Files the host cannot map (diffusers/PEFT keys) go through the
core's reader instead; their text-encoder deltas are routed onto every row of the
encoder for the duration of an encoding.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from modules import extra_networks, shared

from ..lora_file import LoRAFileError, map_lora, read_lora_file
from ..routing import Delta, DenseDelta, LowRankDelta, Route, RowRouter
from .plan import CLoRARuntimeError, suggest_names


def networks() -> Any:
    """The built-in Lora extension's ``networks`` module (loaded by the host with that extension)."""
    try:
        return importlib.import_module("networks")
    except ImportError:
        raise CLoRARuntimeError("CLoRA needs the built-in Lora extension, which is disabled") from None


def lora_names() -> list[str]:
    return sorted(networks().available_networks, key=str.lower)


def refresh() -> None:
    networks().list_available_networks()


def on_disk(name: str) -> Any:
    nets = networks()
    found = nets.available_networks.get(name) or nets.available_network_aliases.get(name)
    if found is None:
        nets.list_available_networks()
        found = nets.available_networks.get(name) or nets.available_network_aliases.get(name)
    if found is None:
        raise CLoRARuntimeError(f"CLoRA: LoRA {name!r} is not installed; {suggest_names(name, lora_names())}")
    if not found.filename.lower().endswith(".safetensors"):  # the host would unpickle .pt/.ckpt
        raise CLoRARuntimeError(f"CLoRA: LoRA {name!r} is not a .safetensors file; CLoRA never unpickles files")
    return found


def activation_text(name: str) -> str:
    """The LoRA's "activation text" user metadata (the .json beside the file), or ''."""
    try:
        entry = on_disk(name)
    except CLoRARuntimeError:
        return ""
    return str(extra_networks.get_user_metadata(entry.filename).get("activation text", "") or "")


@dataclass
class HostLoRA:
    """One LoRA file, ready for per-row UNet routing and for text-encoder activation."""

    name: str
    mtime: float
    unet: dict[str, Delta] = field(default_factory=dict)  # UNet module name -> delta at multiplier 1
    te_network: Any = None  # host Network whose text-encoder modules the host merges while encoding
    te_deltas: dict[str, Delta] = field(default_factory=dict)  # reader fallback: encoder module name -> delta
    skipped: int = 0  # modules the router cannot target (norm layers)


_cache: dict[tuple, HostLoRA] = {}


def load(name: str) -> HostLoRA:
    """The LoRA ``name`` for the current model; cached until the file or the model changes."""
    entry = on_disk(name)
    model = shared.sd_model
    _check_version(entry, model)
    mtime = os.path.getmtime(entry.filename)
    key = (name, entry.filename, mtime, id(model))
    if key not in _cache:
        for old in [k for k in _cache if k[0] == name or k[3] != id(model)]:
            del _cache[old]
        _cache[key] = _load(name, entry, mtime, model)
    return _cache[key]


def _check_version(entry: Any, model: Any) -> None:
    version = getattr(getattr(entry, "sd_version", None), "name", "Unknown")
    family = "SDXL" if model.is_sdxl else "SD2" if model.is_sd2 else "SD1"
    if version not in ("Unknown", family):
        raise CLoRARuntimeError(f"CLoRA: LoRA {entry.name!r} is made for {version}, but the loaded model is {family}")


def _load(name: str, entry: Any, mtime: float, model: Any) -> HostLoRA:
    unet_root = model.model.diffusion_model
    param = next(unet_root.parameters())
    try:
        net = networks().load_network(name, entry)
    except Exception as e:  # the host's reader: safetensors errors, unknown module types, ...
        raise CLoRARuntimeError(f"CLoRA: LoRA {name!r} cannot be read ({type(e).__name__}: {e}); is the file complete?") from None
    net.te_multiplier = net.unet_multiplier = 1.0  # our own object: multipliers go on the routes
    lora = HostLoRA(name, mtime)
    if net.modules:
        names = {id(m): n for n, m in unet_root.named_modules()}
        for module in net.modules.values():
            target = module.sd_module
            _check_fits(name, module, target)
            if id(target) not in names:
                lora.te_network = net  # a text-encoder module: the host applies it while encoding
                continue
            if not isinstance(target, (nn.Linear, nn.Conv2d)):
                lora.skipped += 1
                continue
            lora.unet[names[id(target)]] = _delta(module, target).to(param.device, param.dtype)
    else:
        _load_with_reader(lora, entry, model)
    if lora.skipped:
        print(f"CLoRA: LoRA {name!r}: {lora.skipped} module(s) on normalisation layers cannot be routed per row and are left out")
    if not lora.unet and lora.te_network is None and not lora.te_deltas:
        raise CLoRARuntimeError(f"CLoRA: LoRA {name!r} has no layer that matches the loaded model")
    return lora


def _check_fits(name: str, module: Any, target: nn.Module) -> None:
    """Refuse a LoRA whose layer shapes do not fit the model (another model family).

    The host matches keys by name only (an SDXL LoRA's ``input_blocks_4`` keys exist in
    SD1.5 too) and, when merging, logs and skips what does not fit; routing would fail
    mid-sampling instead.
    """
    weight = getattr(target, "weight", None)
    if weight is None:
        return
    detail = ""
    if type(module).__name__ == "NetworkModuleLora":
        up, down = module.up_model.weight, module.down_model.weight
        fits = up.shape[0] == weight.shape[0] and down.shape[1] == weight.shape[1]
        detail = f": out x in is {weight.shape[0]}x{weight.shape[1]} in the model, {up.shape[0]}x{down.shape[1]} in the LoRA"
    else:
        try:
            with torch.no_grad():
                module.calc_updown(weight)
            fits = True
        except RuntimeError:
            fits = False
    if not fits:
        family = "SDXL" if shared.sd_model.is_sdxl else "SD2" if shared.sd_model.is_sd2 else "SD1.x"
        raise CLoRARuntimeError(
            f"CLoRA: LoRA {name!r} does not fit the loaded {family} model (layer {module.sd_key}{detail}); "
            "it is made for another model family"
        )


def _delta(module: Any, target: nn.Module) -> Delta:
    """Plain LoRA stays low-rank; anything else (CP mid, bias, LoHa, LoKr, OFT, ...) goes dense."""
    if type(module).__name__ == "NetworkModuleLora" and module.mid_model is None and module.bias is None:
        return LowRankDelta(
            down=module.down_model.weight.detach(), up=module.up_model.weight.detach(), scale=float(module.calc_scale())
        )
    with torch.no_grad():
        updown, ex_bias = module.calc_updown(target.weight)
    return DenseDelta(updown.detach().reshape(target.weight.shape), None if ex_bias is None else ex_bias.detach())


def _load_with_reader(lora: HostLoRA, entry: Any, model: Any) -> None:
    if not model.is_sd1:
        raise CLoRARuntimeError(
            f"CLoRA: the host cannot read LoRA {lora.name!r}, and the fallback reader handles SD1.x files only"
        )
    try:
        weights = read_lora_file(entry.filename)
        mapped = map_lora(weights, model.model.diffusion_model, text_encoder=model.cond_stage_model.wrapped.transformer)
    except LoRAFileError as e:
        raise CLoRARuntimeError(f"CLoRA: {e}") from None
    param = next(model.model.diffusion_model.parameters())
    lora.unet = {k: d.to(param.device, param.dtype) for k, d in mapped.unet.items()}
    lora.te_deltas = dict(mapped.text_encoder)


@contextlib.contextmanager
def text_encoder_loras(uses: Sequence[tuple[HostLoRA, float]]) -> Iterator[None]:
    """Text-encoder parts of ``uses`` [(lora, te_weight)] active on top of the prompt's own LoRAs."""
    loaded = networks().loaded_networks
    saved = list(loaded)
    routes = [Route(lora.te_deltas, [0], weight, lora.name) for lora, weight in uses if lora.te_deltas]
    # batch_rows=1: the router repeats row 0's route over every row the encoder sees
    router = RowRouter(shared.sd_model.cond_stage_model.wrapped.transformer) if routes else None
    try:
        for lora, weight in uses:
            if lora.te_network is not None:
                lora.te_network.te_multiplier = weight
                loaded.append(lora.te_network)
        if router is not None:
            router.set_routes(routes, 1)
        yield
    finally:
        if router is not None:
            router.remove()
        loaded[:] = saved  # in place: the host holds this list
