"""A small text-to-image loop over the tiny model: the harness for tests, the demo and the benchmark.

It plays the host's part: encodes prompt variants (each with its LoRA's text
encoder part routed to its row), and runs a first-order sampler (k-diffusion Euler
or DDIM) whose denoiser either runs the plain model or hands each step to the
CLoRA engine, exactly as the A1111 glue does.
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..concepts import Composition, Concept
from ..conditioning import ConditioningTable
from ..engine import CLoRAEngine, EngineHooks, EngineSettings, LoRAUse, RowLayout, RowModel, row_groups
from ..lora_file import MappedLoRA
from ..routing import Route, RowRouter
from ..tokens import CHUNK_LENGTH, BPEChunkTokenizer, pad_chunks, plan_token_maps
from ..update import DDPMSpace, SigmaSpace
from .tiny_sd import BOS, EOS, clip_bpe, encode_text_batch


class NoiseSchedule:
    """Stable Diffusion's scaled-linear schedule, 1000 training timesteps."""

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012, timesteps: int = 1000):
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas.log()

    def timesteps(self, steps: int) -> torch.Tensor:
        """Evenly spaced timesteps from 999 down to 0."""
        return torch.linspace(len(self.sigmas) - 1, 0, steps, dtype=torch.float64).round()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep of a sigma (interpolated in log sigma, as k-diffusion does)."""
        log_sigma = sigma.double().log()
        idx = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        lo, hi = self.log_sigmas[idx - 1], self.log_sigmas[idx]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return (idx - 1 + w).float()


@dataclass
class TinySD:
    """A text encoder + UNet pair with the chunked CLIP prompt encoding SD uses."""

    unet: nn.Module
    text_encoder: nn.Module
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)

    def __post_init__(self):
        self.tokenizer = BPEChunkTokenizer(clip_bpe().encode)

    def encode(self, prompts: Sequence[str], te_routes: Sequence[Route] = ()) -> list[torch.Tensor]:
        """Each prompt's (77*n, D) conditioning at its own chunk count n, as the host encodes a
        prompt; ``te_routes`` route text-encoder LoRAs to prompt rows."""
        chunked = [self.tokenizer.chunks(p) for p in prompts]
        n = max(len(c) for c in chunked)
        # chunks are encoded one by one, so a row's empty filler chunks are cut off again below
        ids = [pad_chunks(c + [[]] * (n - len(c)), BOS, EOS) for c in chunked]
        router = RowRouter(self.text_encoder)
        with router.routed(te_routes, len(prompts)):
            encoded = encode_text_batch(self.text_encoder, ids)
        return [e[: CHUNK_LENGTH * len(c)] for e, c in zip(encoded, chunked)]


class VariantConds:
    """The cond and uncond of every variant, each at its own token length.

    Table rows: the V cond rows, then the V uncond rows. Rows of different lengths run
    in separate model calls (``row_groups``), as the host runs a prompt and a longer
    negative prompt.
    """

    def __init__(self, cond: Sequence[torch.Tensor], uncond: Sequence[torch.Tensor]):
        self.cond, self.uncond = list(cond), list(uncond)
        self.table = ConditioningTable(self.cond + self.uncond)

    def _index(self, layout: RowLayout) -> list[int]:
        # read as Python values, without tensor arithmetic: inside a torch.func transform (the
        # functional gradient pass) a tensor computed there cannot be read back
        return [int(u) * len(self.cond) + v for u, v in zip(layout.uncond.tolist(), layout.variant.tolist())]

    def row_groups(self, layout: RowLayout) -> list[torch.Tensor]:
        return [g.to(layout.image.device) for g in self.table.row_groups(self._index(layout))]

    def context(self, layout: RowLayout) -> torch.Tensor:
        return self.table.select(self._index(layout))


@dataclass
class UNetRows:
    """A row model over a bare UNet at one timestep (eps prediction, input scaled by ``c_in``)."""

    unet: nn.Module
    conds: VariantConds
    t: torch.Tensor
    c_in: float = 1.0

    def row_groups(self, layout: RowLayout) -> list[torch.Tensor]:
        return self.conds.row_groups(layout)

    def __call__(self, x_rows: torch.Tensor, layout: RowLayout) -> torch.Tensor:
        context = self.conds.context(layout).to(x_rows.device)
        return self.unet(x_rows * self.c_in, self.t.expand(len(layout)), context=context)


@dataclass
class ConceptLoRA:
    """A concept with its LoRA already mapped onto the model's modules."""

    concept: Concept
    lora: MappedLoRA


def prepare_clora(
    model: TinySD,
    prompt: str,
    negative: str,
    concepts: Sequence[ConceptLoRA],
) -> tuple[VariantConds, list[list[LoRAUse]], list]:
    """Variant conds and unconds, per-variant UNet LoRA lists and token maps."""
    by_lora = {c.concept.lora: c.lora for c in concepts}
    composition = Composition.from_concepts([c.concept for c in concepts])
    variants = composition.variants(prompt)
    unet_loras: list[list[LoRAUse]] = []
    te_routes: list[Route] = []
    for v in variants:
        uses = [composition.content[v.concept]] if v.concept is not None else []
        uses += composition.styles_for_variant(v)
        unet_loras.append([LoRAUse(c.lora, by_lora[c.lora].unet, c.weight) for c in uses])
        te_routes += [Route(by_lora[c.lora].text_encoder, [v.index], c.te_weight, c.lora) for c in uses]
    n = len(variants)
    # cond rows 0..V-1, then each variant's negative prompt under the same LoRA set
    te_routes_all = te_routes + [Route(r.deltas, [i + n for i in r.rows], r.multiplier, r.name) for r in te_routes]
    encoded = model.encode([v.prompt for v in variants] + [negative] * n, te_routes_all)
    token_maps = plan_token_maps(composition, variants, model.tokenizer)
    return VariantConds(encoded[:n], encoded[n:]), unet_loras, token_maps


def generate(
    model: TinySD,
    prompt: str,
    negative: str = "",
    *,
    seed: int = 0,
    steps: int = 20,
    sampler: str = "euler",
    cfg_scale: float = 7.0,
    latent_hw: tuple[int, int] = (16, 16),
    batch_size: int = 1,
    concepts: Sequence[ConceptLoRA] = (),
    settings: EngineSettings = EngineSettings(),
    hooks: EngineHooks | None = None,
    on_step: Callable[[int, CLoRAEngine | None], None] | None = None,
    allow_update: bool = True,
    row_model_wrapper: Callable[[RowModel], RowModel] | None = None,
) -> tuple[torch.Tensor, CLoRAEngine | None]:
    """Sample a latent. With ``concepts``, every step goes through the CLoRA engine.

    The latent lives on the UNet's device (the seeded noise is drawn on the CPU, so
    every device starts from the same noise). ``row_model_wrapper`` wraps each step's
    row model (e.g. the benchmark's timers) before the engine or the plain path calls it.
    """
    if sampler not in ("euler", "ddim"):
        raise ValueError(f"unknown sampler {sampler!r}")
    device = next(model.unet.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((batch_size, 4, *latent_hw), generator=gen).to(device)
    sched = model.schedule
    timesteps = sched.timesteps(steps)
    sigmas = torch.cat([sched.sigmas[timesteps.long()], torch.zeros(1, dtype=torch.float64)]).float()

    if concepts:
        conds, unet_loras, token_maps = prepare_clora(model, prompt, negative, concepts)
    else:
        conds, unet_loras, token_maps = VariantConds(*[model.encode([p]) for p in (prompt, negative)]), [[]], []

    x = noise * sigmas[0] if sampler == "euler" else noise
    engine = CLoRAEngine(model.unet, unet_loras, token_maps, settings, hooks) if concepts else None
    with engine if engine is not None else contextlib.nullcontext():
        for i in range(steps):
            sigma = sigmas[i]
            if sampler == "euler":
                t = sched.sigma_to_t(sigma.reshape(1)).to(device)
                c_in = float((sigma**2 + 1) ** -0.5)
                space = SigmaSpace(sigma.reshape(1))
            else:
                t = timesteps[i].float().reshape(1).to(device)
                c_in = 1.0
                space = DDPMSpace()

            row_model: RowModel = UNetRows(model.unet, conds, t, c_in)
            if row_model_wrapper is not None:
                row_model = row_model_wrapper(row_model)
            if engine is not None:
                out = engine.step(x, i, steps, space, row_model, allow_update=allow_update)
                e_cond, e_uncond = out.cond, out.uncond
            else:
                layout = RowLayout.build(batch_size, 1, with_uncond=True, device=device)
                with torch.no_grad():
                    e = torch.empty_like(x.index_select(0, layout.image))
                    for rows in row_groups(row_model, layout):  # the host's separate cond and uncond calls
                        e[rows] = row_model(x.index_select(0, layout.image[rows]), layout.select(rows))
                e_cond, e_uncond = e[:batch_size], e[batch_size:]
            eps = e_uncond + cfg_scale * (e_cond - e_uncond)
            with torch.no_grad():
                if sampler == "euler":
                    # d = (x - x0) / sigma = eps for an eps-prediction model
                    x = x + eps * (sigmas[i + 1] - sigma)
                else:
                    a = sched.alphas_cumprod[timesteps[i].long()].float()
                    a_prev = (
                        sched.alphas_cumprod[timesteps[i + 1].long()].float() if i + 1 < steps else torch.tensor(1.0)
                    )
                    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
                    x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
            if on_step is not None:
                on_step(i, engine)
    return x, engine
