"""Reading LoRA files into per-module deltas (kohya LoRA/LoCon and diffusers/PEFT, SD1.x).

Files are read with safetensors only; nothing is ever unpickled. Keys of every
supported naming scheme are reduced to one flat form, ``lora_unet_<module>`` or
``lora_te_<module>`` with dots as underscores, and matched against the flat names
of the model's own modules, both in ldm naming and in diffusers naming (kohya files
for SD1.x use diffusers names; A1111 runs ldm modules).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn as nn

from .routing import Delta, LowRankDelta, routable


class LoRAFileError(ValueError):
    """A LoRA file that cannot be used: unreadable, unknown format, or for another model."""


@dataclass
class LoRAWeights:
    """Low-rank deltas of one file, keyed by flat module key (``lora_unet_...`` / ``lora_te_...``)."""

    name: str
    deltas: dict[str, LowRankDelta]
    format: str  # "kohya" or "peft"

    @property
    def unet_keys(self) -> list[str]:
        return [k for k in self.deltas if k.startswith("lora_unet_")]

    @property
    def te_keys(self) -> list[str]:
        return [k for k in self.deltas if k.startswith("lora_te_")]


@dataclass
class MappedLoRA:
    """A LoRA's deltas keyed by the model's own module names."""

    name: str
    unet: dict[str, Delta] = field(default_factory=dict)
    text_encoder: dict[str, Delta] = field(default_factory=dict)


# -- reading ------------------------------------------------------------------------------

_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha"}
_PEFT_PARTS = {
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down",
    "lora_linear_layer.up.weight": "up",
    "alpha": "alpha",
}
_PROCESSOR = re.compile(r"\.processor\.(to_[qkv]|to_out)_lora\.(down|up)\.weight$")


def _split_kohya(key: str) -> tuple[str, str] | None:
    for suffix, part in _KOHYA_PARTS.items():
        if key.endswith("." + suffix) and key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")):
            return key[: -len(suffix) - 1], part
    return None


def _flat(prefix: str, dotted: str) -> str:
    return prefix + dotted.replace(".", "_")


def _split_peft(key: str) -> tuple[str, str] | None:
    """Diffusers/PEFT keys -> (flat module key, part)."""
    m = _PROCESSOR.search(key)
    if m:  # old attention-processor form: ...attn1.processor.to_q_lora.down.weight
        proj = "to_out.0" if m.group(1) == "to_out" else m.group(1)
        module, part = key[: m.start()] + "." + proj, m.group(2)
    else:
        for suffix, p in _PEFT_PARTS.items():
            if key.endswith("." + suffix):
                module, part = key[: -len(suffix) - 1], p
                break
        else:
            return None
    if module.startswith("text_encoder."):
        return _flat("lora_te_", module[len("text_encoder.") :]), part
    if module.startswith("unet."):
        module = module[len("unet.") :]
    return _flat("lora_unet_", module), part


def read_lora_file(path: str | os.PathLike) -> LoRAWeights:
    """Read a kohya or diffusers/PEFT LoRA ``.safetensors`` file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    name = os.path.splitext(os.path.basename(path))[0]
    if not path.lower().endswith(".safetensors"):
        raise LoRAFileError(f"LoRA {name!r}: only .safetensors files are read (got {os.path.basename(path)!r})")
    try:
        if os.path.getsize(path) == 0:
            raise LoRAFileError(f"LoRA {name!r}: the file is empty")
        tensors = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if isinstance(e, LoRAFileError):
            raise
        raise LoRAFileError(f"LoRA {name!r}: not a readable safetensors file ({e})") from e
    return lora_from_state_dict(name, tensors)


def lora_from_state_dict(name: str, tensors: Mapping[str, torch.Tensor]) -> LoRAWeights:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    kohya = any(_split_kohya(k) for k in tensors)
    split = _split_kohya if kohya else _split_peft
    for key, value in tensors.items():
        found = split(key)
        if found is not None:
            module, part = found
            parts.setdefault(module, {})[part] = value
    deltas: dict[str, LowRankDelta] = {}
    for module, p in parts.items():
        if "down" not in p or "up" not in p:
            continue  # alpha alone, or a format whose parts we do not know
        down, up = p["down"].float(), p["up"].float()
        rank = down.shape[0]
        alpha = float(p["alpha"].float().reshape(-1)[0]) if "alpha" in p else float(rank)
        deltas[module] = LowRankDelta(down=down, up=up, scale=alpha / rank, mid=p["mid"].float() if "mid" in p else None)
    if not deltas:
        raise LoRAFileError(
            f"LoRA {name!r}: no LoRA/LoCon weights found (expected kohya lora_down/lora_up or PEFT lora_A/lora_B keys)"
        )
    return LoRAWeights(name=name, deltas=deltas, format="kohya" if kohya else "peft")


# -- ldm <-> diffusers names for SD1.x-like UNets ------------------------------------------------

_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


def _resnet(rest: str) -> str | None:
    for ldm, diffusers in _RESNET.items():
        if rest == ldm:
            return diffusers
    return None


def ldm_to_diffusers(name: str, num_res_blocks: int = 2) -> str | None:
    """Diffusers name of an ldm UNet module (``input_blocks.7.1.transformer_blocks.0.attn2.to_k`` ->
    ``down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k``); None where there is none."""
    if name in _TOP:
        return _TOP[name]
    per_level = num_res_blocks + 1
    m = re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", name)
    if m:
        block, layer, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        level, j = divmod(block - 1, per_level)
        if j == num_res_blocks:
            return f"down_blocks.{level}.downsamplers.0.conv" if rest == "op" else None
        if layer == 0:
            r = _resnet(rest)
            return f"down_blocks.{level}.resnets.{j}.{r}" if r else None
        return f"down_blocks.{level}.attentions.{j}.{rest}"
    m = re.fullmatch(r"middle_block\.(\d)\.(.+)", name)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        if layer == 1:
            return f"mid_block.attentions.0.{rest}"
        r = _resnet(rest)
        return f"mid_block.resnets.{layer // 2}.{r}" if r else None
    m = re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", name)
    if m:
        block, layer, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        level, j = divmod(block, per_level)
        if layer == 0:
            r = _resnet(rest)
            return f"up_blocks.{level}.resnets.{j}.{r}" if r else None
        if rest == "conv":  # Upsample, after the attention if the level has one
            return f"up_blocks.{level}.upsamplers.0.conv"
        return f"up_blocks.{level}.attentions.{j}.{rest}"
    return None


def _lora_targets(root: nn.Module, prefix: str, diffusers_names: bool, num_res_blocks: int) -> dict[str, str]:
    """Flat LoRA key -> module name, for every Linear/Conv2d under ``root``."""
    keys: dict[str, str] = {}
    for name, module in root.named_modules():
        if not routable(module):
            continue
        keys[_flat(prefix, name)] = name
        if diffusers_names:
            alt = ldm_to_diffusers(name, num_res_blocks)
            if alt is not None:
                keys[_flat(prefix, alt)] = name
    return keys


def map_lora(
    lora: LoRAWeights,
    unet: nn.Module,
    text_encoder: nn.Module | None = None,
    num_res_blocks: int = 2,
) -> MappedLoRA:
    """Key a file's deltas to the model's module names; every key must find its module.

    ``text_encoder`` is the CLIP text model whose module names start with ``text_model.``
    (A1111: ``sd_model.cond_stage_model.transformer``).
    """
    unet_keys = _lora_targets(unet, "lora_unet_", True, num_res_blocks)
    te_keys = _lora_targets(text_encoder, "lora_te_", False, num_res_blocks) if text_encoder is not None else {}
    unet_modules = dict(unet.named_modules())
    te_modules = dict(text_encoder.named_modules()) if text_encoder is not None else {}
    mapped = MappedLoRA(lora.name)
    unmatched: list[str] = []
    for key, delta in lora.deltas.items():
        if key in unet_keys:
            name = unet_keys[key]
            _check_shape(lora.name, key, delta, unet_modules[name])
            mapped.unet[name] = delta
        elif key in te_keys:
            name = te_keys[key]
            _check_shape(lora.name, key, delta, te_modules[name])
            mapped.text_encoder[name] = delta
        elif key.startswith("lora_te") and text_encoder is None:
            continue
        else:
            unmatched.append(key)
    if unmatched:
        example = ", ".join(sorted(unmatched)[:3])
        raise LoRAFileError(
            f"LoRA {lora.name!r}: {len(unmatched)} of {len(lora.deltas)} layers match no layer of this model "
            f"(e.g. {example}); is it made for another model family (SD1.x vs SDXL)?"
        )
    return mapped


def _check_shape(lora_name: str, key: str, delta: LowRankDelta, module: nn.Module) -> None:
    out_features, in_features = module.weight.shape[0], module.weight.shape[1]
    if delta.up.shape[0] != out_features or delta.down.shape[1] != in_features:
        raise LoRAFileError(
            f"LoRA {lora_name!r}: layer {key} has shape {tuple(delta.up.shape[:1]) + tuple(delta.down.shape[1:2])} "
            f"but the model's layer is {out_features}x{in_features}; is it made for another model family?"
        )
