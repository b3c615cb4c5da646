"""What base and LoRA training share: batches of scenes, the DDPM loss, token positions, logging."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clora_ext.devtools.pipeline import NoiseSchedule
from clora_ext.devtools.tiny_sd import BOS, EOS, clip_bpe
from clora_ext.tokens import BPEChunkTokenizer, pad_chunks

from .scenes import Scene, render, to_latent


@dataclass
class Batch:
    latents: torch.Tensor  # (B, 4, 32, 32)
    ids: torch.Tensor  # (B, 77) token ids
    captions: list[str]
    masks: list[np.ndarray]  # per image: (n_objects, 32, 32) bool
    noun_positions: list[list[int]]  # per image, per object: token position of its shape word (-1: caption empty)


def tokenize(captions: Sequence[str]) -> torch.Tensor:
    """(B, 77) ids: BOS + BPE + EOS, padded with EOS (one chunk: captions here are short)."""
    tokenizer = BPEChunkTokenizer(clip_bpe().encode)
    rows = []
    for c in captions:
        chunks = tokenizer.chunks(c)
        if len(chunks) != 1:
            raise ValueError(f"caption longer than one chunk: {c!r}")
        rows.append(pad_chunks(chunks, BOS, EOS)[0])
    return torch.tensor(rows, dtype=torch.long)


def noun_positions(caption_ids: torch.Tensor, scene: Scene) -> list[int]:
    """Position of each object's shape word in the 77 ids (every shape is one CLIP token)."""
    ids = caption_ids.tolist()
    out = []
    for o in scene.objects:
        (word,) = clip_bpe().encode(o.shape)
        out.append(ids.index(word) if word in ids else -1)
    return out


def make_batch(scenes: Sequence[Scene], captions: Sequence[str], rng: np.random.Generator) -> Batch:
    pictures, masks = zip(*(render(s, rng) for s in scenes))
    ids = tokenize(captions)
    positions = [noun_positions(ids[i], s) if captions[i] else [-1] * len(s.objects) for i, s in enumerate(scenes)]
    return Batch(to_latent(np.stack(pictures)), ids, list(captions), list(masks), positions)


def diffusion_loss(
    unet: nn.Module, context: torch.Tensor, x0: torch.Tensor, schedule: NoiseSchedule, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Epsilon-prediction MSE at uniform timesteps (SD's objective); returns (loss, timesteps)."""
    b = x0.shape[0]
    t = torch.randint(0, len(schedule.alphas_cumprod), (b,), generator=gen)
    abar = schedule.alphas_cumprod[t].float()[:, None, None, None]
    noise = torch.randn(x0.shape, generator=gen)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    return F.mse_loss(unet(xt, t, context=context), noise), t


def lr_at(step: int, steps: int, lr: float, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class TrainLog:
    """Prints and keeps a loss curve (means over windows of steps) and the wall time."""

    def __init__(self, steps: int, every: int = 50, quiet: bool = False):
        self.steps, self.every, self.quiet = steps, every, quiet
        self.start = time.perf_counter()
        self.curve: list[dict] = []
        self._window: dict[str, list[float]] = {}

    def add(self, step: int, **values: float) -> None:
        for k, v in values.items():
            self._window.setdefault(k, []).append(float(v))
        if (step + 1) % self.every == 0 or step + 1 == self.steps:
            point = {"step": step + 1, **{k: round(float(np.mean(v)), 5) for k, v in self._window.items()}}
            point["seconds"] = round(self.seconds, 1)
            self.curve.append(point)
            self._window.clear()
            if not self.quiet:
                print(json.dumps(point), flush=True)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def set_seed(seed: int, threads: int | None) -> tuple[np.random.Generator, torch.Generator]:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return np.random.default_rng(seed), torch.Generator().manual_seed(seed)


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)

