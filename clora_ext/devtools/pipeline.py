"""A small text-to-image loop over the tiny model: the harness for tests, the demo and the benchmark.

It plays the host's part: a first-order sampler (k-diffusion Euler or DDIM) over an
eps-predicting inner model. With concepts, every step runs through the same pass the
web UI hosts run (``webui.passes.Pass``), driven through a port of its own (``DevPort``):
the variant plan, the encodings with each LoRA's text-encoder part routed to its rows,
the token maps, the engine and the fused step are the product's.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn as nn

from ..concepts import Composition, Concept
from ..conditioning import ConditioningTable
from ..engine import CLoRAEngine, EngineHooks, EngineSettings, LoRAUse, RowLayout, row_groups
from ..lora_file import MappedLoRA
from ..routing import Route, RowRouter
from ..tokens import CHUNK_LENGTH, BPEChunkTokenizer, PromptTokenizer, pad_chunks, plan_token_maps
from ..webui.passes import Pass, PassFacts
from ..webui.plan import HostRowModel, ProxyRows, VariantPlan, plan_variants
from ..webui.previews import PreviewStore
from ..webui.samplers import SamplerSupport
from .tiny_sd import BOS, EOS, clip_bpe, encode_text_batch

log = logging.getLogger(__name__)

# an inner model as the hosts call it: inner(x, sigma or timestep per row, cond={"c_crossattn": [context], ...})
InnerModel = Callable[..., torch.Tensor]


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


def encode_jobs(model: TinySD, plan: VariantPlan, loras: dict[str, MappedLoRA]) -> list[torch.Tensor]:
    """Every encoding job of ``plan`` in one text-encoder batch, each with its LoRAs' text-encoder part."""
    routes = [Route(loras[name].text_encoder, [j], weight, name)
              for j, job in enumerate(plan.jobs) for name, weight in job.loras]
    return model.encode([job.text for job in plan.jobs], routes)


def prepare_clora(
    model: TinySD,
    prompt: str,
    negative: str,
    concepts: Sequence[ConceptLoRA],
) -> tuple[VariantConds, list[list[LoRAUse]], list]:
    """Variant conds and unconds, per-variant UNet LoRA lists and token maps, as a pass plans them
    (for the benchmarks that drive the engine directly)."""
    by_lora = {c.concept.lora: c.lora for c in concepts}
    composition = Composition.from_concepts([c.concept for c in concepts])
    plan = plan_variants(composition, [prompt], [negative])
    encoded = encode_jobs(model, plan, by_lora)
    conds = VariantConds([encoded[j] for j in plan.cond_job[0]], [encoded[j] for j in plan.uncond_job[0]])
    unet_loras = [[LoRAUse(name, by_lora[name].unet, weight) for name, weight in lora_set] for lora_set in plan.unet_loras]
    return conds, unet_loras, plan_token_maps(composition, plan.variants[0], model.tokenizer)


class EpsModel:
    """The tiny UNet as a host's inner model: eps at (x, sigma) for k-diffusion samplers (input scaled
    by ``c_in``, sigma turned into the model's continuous timestep), at (x, timestep) for DDIM."""

    def __init__(self, model: TinySD, k_diffusion: bool):
        self.model = model
        self.k_diffusion = k_diffusion

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        context = cond["c_crossattn"][0]
        if not self.k_diffusion:
            return self.model.unet(x, sigma, context=context)
        t = self.model.schedule.sigma_to_t(sigma.cpu()).to(x.device)
        c_in = ((sigma**2 + 1) ** -0.5).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return self.model.unet(x * c_in, t, context=context)


@dataclass
class _DevArgs:
    """The CLoRA settings of one generation of the loop (``passes.PassArgs``)."""

    concepts: list[Concept]
    settings: EngineSettings
    previews: bool = False

    def composition(self) -> Composition:
        return Composition.from_concepts(self.concepts)

    def engine_settings(self) -> EngineSettings:
        return self.settings


@dataclass
class _DevGeneration:
    """One generation of the loop (``passes.PassGeneration``): notes go to the log, the engine's
    warnings to the hooks' ``warn``."""

    args: _DevArgs
    warn: Callable[[str], None]
    previews: PreviewStore = field(default_factory=PreviewStore)

    def note(self, message: str) -> None:
        log.info(message)


class DevPort:
    """The loop's side of a pass (``passes.PassPort``): the tiny model, its already mapped LoRAs, no
    prompt editing, no host state. An interrupt stops the refinement; the loop itself samples on."""

    functional_gradient = False

    def __init__(self, model: TinySD, loras: dict[str, MappedLoRA], facts: PassFacts, hooks: EngineHooks,
                 row_cap: int | None = None):
        self.model = model
        self.loras = loras
        self._facts = facts
        self.hooks = hooks
        self.row_cap = row_cap

    def check_model(self) -> None:
        pass

    def load_lora(self, name: str) -> MappedLoRA:
        return self.loras[name]

    def encode(self, plan: VariantPlan, loras: dict, facts: PassFacts) -> list[list[tuple[int, torch.Tensor]]]:
        return [[(facts.steps, cond)] for cond in encode_jobs(self.model, plan, loras)]

    def tokenizer(self) -> PromptTokenizer:
        return self.model.tokenizer

    def prompt_schedules(self, texts: list[str], facts: PassFacts) -> list[list[tuple[int, str]]]:
        return [[(facts.steps, text)] for text in texts]

    def sampler_function(self) -> str:
        return {"euler": "sample_euler", "ddim": "ddim"}[self._facts.sampler_name]

    def model_calls(self, total_steps: int, sampler: SamplerSupport) -> int | None:
        return None  # the loop calls the model once per step, DDIM included

    def attach(self) -> nn.Module:
        return self.model.unet

    def pad_cond(self) -> None:
        return None

    def raise_interrupted(self) -> None:
        pass

    def facts(self) -> PassFacts:
        return self._facts

    def interrupted(self) -> bool:
        return self.hooks.interrupted()

    def refine_progress(self, iteration: int, iterations: int) -> None:
        self.hooks.on_refine(iteration, iterations)

    def progress_text_kept(self) -> ContextManager[None]:
        return contextlib.nullcontext()

    def batch_iteration(self) -> int:
        return 0

    def max_rows(self, cond_rows: int) -> int | None:
        return self.row_cap

    def console(self, line: str) -> None:
        log.info(line)


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
    inner_wrapper: Callable[[InnerModel], InnerModel] | None = None,
    max_rows: int | None = None,
) -> tuple[torch.Tensor, CLoRAEngine | None]:
    """Sample a latent. With ``concepts``, every step is a CLoRA pass's fused step (``webui.passes``).

    The latent lives on the UNet's device (the seeded noise is drawn on the CPU, so
    every device starts from the same noise). ``inner_wrapper`` wraps the inner model
    (e.g. the benchmark's timers) before the pass or the plain path calls it. ``max_rows``: the
    most UNet rows one CLoRA call may take (the hosts' row cap; None: no cap).
    """
    if sampler not in ("euler", "ddim"):
        raise ValueError(f"unknown sampler {sampler!r}")
    k_diffusion = sampler == "euler"
    device = next(model.unet.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((batch_size, 4, *latent_hw), generator=gen).to(device)
    sched = model.schedule
    timesteps = sched.timesteps(steps)
    sigmas = torch.cat([sched.sigmas[timesteps.long()], torch.zeros(1, dtype=torch.float64)]).float()
    inner: InnerModel = EpsModel(model, k_diffusion)
    if inner_wrapper is not None:
        inner = inner_wrapper(inner)
    image_cond = torch.zeros((batch_size, 0, *latent_hw), device=device)  # the hosts' c_concat: none for txt2img
    hooks = hooks or EngineHooks()

    clora, engine, plain_table = None, None, None
    if concepts:
        facts = PassFacts(hires=False, prompts=[prompt] * batch_size, negatives=[negative] * batch_size,
                          sampler_name=sampler, steps=steps, hires_steps=None, width=8 * latent_hw[1],
                          height=8 * latent_hw[0], latent_updates=allow_update)
        args = _DevArgs([c.concept for c in concepts], settings)
        port = DevPort(model, {c.concept.lora: c.lora for c in concepts}, facts, hooks, max_rows)
        clora = Pass(_DevGeneration(args, hooks.warn), port)
        engine = clora.engine
    else:
        # the host's plain call: cond rows, then uncond rows (in separate calls where their lengths differ)
        cond, uncond = model.encode([prompt])[0], model.encode([negative])[0]
        plain_table = ConditioningTable([cond] * batch_size + [uncond] * batch_size)

    x = noise * sigmas[0] if k_diffusion else noise
    try:
        for i in range(steps):
            model_sigma = sigmas[i] if k_diffusion else timesteps[i].float()  # what the inner model is called with
            sigma_rows = model_sigma.reshape(1).expand(batch_size).to(device)
            if clora is not None:
                fused = clora.step(inner, x, sigma_rows, image_cond, i, steps, k_diffusion, None)
                e_cond, e_uncond = fused[:batch_size], fused[batch_size:]
            else:
                rows = ProxyRows(batch_size, 1)
                row_model = HostRowModel(inner, rows, plain_table, torch.arange(batch_size, device=device), sigma_rows,
                                         image_cond)
                layout = RowLayout.build(batch_size, 1, with_uncond=True, device=device)
                with torch.no_grad():
                    e = torch.empty_like(x.index_select(0, layout.image))
                    for group in row_groups(row_model, layout):
                        e[group] = row_model(x.index_select(0, layout.image[group]), layout.select(group))
                e_cond, e_uncond = e[:batch_size], e[batch_size:]
            eps = e_uncond + cfg_scale * (e_cond - e_uncond)
            with torch.no_grad():
                if k_diffusion:
                    # d = (x - x0) / sigma = eps for an eps-prediction model
                    x = x + eps * (sigmas[i + 1] - sigmas[i])
                else:
                    a = sched.alphas_cumprod[timesteps[i].long()].float()
                    a_prev = (
                        sched.alphas_cumprod[timesteps[i + 1].long()].float() if i + 1 < steps else torch.tensor(1.0)
                    )
                    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
                    x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
            if on_step is not None:
                on_step(i, engine)
    finally:
        if clora is not None:
            clora.close()
    return x, engine
