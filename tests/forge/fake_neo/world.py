"""The fake Neo's checkpoint: the tiny SD1.5-layout ldm UNet and CLIP text encoder, loaded as Neo
loads a model (weights as inference tensors, ``requires_grad`` off; as lllyasviel Forge 2.x does
with ``flavour="forge2"``: inference tensors that keep ``requires_grad=True``; as reForge and Forge
Classic do with ``flavour="reforge"``/``"classic"``: ordinary tensors with ``requires_grad=True``), behind Neo's objects:
``forge_objects`` (a UnetPatcher over a KModel, a CLIP patcher: reForge's with ComfyUI's
``add_patches``), the copies Neo resets them from, and the text processing engine (chunker and
encoder in one; reForge and Classic keep the chunker as A1111's ``cond_stage_model``)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from backend.modules.k_model import KModel
from backend.patcher.clip import CLIP
from backend.patcher.unet import UnetPatcher
from ldm_patched.modules.sd import CLIP as ReForgeCLIP
from clora_ext.devtools.pipeline import NoiseSchedule
from clora_ext.devtools.tiny_sd import BOS, EOS, build_tiny_text_encoder, build_tiny_unet, clip_bpe
from clora_ext.tokens import CHUNK_CONTENT


def load_as_inference(module: nn.Module, requires_grad_off: bool = True) -> nn.Module:
    """Every parameter and buffer of ``module`` replaced by an inference tensor of the same value;
    ``requires_grad`` switched off as Neo's KModel does, or left on (Forge 2.x's KModel does not)."""
    with torch.inference_mode():
        state = {k: v.clone() for k, v in module.state_dict().items()}
        module.load_state_dict(state, assign=True)
        if not requires_grad_off:  # nn.Parameter's default, which Forge 2.x's weights keep
            module.requires_grad_(True)
    if requires_grad_off:
        module.requires_grad_(False)
    return module


@dataclass
class ForgeObjects:
    unet: Any
    clip: Any
    vae: Any = None
    clipvision: Any = None

    def shallow_copy(self) -> "ForgeObjects":
        return copy.copy(self)


class Chunk:
    def __init__(self, tokens: list[int]):
        self.tokens = tokens
        self.multipliers = [1.0] * len(tokens)


class TextProcessingEngine:
    """Neo's SD1 text engine: 75 tokens per chunk (BREAK starts one), encoded by the current CLIP
    patcher of the model (its patches merged while it encodes)."""

    id_start, id_end, id_pad = BOS, EOS, EOS

    def __init__(self, model: "FakeNeoModel"):
        self.model = model

    def tokenize_line(self, line: str) -> tuple[list[Chunk], int]:
        chunks, count = [], 0
        for part in line.split(" BREAK "):
            ids = clip_bpe().encode(part)
            count += len(ids)
            for piece in [ids[i:i + CHUNK_CONTENT] for i in range(0, len(ids), CHUNK_CONTENT)] or [[]]:
                chunks.append(Chunk([self.id_start, *piece, self.id_end] + [self.id_pad] * (CHUNK_CONTENT - len(piece))))
        return chunks, count

    def encode_line(self, line: str) -> torch.Tensor:
        chunks, _ = self.tokenize_line(line)
        clip = self.model.forge_objects.clip
        self.model.clip_encodes.append(clip)
        with torch.inference_mode(), clip.patcher.patched():
            ids = torch.tensor([c.tokens for c in chunks])
            hidden = clip.cond_stage_model.clip_l.transformer(input_ids=ids).last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1])


class FakeNeoModel:
    """``p.sd_model`` of an SD1.5 checkpoint in Neo."""

    is_sd1, is_sdxl = True, False

    def __init__(self, unet_seed: int = 0, te_seed: int = 0, flavour: str = "neo"):
        self.flavour = flavour
        self.schedule = NoiseSchedule()
        reforge = flavour in ("reforge", "classic")  # the ldm_patched hosts
        unet = build_tiny_unet("sd15", seed=unet_seed)
        text_encoder = build_tiny_text_encoder(seed=te_seed)
        if reforge:  # ordinary tensors; the UNet's keep nn.Parameter's requires_grad=True
            text_encoder.requires_grad_(False)
        else:
            unet = load_as_inference(unet, requires_grad_off=flavour == "neo")
            text_encoder = load_as_inference(text_encoder)
        encoder = nn.Module()
        encoder.clip_l = nn.Module()
        encoder.clip_l.transformer = text_encoder
        kmodel = KModel(unet, self.schedule, requires_grad_off=flavour == "neo")
        clip = ReForgeCLIP(encoder) if reforge else CLIP(encoder)
        self.forge_objects = ForgeObjects(UnetPatcher(kmodel), clip)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self._text_engine = TextProcessingEngine(self)
        if reforge:
            self.cond_stage_model = self._text_engine  # A1111's embedder: the chunker reForge keeps
        else:
            self.text_processing_engine = self._text_engine
        self.clip_encodes: list = []  # the CLIP patcher of every encoding (what the tests look at)

    @property
    def diffusion_model(self) -> nn.Module:
        return self.forge_objects_original.unet.model.diffusion_model

    @property
    def kmodel(self) -> KModel:
        return self.forge_objects_original.unet.model

    def get_learned_conditioning(self, prompts: list[str]) -> list[torch.Tensor]:
        return [self._text_engine.encode_line(t) for t in prompts]
