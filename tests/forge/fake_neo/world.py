"""The fake Neo's checkpoints: the tiny SD1.5-layout ldm UNet and CLIP text encoder (and an SDXL one:
the tiny SDXL-layout UNet with SDXL's vector input, clip_l and clip_g), loaded as Neo
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
from ldm.modules.diffusionmodules.util import timestep_embedding

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
    """Neo's text engine for one encoder of the model's CLIP (``clip_l``, or SDXL's ``clip_g``): 75 tokens
    per chunk (BREAK starts one), encoded by the current CLIP patcher of the model (its patches merged
    while it encodes). The prompts of one call are padded to the same chunk count with empty chunks,
    and the pooled output is the first chunk's, as Neo's engine does."""

    id_start, id_end, id_pad = BOS, EOS, EOS

    def __init__(self, model: "FakeNeoModel", encoder: str = "clip_l"):
        self.model = model
        self.encoder = encoder

    def tokenize_line(self, line: str) -> tuple[list[Chunk], int]:
        chunks, count = [], 0
        for part in line.split(" BREAK "):
            ids = clip_bpe().encode(part)
            count += len(ids)
            for piece in [ids[i:i + CHUNK_CONTENT] for i in range(0, len(ids), CHUNK_CONTENT)] or [[]]:
                chunks.append(self._chunk(piece))
        return chunks, count

    def _chunk(self, piece: list[int]) -> Chunk:
        return Chunk([self.id_start, *piece, self.id_end] + [self.id_pad] * (CHUNK_CONTENT - len(piece)))

    def encode_lines(self, lines: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states (B, chunks * 77, D), pooled (B, D)) of ``lines``."""
        chunked = [self.tokenize_line(line)[0] for line in lines]
        count = max(len(chunks) for chunks in chunked)
        ids = torch.tensor([[c.tokens for c in chunks + [self._chunk([])] * (count - len(chunks))] for chunks in chunked])
        clip = self.model.forge_objects.clip
        self.model.clip_encodes.append(clip)
        with torch.inference_mode(), clip.patcher.patched():
            out = getattr(clip.cond_stage_model, self.encoder).transformer(input_ids=ids.reshape(-1, ids.shape[-1]))
        hidden = out.last_hidden_state.reshape(len(lines), -1, out.last_hidden_state.shape[-1])
        return hidden, out.pooler_output.reshape(len(lines), count, -1)[:, 0]

    def encode_line(self, line: str) -> torch.Tensor:
        return self.encode_lines([line])[0][0]


class Conditioner:
    """A1111's SDXL conditioner as reForge and Classic keep it: its text embedders (clip_l's first)."""

    def __init__(self, embedders: list):
        self.embedders = embedders


class FakeNeoModel:
    """``p.sd_model`` of an SD1.5 checkpoint in Neo."""

    is_sd1, is_sdxl = True, False

    def __init__(self, unet_seed: int = 0, te_seed: int = 0, flavour: str = "neo"):
        self.flavour = flavour
        self.schedule = NoiseSchedule()
        self._load(build_tiny_unet("sd15", seed=unet_seed), {"clip_l": build_tiny_text_encoder(seed=te_seed)})
        self._text_engine = TextProcessingEngine(self)
        if self.ldm_patched:
            self.cond_stage_model = self._text_engine  # A1111's embedder: the chunker reForge keeps
        else:
            self.text_processing_engine = self._text_engine

    @property
    def ldm_patched(self) -> bool:
        return self.flavour in ("reforge", "classic")

    def _load(self, unet: nn.Module, text_encoders: dict[str, nn.Module]) -> None:
        """The UNet behind a KModel and UnetPatcher, the text encoders (``clip_l``, ...) behind the
        host's CLIP patcher, loaded as the flavour's host loads them."""
        encoder = nn.Module()
        for name, text_encoder in text_encoders.items():
            if self.ldm_patched:  # ordinary tensors; the UNet's keep nn.Parameter's requires_grad=True
                text_encoder.requires_grad_(False)
            else:
                text_encoder = load_as_inference(text_encoder)
            setattr(encoder, name, nn.Module())
            getattr(encoder, name).transformer = text_encoder
        if not self.ldm_patched:
            unet = load_as_inference(unet, requires_grad_off=self.flavour == "neo")
        kmodel = KModel(unet, self.schedule, requires_grad_off=self.flavour == "neo")
        clip = ReForgeCLIP(encoder) if self.ldm_patched else CLIP(encoder)
        self.forge_objects = ForgeObjects(UnetPatcher(kmodel), clip)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.clip_encodes: list = []  # the CLIP patcher of every encoding (what the tests look at)

    @property
    def diffusion_model(self) -> nn.Module:
        return self.forge_objects_original.unet.model.diffusion_model

    @property
    def kmodel(self) -> KModel:
        return self.forge_objects_original.unet.model

    def get_learned_conditioning(self, prompts: list[str]) -> list[torch.Tensor]:
        return [self._text_engine.encode_line(t) for t in prompts]


class FakeNeoSDXLModel(FakeNeoModel):
    """``p.sd_model`` of an SDXL checkpoint in Neo: the tiny SDXL-layout UNet with SDXL's vector input
    ``y``, two CLIP encoders (clip_l and clip_g, 24 wide each: the context is the two side by side, 48
    wide, so an SD1.5 LoRA's cross-attention layers do not fit, as in the real models), a text engine for
    each (Neo: ``text_processing_engine_l``, ``_g``; reForge and Classic keep A1111's SDXL model: the two
    as ``conditioner.embedders``, the conditioner as ``cond_stage_model``), and SDXL's conds: one dict per call, ``crossattn``
    (B, T, 48) and ``vector`` (B, 72): clip_g's pooled output and the size embeddings of the prompt
    list's height, width, crop top/left (0) and target height/width."""

    is_sd1, is_sdxl = False, True
    WIDTH, SIZE_WIDTH = 24, 8  # per encoder; per size value
    ADM = WIDTH + 6 * SIZE_WIDTH

    def __init__(self, unet_seed: int = 0, te_seed: int = 0, flavour: str = "neo"):
        self.flavour = flavour
        self.schedule = NoiseSchedule()
        text_encoders = {name: build_tiny_text_encoder(seed=te_seed + i, hidden=self.WIDTH)
                         for i, name in enumerate(("clip_l", "clip_g"))}
        self._load(build_tiny_unet("sdxl", seed=unet_seed, context_dim=2 * self.WIDTH, adm_in_channels=self.ADM),
                   text_encoders)
        engines = [TextProcessingEngine(self, "clip_l"), TextProcessingEngine(self, "clip_g")]
        if self.ldm_patched:
            self.conditioner = Conditioner(engines)
            self.cond_stage_model = self.conditioner
        else:
            self.text_processing_engine_l, self.text_processing_engine_g = engines

    def _engines(self) -> tuple:
        """(clip_l's engine or None on a refiner, clip_g's): made a refiner (clip_g only) by a test."""
        if self.ldm_patched:
            if self.cond_stage_model is not self.conditioner:  # a refiner's one text embedder
                return None, self.cond_stage_model
            return tuple(self.conditioner.embedders[:2])
        return getattr(self, "text_processing_engine_l", None), self.text_processing_engine_g

    def size_embedding(self, width: int, height: int) -> torch.Tensor:
        sizes = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)
        return timestep_embedding(sizes, self.SIZE_WIDTH).flatten()

    def get_learned_conditioning(self, prompts: list[str]) -> dict:
        engine_l, engine_g = self._engines()
        cond_g, pooled = engine_g.encode_lines(list(prompts))
        crossattn = cond_g if engine_l is None else torch.cat([engine_l.encode_lines(list(prompts))[0], cond_g], dim=2)
        sizes = self.size_embedding(getattr(prompts, "width", None) or 1024, getattr(prompts, "height", None) or 1024)
        return {"crossattn": crossattn, "vector": torch.cat([pooled, sizes.expand(len(prompts), -1)], dim=1)}
