"""Configuration (b): the reference implementation's COST STRUCTURE, re-enacted with our own code.

Nothing here is the reference's code; it reproduces how the reference spends its
time and memory (docs/algorithm.md, section 6), so that the benchmark can compare against it on
the same model, sampler, seed and size:

* per step, every variant (base + one per content LoRA) runs its own, sequential
  batch-2 UNet call (cond + that variant's own negative prompt) with that
  variant's LoRA active (routed onto both rows);
* the whole forward of every call runs with autograd enabled at EVERY step, so the
  graph is built even at steps that do not update; all K+1 graphs stay alive until
  the backward of that iteration;
* every self- and cross-attention layer computes explicit softmax attention
  (:func:`bench.attention.explicit_attention`), and the H/32 cross-attention maps
  are averaged over cond AND uncond rows, as the reference's attention store does;
* update steps: one latent update from the maps of the pass that also gives the
  noise predictions (those predictions, made before the update, are reused for the
  sampler step: the reference's stale prediction);
* refinement steps: a FIXED number of extra iterations (forward of every variant,
  loss, backward, update) before that, without early stopping.

Fusion is the same as ours: masks from the maps at lambda = 0.4, cond and uncond
fused separately, then CFG; Euler sampler in k-diffusion space.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from clora_ext.attention import map_size
from clora_ext.engine import gradient_ready
from clora_ext.loss import DEFAULT_TAU, contrastive_loss
from clora_ext.masks import fuse, resize_masks, variant_masks
from clora_ext.routing import Route, RowRouter
from clora_ext.update import Schedule
from clora_ext.devtools.pipeline import ConceptLoRA, TinySD, prepare_clora

from .attention import MapRecorder, explicit_attention


def reference_forward(
    unet: torch.nn.Module,
    recorder: MapRecorder,
    router: RowRouter,
    routes: Sequence[Sequence[Route]],
    contexts: Sequence[torch.Tensor],
    leaf: torch.Tensor,
    t: torch.Tensor,
    c_in: float,
    token_maps: Sequence,
    map_hw: tuple[int, int],
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One forward round: every variant as its own batch-2 call (graph kept if grad is on).

    Returns the K+1 (2, C, H, W) predictions and the (P, h, w) token maps. Must run
    inside :func:`bench.attention.explicit_attention` with ``recorder``.
    """
    preds, variant_maps = [], []
    for v, variant_routes in enumerate(routes):
        recorder.reset()
        with router.routed(variant_routes, 2):
            preds.append(unet(torch.cat([leaf, leaf]) * c_in, t.expand(2), context=contexts[v]))
        variant_maps.append(recorder.maps())  # (N, M), cond+uncond mixed
    maps = torch.stack([variant_maps[s.variant][:, s.position] for s in token_maps]).reshape(-1, *map_hw)
    return preds, maps


@dataclass
class ReferenceStats:
    unet_calls: int = 0  # batch-2 UNet calls (one per variant per forward round)
    forward_rounds: int = 0  # rounds of K+1 calls
    backward_passes: int = 0
    forward_seconds: float = 0.0
    backward_seconds: float = 0.0
    refine_rounds: int = 0  # forward rounds that were refinement iterations
    refine_seconds: float = 0.0  # forward + backward time of those rounds
    losses: list[float] = field(default_factory=list)


def generate_reference(
    model: TinySD,
    prompt: str,
    negative: str,
    concepts: Sequence[ConceptLoRA],
    *,
    seed: int = 0,
    steps: int = 20,
    cfg_scale: float = 7.0,
    latent_hw: tuple[int, int] = (16, 16),
    schedule: Schedule = Schedule(),
    step_size: float = 20.0,
    mask_threshold: float = 0.4,
    tau: float = DEFAULT_TAU,
    sync: Callable[[], None] = lambda: None,
) -> tuple[torch.Tensor, ReferenceStats]:
    """Euler sampling with the reference's per-step work; returns the final latent and counters."""
    unet = model.unet
    device = next(unet.parameters()).device
    stats = ReferenceStats()
    conds, unet_loras, token_maps = prepare_clora(model, prompt, negative, concepts)
    n_variants = len(unet_loras)
    labels = torch.tensor([s.concept for s in token_maps], dtype=torch.long, device=device)
    # the paper's rule, written out: a variant's mask is the union of its own mask tokens' maps
    mask_for = torch.tensor([s.variant if s.mask else -1 for s in token_maps], dtype=torch.long, device=device)
    map_hw = map_size(latent_hw)
    recorder = MapRecorder(map_hw[0] * map_hw[1])
    router = RowRouter(unet)
    routes = [[Route(u.deltas, [0, 1], u.multiplier, u.name) for u in uses] for uses in unet_loras]
    contexts = [torch.stack([conds.cond[v], conds.uncond[v]]) for v in range(n_variants)]

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 4, *latent_hw), generator=gen).to(device)
    sched = model.schedule
    sigmas = torch.cat([sched.sigmas[sched.timesteps(steps).long()], torch.zeros(1, dtype=torch.float64)]).float()
    x = x * sigmas[0]

    def forward_all(leaf: torch.Tensor, t: torch.Tensor, c_in: float) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every variant as its own batch-2 call, graph kept; the (P, h, w) token maps."""
        sync()
        start = time.perf_counter()
        preds, maps = reference_forward(unet, recorder, router, routes, contexts, leaf, t, c_in, token_maps, map_hw)
        stats.unet_calls += n_variants
        sync()
        stats.forward_seconds += time.perf_counter() - start
        stats.forward_rounds += 1
        return preds, maps

    def update(leaf: torch.Tensor, maps: torch.Tensor, scale: float) -> torch.Tensor:
        loss = contrastive_loss(maps, labels, tau)
        sync()
        start = time.perf_counter()
        (grad,) = torch.autograd.grad(loss, leaf)
        sync()
        stats.backward_seconds += time.perf_counter() - start
        stats.backward_passes += 1
        stats.losses.append(float(loss.detach()))
        return (leaf - step_size * scale * grad).detach()

    with explicit_attention(unet, recorder), gradient_ready(unet), torch.enable_grad():
        for i in range(steps):
            sigma = sigmas[i]
            t = sched.sigma_to_t(sigma.reshape(1)).to(device)
            c_in = float((sigma**2 + 1) ** -0.5)
            scale = float(sigma**2 + 1)  # alpha in DDPM space -> k-diffusion space
            updating = schedule.updates_at(i, steps)
            refine = schedule.iterations_at(i, steps) - 1 if updating else 0
            for _ in range(refine):  # fixed count, no early stop
                start = time.perf_counter()
                leaf = x.detach().requires_grad_(True)
                _, maps = forward_all(leaf, t, c_in)
                x = update(leaf, maps, scale)
                del maps
                stats.refine_rounds += 1
                stats.refine_seconds += time.perf_counter() - start
            leaf = x.detach().requires_grad_(True)
            preds, maps = forward_all(leaf, t, c_in)  # graph built whether or not this step updates
            if updating:
                x = update(leaf, maps, scale)
            with torch.no_grad():
                preds = torch.stack([p.detach() for p in preds])  # (V, 2, C, H, W), stale if updated
                masks = resize_masks(variant_masks(maps.detach(), mask_for, n_variants, mask_threshold), latent_hw)
                del maps, leaf
                e_cond = fuse(preds[:, 0], masks)
                e_uncond = fuse(preds[:, 1], masks)
                eps = e_uncond + cfg_scale * (e_cond - e_uncond)
                x = (x + eps[None] * (sigmas[i + 1] - sigma)).detach()
    return x, stats
