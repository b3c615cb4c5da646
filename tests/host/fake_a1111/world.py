"""The fake host's checkpoint: the tiny SD1.5-layout UNet and CLIP text encoder, wrapped as the
host wraps a loaded model (its chunker, its empty-prompt cond, its k-diffusion denoiser)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn

from clora_ext.devtools.pipeline import NoiseSchedule
from clora_ext.devtools.tiny_sd import BOS, EOS, build_tiny_text_encoder, build_tiny_unet, clip_bpe
from clora_ext.tokens import CHUNK_CONTENT

import networks


class Chunk:
    def __init__(self, tokens: list[int]):
        self.tokens = tokens
        self.multipliers = [1.0] * len(tokens)


class Chunker(nn.Module):
    """The prompt chunker of an SD1 model: 75 tokens per chunk, BREAK starts a new one."""

    id_start, id_end, id_pad = BOS, EOS, EOS

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.wrapped = SimpleNamespace(transformer=transformer)
        self.transformer = transformer

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [clip_bpe().encode(t) for t in texts]

    def tokenize_line(self, line: str) -> tuple[list[Chunk], int]:
        chunks = []
        count = 0
        for part in line.split(" BREAK "):
            ids = clip_bpe().encode(part)
            count += len(ids)
            pieces = [ids[i:i + CHUNK_CONTENT] for i in range(0, len(ids), CHUNK_CONTENT)] or [[]]
            for piece in pieces:
                chunks.append(Chunk([self.id_start, *piece, self.id_end] + [self.id_pad] * (CHUNK_CONTENT - len(piece))))
        return chunks, count

    def encode_line(self, line: str) -> torch.Tensor:
        chunks, _ = self.tokenize_line(line)
        ids = torch.tensor([c.tokens for c in chunks])
        with torch.no_grad(), networks.applied(self.transformer):
            hidden = self.transformer(input_ids=ids).last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1])


class KDiffusionDenoiser(nn.Module):
    """x -> x0 in sigma space (UNet input x * c_in, timestep from sigma), as k-diffusion's CompVisDenoiser."""

    def __init__(self, model: "FakeSDModel"):
        super().__init__()
        self.inner_model = model
        self.schedule = model.schedule

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        t = self.schedule.sigma_to_t(sigma.float())
        eps = self.inner_model.model.diffusion_model(x / (s**2 + 1).sqrt(), t, context=cond["c_crossattn"][0])
        return x - s * eps


class EpsDenoiser(nn.Module):
    """x_t, t -> eps, as the host's CompVisTimestepsDenoiser."""

    def __init__(self, model: "FakeSDModel"):
        super().__init__()
        self.inner_model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.inner_model.model.diffusion_model(x, t.float(), context=cond["c_crossattn"][0])


class FakeSDModel(nn.Module):
    is_sdxl = False
    is_sd2 = False
    is_sd1 = True
    cond_stage_key = "txt"
    sd_checkpoint_info = "fake-sd15.safetensors"

    def __init__(self, unet_seed: int = 0, te_seed: int = 0):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = build_tiny_unet("sd15", seed=unet_seed)
        self.model.conditioning_key = "crossattn"
        self.cond_stage_model = Chunker(build_tiny_text_encoder(seed=te_seed))
        self.schedule = NoiseSchedule()
        self.cond_stage_model_empty_prompt = self.cond_stage_model.encode_line("")[None]

    def get_learned_conditioning(self, texts: list[str]) -> list[torch.Tensor]:
        return [self.cond_stage_model.encode_line(t) for t in texts]

    def create_denoiser(self) -> nn.Module:
        return KDiffusionDenoiser(self)

    def create_eps_denoiser(self) -> nn.Module:
        return EpsDenoiser(self)
