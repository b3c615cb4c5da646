"""Random LoRA files for tests, the demo and the benchmark, in kohya and diffusers/PEFT layouts.

kohya files for SD1.x name UNet layers the diffusers way, flattened with underscores
(``lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn2_to_k``), and text
encoder layers after transformers' CLIP (``lora_te_text_model_encoder_layers_0_...``).
PEFT files (what diffusers' training scripts publish) use dotted names with a
``unet.`` / ``text_encoder.`` prefix and ``lora_A`` / ``lora_B``.
"""

from __future__ import annotations

import os
import re

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..lora_file import ldm_to_diffusers

# the layers a typical SD1.5 LoRA trains: attention projections, feed-forward, proj_in/out
UNET_TARGETS = re.compile(r"(attn[12]\.(to_[qkv]|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out)$")
# LoCon also trains the ResBlock convs
LOCON_TARGETS = re.compile(r"(in_layers\.2|out_layers\.3)$")
TE_TARGETS = re.compile(r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$")


def _factors(module: nn.Module, rank: int, gen: torch.Generator, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    w = module.weight
    out_ch, in_ch = w.shape[0], w.shape[1]
    kernel = tuple(w.shape[2:]) if w.dim() == 4 else ()
    down = torch.randn((rank, in_ch, *kernel), generator=gen) / (in_ch * max(1, w[0, 0].numel())) ** 0.5
    up_shape = (out_ch, rank, 1, 1) if kernel else (out_ch, rank)
    # scaled relative to the layer's own weight so the LoRA visibly changes the output
    up = torch.randn(up_shape, generator=gen) * strength * float(w.detach().float().std())
    return down.contiguous(), up.contiguous()


def lora_targets(root: nn.Module, pattern: re.Pattern[str]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in root.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and pattern.search(n)]


def kohya_unet_key(ldm_name: str, unet_naming: str = "diffusers") -> str:
    """kohya key of an ldm UNet module (diffusers naming by default, as SD1.x kohya files use)."""
    dotted = ldm_to_diffusers(ldm_name) if unet_naming == "diffusers" else ldm_name
    if dotted is None:
        raise ValueError(f"{ldm_name!r} has no diffusers name")
    return "lora_unet_" + dotted.replace(".", "_")


def kohya_te_key(name: str, prefix: str = "lora_te_") -> str:
    """kohya key of a transformers CLIP text-encoder module (``text_model.encoder...``); SDXL files
    name their two encoders ``lora_te1_`` (clip_l) and ``lora_te2_`` (clip_g)."""
    return prefix + name.replace(".", "_")


def put_kohya(tensors: dict[str, torch.Tensor], key: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> None:
    """Add one module's kohya tensors (``lora_down``, ``lora_up``, ``alpha``) to ``tensors``."""
    tensors[f"{key}.lora_down.weight"] = down
    tensors[f"{key}.lora_up.weight"] = up
    tensors[f"{key}.alpha"] = torch.tensor(float(alpha))


def write_kohya_lora(
    path: str | os.PathLike,
    unet: nn.Module,
    text_encoder: nn.Module | None = None,
    seed: int = 0,
    rank: int = 4,
    alpha: float = 2.0,
    strength: float = 1.0,
    conv: bool = False,
    unet_naming: str = "diffusers",
    text_encoders: dict[str, nn.Module] | None = None,
) -> str:
    """Write a kohya LoRA (LoCon with ``conv=True``) for ``unet`` / ``text_encoder``; returns the path.
    ``text_encoders`` ({kohya prefix: encoder}) names several encoders, as SDXL files do
    (``{"lora_te1_": clip_l, "lora_te2_": clip_g}``, with ``unet_naming="ldm"``)."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    pattern = re.compile(f"{UNET_TARGETS.pattern}|{LOCON_TARGETS.pattern}") if conv else UNET_TARGETS
    for name, module in lora_targets(unet, pattern):
        put_kohya(tensors, kohya_unet_key(name, unet_naming), *_factors(module, rank, gen, strength), alpha)
    encoders = dict(text_encoders or {})
    if text_encoder is not None:
        encoders["lora_te_"] = text_encoder
    for prefix, encoder in encoders.items():
        for name, module in lora_targets(encoder, TE_TARGETS):
            put_kohya(tensors, kohya_te_key(name, prefix), *_factors(module, rank, gen, strength), alpha)
    path = os.fspath(path)
    save_file(tensors, path, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})
    return path


def write_peft_lora(
    path: str | os.PathLike,
    unet: nn.Module,
    text_encoder: nn.Module | None = None,
    seed: int = 0,
    rank: int = 4,
    strength: float = 1.0,
) -> str:
    """Write a diffusers/PEFT LoRA (``unet.<diffusers name>.lora_A.weight``; scale 1)."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in lora_targets(unet, UNET_TARGETS):
        down, up = _factors(module, rank, gen, strength)
        key = f"unet.{ldm_to_diffusers(name)}"
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down, up
    if text_encoder is not None:
        for name, module in lora_targets(text_encoder, TE_TARGETS):
            down, up = _factors(module, rank, gen, strength)
            tensors[f"text_encoder.{name}.lora_A.weight"], tensors[f"text_encoder.{name}.lora_B.weight"] = down, up
    path = os.fspath(path)
    save_file(tensors, path)
    return path
