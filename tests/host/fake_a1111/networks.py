"""The built-in Lora extension's ``networks`` module, as the glue uses it (written for these tests).

Files are kohya-style safetensors: ``<key>.lora_up/lora_down.weight`` (LoRA, LoCon),
``<key>.hada_w1_a ...`` (LoHa), ``<key>.lokr_w1/lokr_w2`` (LoKr), each with ``.alpha``.
Keys name UNet modules the diffusers way (``lora_unet_down_blocks_...``) and text
encoder modules by transformers' CLIP names (``lora_te_text_model_...``). The text
encoder merges ``loaded_networks`` while a prompt is encoded, as the host's patched
Linear layers do.
"""

from __future__ import annotations

import contextlib
import enum
import os
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open

from modules import shared

lora_dir = ""
available_networks: dict[str, "NetworkOnDisk"] = {}
available_network_aliases: dict[str, "NetworkOnDisk"] = {}
loaded_networks: list["Network"] = []


class SdVersion(enum.Enum):
    Unknown = 1
    SD1 = 2
    SD2 = 3
    SDXL = 4


class NetworkOnDisk:
    def __init__(self, name: str, filename: str):
        self.name = self.alias = name
        self.filename = filename
        with safe_open(filename, framework="pt") as f:
            base = (f.metadata() or {}).get("ss_base_model_version", "")
        self.sd_version = SdVersion.SDXL if base.startswith("sdxl") else SdVersion.SD1 if base.startswith("sd_v1") \
            else SdVersion.Unknown


def list_available_networks() -> None:
    available_networks.clear()
    available_network_aliases.clear()
    for file in sorted(os.listdir(lora_dir)) if lora_dir else []:
        name, ext = os.path.splitext(file)
        if ext in (".safetensors", ".pt"):
            entry = NetworkOnDisk(name, os.path.join(lora_dir, file))
            available_networks[name] = entry
            available_network_aliases[name] = entry


class Network:
    def __init__(self, name: str, entry: NetworkOnDisk):
        self.name = name
        self.network_on_disk = entry
        self.te_multiplier = 1.0
        self.unet_multiplier = 1.0
        self.modules: dict[str, Any] = {}
        self.mtime = os.path.getmtime(entry.filename)


class NetworkModule:
    def __init__(self, network: Network, w: dict[str, torch.Tensor], sd_key: str, sd_module: nn.Module):
        self.network = network
        self.sd_key = sd_key
        self.sd_module = sd_module
        self.alpha = float(w["alpha"]) if "alpha" in w else None
        self.dim = None
        self.bias = None
        if shared.features()["dora"]:  # 1.9+
            self.dora_scale = None

    def multiplier(self) -> float:
        te = self.sd_module in _te_modules()
        return self.network.te_multiplier if te else self.network.unet_multiplier

    def calc_scale(self) -> float:
        return self.alpha / self.dim if self.alpha is not None and self.dim else 1.0

    def calc_updown(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        updown = self.updown().to(target.dtype).reshape(target.shape)
        return updown * self.calc_scale() * self.multiplier(), None


def _layer(weight: torch.Tensor) -> nn.Module:
    if weight.dim() == 4:
        layer = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2:], bias=False)
    else:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data = weight
    return layer


class NetworkModuleLora(NetworkModule):
    def __init__(self, network, w, sd_key, sd_module):
        super().__init__(network, w, sd_key, sd_module)
        self.up_model = _layer(w["lora_up.weight"])
        self.down_model = _layer(w["lora_down.weight"])
        self.mid_model = None
        self.dim = w["lora_down.weight"].shape[0]

    def updown(self) -> torch.Tensor:
        up, down = self.up_model.weight, self.down_model.weight
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


class NetworkModuleHada(NetworkModule):
    def __init__(self, network, w, sd_key, sd_module):
        super().__init__(network, w, sd_key, sd_module)
        self.w1a, self.w1b = w["hada_w1_a"], w["hada_w1_b"]
        self.w2a, self.w2b = w["hada_w2_a"], w["hada_w2_b"]
        self.t1 = self.t2 = None
        self.dim = self.w1b.shape[0]

    def updown(self) -> torch.Tensor:
        return (self.w1a @ self.w1b) * (self.w2a @ self.w2b)


class NetworkModuleLokr(NetworkModule):
    def __init__(self, network, w, sd_key, sd_module):
        super().__init__(network, w, sd_key, sd_module)
        self.w1, self.w2 = w.get("lokr_w1"), w.get("lokr_w2")
        self.w1a = self.w1b = self.w2a = self.w2b = None
        self.t2 = None
        self.dim = None

    def updown(self) -> torch.Tensor:
        return torch.kron(self.w1, self.w2)


_KINDS = {"lora_up.weight": NetworkModuleLora, "hada_w1_a": NetworkModuleHada, "lokr_w1": NetworkModuleLokr}


def _te_modules() -> set:
    return set(shared.sd_model.cond_stage_model.transformer.modules())


def _module_names() -> dict[str, nn.Module]:
    from clora_ext.devtools.loras import kohya_te_key, kohya_unet_key

    model = shared.sd_model
    names = {}
    for name, module in model.model.diffusion_model.named_modules():
        try:
            names[kohya_unet_key(name)] = module
        except ValueError:
            pass
    for name, module in model.cond_stage_model.transformer.named_modules():
        names[kohya_te_key(name)] = module
    return names


def load_network(name: str, entry: NetworkOnDisk) -> Network:
    net = Network(name, entry)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(entry.filename, framework="pt") as f:
        for key in f.keys():
            module_key, _, part = key.partition(".")
            grouped.setdefault(module_key, {})[part] = f.get_tensor(key)
    targets = _module_names()
    for key, w in grouped.items():
        if key not in targets:
            raise KeyError(f"unmatched key {key}")
        kind = next(cls for part, cls in _KINDS.items() if part in w)
        net.modules[key] = kind(net, w, key, targets[key])
    return net


@contextlib.contextmanager
def applied(text_encoder: nn.Module):
    """``loaded_networks``' text-encoder modules merged into the encoder's weights."""
    inside = set(text_encoder.modules())
    saved = []
    with torch.no_grad():
        for net in loaded_networks:
            for module in net.modules.values():
                if module.sd_module in inside:
                    weight = module.sd_module.weight
                    saved.append((weight, weight.clone()))
                    weight += module.calc_updown(weight)[0]
    try:
        yield
    finally:
        with torch.no_grad():
            for weight, original in reversed(saved):
                weight.copy_(original)
