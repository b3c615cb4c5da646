"""The per-step CLoRA engine: one object ties variants, routing, capture, loss, update, masks and fusion.

The engine never calls the UNet itself. It is handed a *row model*: a callable that
runs the model on a batch of rows, each row being (image, variant, cond/uncond),
and returns the model's prediction per row. The A1111 glue wraps the host's inner
model this way; the tests and the demo wrap a bare UNet. Both drive this code.

Per sampling step, for a batch of B images and V = 1 + K variants:

1. at update steps (first-order samplers only): a gradient pass over the B*V cond
   rows, stopped after the last H/32 layer, gives the maps; their contrastive loss
   is differentiated w.r.t. the latent, which is updated in place. Refinement steps
   repeat this until the loss stops improving (or a fixed count).
2. one batched pass over all 2*B*V rows (cond, then uncond; image-major) with the
   maps of the cond rows captured; the prediction therefore comes from the updated
   latent (Attend-and-Excite's choice; the reference reuses the stale one).
3. masks from those maps; cond and uncond predictions fused per image; the caller
   applies CFG to the B fused cond and B fused uncond predictions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator, Mapping, Protocol, Sequence

import torch
import torch.nn as nn

from .attention import AttentionCapture, CaptureRequest, cross_attention_modules, map_size
from .loss import (DEFAULT_TAU, LossGradient, LossTokens, agreeing_maps, concept_overlap, contrastive_loss, loss_maps,
                   masked_contrastive_loss, with_gradient_through)
from .masks import (MaskMethod, MaskOverlap, MaskTokens, MaskUpsampling, Morphology, fuse, step_masks,
                    threshold_masks)
from .optimiser import OUT_OF_MEMORY, Backward, LatentOptimiser, TwoPaths
from .records import StepRecord
from .routing import Delta, Route, RowRouter
from .tokens import TokenMapSpec
from .update import LatentSpace, Schedule

log = logging.getLogger("clora")


@dataclass(frozen=True)
class RowLayout:
    """Which (image, variant, uncond) each batch row of a model call is."""

    image: torch.Tensor  # (R,) long
    variant: torch.Tensor  # (R,) long
    uncond: torch.Tensor  # (R,) bool

    def __len__(self) -> int:
        return self.image.numel()

    def select(self, rows: torch.Tensor) -> "RowLayout":
        """The layout of a subset of the rows, in the order given."""
        rows = rows.to(self.image.device)
        return RowLayout(self.image[rows], self.variant[rows], self.uncond[rows])

    def of_images(self, images: torch.Tensor) -> "RowLayout":
        """The same rows, image b renumbered ``images[b]`` (some images of a larger batch)."""
        return RowLayout(images.to(self.image.device)[self.image], self.variant, self.uncond)

    @classmethod
    def build(cls, images: int, variants: int, with_uncond: bool, device: torch.device | str = "cpu",
              uncond_variants: int | None = None) -> "RowLayout":
        """Cond rows image-major (b0v0, b0v1, ..., b1v0, ...), then the uncond rows in the same order
        (of the first ``uncond_variants`` variants only, when given)."""
        halves = (False, True) if with_uncond else (False,)
        image, variant, uncond = [], [], []
        for u in halves:
            for b in range(images):
                for v in range(variants if not u or uncond_variants is None else uncond_variants):
                    image.append(b)
                    variant.append(v)
                    uncond.append(u)
        return cls(
            torch.tensor(image, dtype=torch.long, device=device),
            torch.tensor(variant, dtype=torch.long, device=device),
            torch.tensor(uncond, dtype=torch.bool, device=device),
        )


class UncondRows(str, enum.Enum):
    """The unconditional rows of the fused pass.

    - PER_VARIANT: one per variant, its LoRAs routed, fused with the cond rows' masks (the paper's);
    - SHARED: one per image, the base variant's (K + 2 rows a step instead of 2K + 2); classifier-free
      guidance then runs from the base model's unconditional prediction to the fused cond one.
    """

    PER_VARIANT = "per_variant"
    SHARED = "shared"


class RowModel(Protocol):
    """Runs the model on rows. It may also define ``row_groups(layout) -> [row indices]``: rows
    that must not share a call (conditionings of different token lengths, which the host runs
    apart rather than padding them) are then run group by group."""

    def __call__(self, x: torch.Tensor, layout: RowLayout) -> torch.Tensor:
        """Run the model on rows ``x`` (R, C, H, W) described by ``layout``; return (R, C, H, W)."""


def split_rows(rows: torch.Tensor, most: int | None) -> list[torch.Tensor]:
    """``rows`` cut into consecutive chunks of at most ``most`` (all of them when None)."""
    if most is None or len(rows) <= most:
        return [rows]
    return list(torch.split(rows, max(1, most)))


def row_groups(model: RowModel, layout: RowLayout) -> list[torch.Tensor]:
    """The row groups ``model`` asks to be called with (one group of every row by default)."""
    split = getattr(model, "row_groups", None)
    groups = split(layout) if split is not None else None
    return groups if groups else [torch.arange(len(layout), device=layout.image.device)]


def map_structure(specs: Sequence[TokenMapSpec]) -> tuple:
    """What images must share to run in one step: each map's variant, concept and mask flag."""
    return tuple((s.variant, s.concept, s.mask, s.trigger) for s in specs)


@dataclass(frozen=True)
class LoRAUse:
    """One LoRA applied to a variant's rows."""

    name: str
    deltas: Mapping[str, Delta]
    multiplier: float = 1.0


@dataclass(frozen=True)
class EngineSettings:
    step_size: float = 20.0
    schedule: Schedule = Schedule()
    # stop refining once the loss improves by less than this (relative); None: the paper's fixed count,
    # the default: a 1 % tolerance lost 0.42 [0.13, 0.71] of the successes in bench.defaults (docs/quality.md)
    refine_tolerance: float | None = None
    # heavy-ball momentum of the latent update within one sampling step's iterations (reset every
    # step, so it acts on refinement only); 0 is the paper's plain gradient step
    momentum: float = 0.0
    # the loss of the gradient passes from the down path's H/32 maps only (a pass stopped after
    # input_blocks.8, about half the cost); False: every H/32 layer, the paper's (masks always are)
    down_path_loss: bool = False
    tau: float = DEFAULT_TAU
    mask_threshold: float = 0.4
    morphology: Morphology = Morphology.NONE
    # which token maps make each variant's mask (masks.MaskTokens). "subject" (its subject words, the
    # trigger left out) since 0.5.0: chosen on seeds 0-5, then on held-out seeds +0.49 [+0.35, +0.63] in
    # two-LoRA success over the paper's rule in world 1, +0.26 [+0.14, +0.39] in world 2 (intervals over pictures;
    # over seeds [+0.35, +0.63] and [-0.01, +0.54]; docs/quality.md)
    mask_tokens: MaskTokens = MaskTokens.SUBJECT
    # how the masks grow from the maps' size to the latent's (masks.MaskUpsampling); nearest: the paper's blocks
    mask_upsampling: MaskUpsampling = MaskUpsampling.NEAREST
    # where several variants' masks cover a pixel (masks.MaskOverlap); shared: averaged, the paper's
    mask_overlap: MaskOverlap = MaskOverlap.SHARED
    # which token maps the contrastive loss compares (loss.LossTokens); paper: trigger words included
    loss_tokens: LossTokens = LossTokens.PAPER
    # through which maps the loss's gradient reaches the latent (loss.LossGradient); all: the paper's
    loss_gradient: LossGradient = LossGradient.ALL
    # the fused pass's unconditional rows (UncondRows); per_variant: the paper's
    uncond_rows: UncondRows = UncondRows.PER_VARIANT
    # the masks fusing step t are mask_memory * step t-1's + (1 - mask_memory) * this step's own
    # (an exponential average over steps: a pixel that flips between variants gets a blend); 0: the paper's
    mask_memory: float = 0.0
    # the latent update less its mean per channel over each region of the previous step's masks
    # (update.without_region_means): it may move where a subject's attention sits but not a region's
    # colour, which the loss otherwise pushes towards the base model's palette; False: the paper's
    update_keeps_means: bool = False
    # with update_keeps_means: only the gradient through the other variants' maps (the base prompt's, the
    # other LoRAs') loses its regional means; the path through each subject's own-variant maps stays whole
    keeps_means_others_only: bool = False
    # from this many content subjects on, the update runs as update_keeps_means with keeps_means_others_only
    # (unless update_keeps_means is set otherwise); 0: never, the paper's update. 3 since 0.7.0: chosen on seeds
    # 0-5 (three LoRAs +0.11 and +0.22 in the two worlds, two LoRAs -0.17 and -0.06), held out on seeds 100-105 and
    # on the three word orders that chose nothing (docs/quality.md)
    keeps_means_from: int = 3
    # from this fraction of the steps on, the masks grow with soft (bilinear) edges whatever mask_upsampling
    # says: the layout is settled by then and a hard seam only leaves texture behind; 1: never (the paper's)
    soft_edges_from: float = 1.0


@dataclass
class EngineHooks:
    """Host integration points: progress text during refinement and interruption."""

    on_refine: Callable[[int, int], None] = lambda i, n: None
    interrupted: Callable[[], bool] = lambda: False
    warn: Callable[[str], None] = lambda message: log.warning(message)


@dataclass
class StepOutput:
    cond: torch.Tensor  # (B, C, H, W) fused cond predictions
    uncond: torch.Tensor  # (B, C, H, W) fused uncond predictions
    maps: torch.Tensor  # (B, P, h, w) token maps of the cond rows
    masks: torch.Tensor  # (B, V, H, W) masks used for the fusion


@contextlib.contextmanager
def gradient_ready(root: nn.Module) -> Iterator[None]:
    """Make a no-grad-trained module usable for a gradient w.r.t. its input.

    Gradient checkpointing (ldm/sgm ``checkpoint``/``use_checkpoint`` flags) runs its
    forward under no_grad, which would leave the captured maps without a graph; and
    parameters that require grad make autograd keep every input for weight gradients
    we never need. Both are switched off for the block and restored exactly.
    """
    flags: list[tuple[nn.Module, str, bool]] = []
    params: list[nn.Parameter] = []
    try:
        for module in root.modules():
            for attr in ("checkpoint", "use_checkpoint"):
                value = module.__dict__.get(attr)
                if isinstance(value, bool) and value:
                    flags.append((module, attr, value))
                    setattr(module, attr, False)
        for p in root.parameters():
            if p.requires_grad:
                params.append(p)
                p.requires_grad_(False)
        yield
    finally:
        for module, attr, value in flags:
            setattr(module, attr, value)
        for p in params:
            p.requires_grad_(True)


@dataclass
class _Call:
    """One model call of a pass, planned before it runs: its rows of the layout, their layout and
    routes, and the capture request of the maps that fall in it (``picked``: their request order)."""

    rows: torch.Tensor
    layout: RowLayout
    routes: list[Route]
    request: CaptureRequest | None
    picked: torch.Tensor


class CLoRAEngine:
    """Runs CLoRA step by step for one generation (or one sampling pass of it).

    The calling contract: build it with the UNet, each variant's LoRAs, the token maps and the
    settings (``max_rows``: the most rows one UNet call may take); ``open()`` it (or use it as a
    context manager), which puts the attention capture on the UNet; call ``step`` once per model
    step of the sampler, with the token maps of the images it runs when they change (a prompt-editing
    boundary, another group of a batch) and the batch positions of those images when they are a part
    of the batch; ``close()`` takes every hook off (idempotent). ``records`` holds one ``StepRecord``
    per step, ``last_output`` the latest step's maps and masks.
    """

    def __init__(
        self,
        unet: nn.Module,
        variant_loras: Sequence[Sequence[LoRAUse]],
        token_maps: Sequence[TokenMapSpec],
        settings: EngineSettings = EngineSettings(),
        hooks: EngineHooks | None = None,
        functional_gradient: bool = False,
        mask_method: MaskMethod = step_masks,
        max_rows: int | None = None,
    ):
        self.unet = unet
        self.variant_loras = [list(v) for v in variant_loras]
        self.settings = settings
        self.hooks = hooks or EngineHooks()
        self.router = RowRouter(unet)
        self.capture = AttentionCapture(cross_attention_modules(unet))
        self.records: list[StepRecord] = []
        self.last_output: StepOutput | None = None  # maps and masks of the latest step, for previews
        # the most rows one UNet call may take (None: no cap; the host's low-VRAM setting sets it); halved
        # after a call runs out of memory
        self.max_rows = max_rows
        # the latent update and its state (fp16 loss scale, updates turned off after running out of memory)
        self.optimiser = LatentOptimiser(next(unet.parameters()).dtype == torch.float16, self.hooks.on_refine,
                                         self.hooks.interrupted, self.warn_once)
        # gradient passes through torch.func instead of autograd (see differentiable_loss)
        self.functional_gradient = functional_gradient
        # how each fused pass's maps become its masks (masks.MaskMethod); the settings' method by default
        self.mask_method = mask_method
        self._warned: set[str] = set()
        # the masks of each group of images' latest step (mask_memory, update_keeps_means)
        self._last_masks: dict[Hashable, torch.Tensor] = {}
        self.token_maps = token_maps

    # -- lifecycle --------------------------------------------------------------------------
    def open(self) -> "CLoRAEngine":
        """Put the attention capture on the UNet (``close`` takes it off)."""
        self.capture.install()
        return self

    def __enter__(self) -> "CLoRAEngine":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.router.remove()
        self.capture.remove()

    # -- configuration ----------------------------------------------------------------------
    @property
    def n_variants(self) -> int:
        return len(self.variant_loras)

    @property
    def token_maps(self) -> list[TokenMapSpec]:
        """The token maps (of the first image, when images have their own positions)."""
        return self._token_maps

    @token_maps.setter
    def token_maps(self, specs: Sequence[TokenMapSpec]) -> None:
        """Replace the token maps, the same for every image (e.g. at a prompt-editing boundary)."""
        self.set_token_maps([specs])

    def set_token_maps(self, per_image: Sequence[Sequence[TokenMapSpec]]) -> None:
        """Token maps per image of the batch the next steps run (one list: the same for every image).

        The images share one UNet call, so their maps must agree in everything but the token
        position (variant, concept and mask flag of each map, in order): prompts that differ
        in wording around the same subjects.
        """
        per_image = [list(specs) for specs in per_image]
        specs = per_image[0] if per_image else []
        if not specs:
            raise ValueError("CLoRA needs at least one subject token map")
        if any(not 0 <= s.variant < self.n_variants for s in specs):
            raise ValueError("a token map names a variant that has no LoRA list")
        structure = map_structure(specs)
        if any(map_structure(other) != structure for other in per_image[1:]):
            raise ValueError("images of one CLoRA step must have token maps of the same structure")
        self._token_maps = specs
        self._labels = torch.tensor([s.concept for s in specs], dtype=torch.long)
        self._map_variant = torch.tensor([s.variant for s in specs], dtype=torch.long)
        self._map_trigger = torch.tensor([s.trigger for s in specs], dtype=torch.bool)
        self._map_own = torch.tensor([s.mask for s in specs], dtype=torch.bool)
        self._map_position = torch.tensor([[s.position for s in image] for image in per_image], dtype=torch.long)
        self._n_concepts = len(set(self._labels.tolist()))
        self._loss_keep = loss_maps(specs, self.settings.loss_tokens)  # once per map layout, not per pass

    @property
    def update_settings(self) -> EngineSettings:
        """The settings the latent update runs with: ``keeps_means_from`` content subjects or more turn on
        ``update_keeps_means`` with ``keeps_means_others_only`` (where ``update_keeps_means`` is not set)."""
        s = self.settings
        if s.keeps_means_from and self._n_concepts >= s.keeps_means_from and not s.update_keeps_means:
            return dataclasses.replace(s, update_keeps_means=True, keeps_means_others_only=True)
        return s

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.hooks.warn(message)

    # -- one step ---------------------------------------------------------------------------
    def step(
        self,
        x: torch.Tensor,
        step: int,
        total_steps: int,
        space: LatentSpace,
        model: RowModel,
        allow_update: bool = True,
        update_region: torch.Tensor | None = None,
        group: Hashable = None,
        token_maps: Sequence[Sequence[TokenMapSpec]] | None = None,
        batch_images: list[int] | None = None,
    ) -> StepOutput:
        """One sampling step. ``x`` (B, C, H, W) is the sampler's latent, updated in place;
        ``update_region`` (broadcastable to one image's latent, or one per image) confines the
        update to where it is 1 (the inpaint mask); ``group`` names the images when a caller
        steps several groups of a batch in turn (``mask_memory`` keeps each group's masks);
        ``token_maps``: the images' token maps from this step on (``set_token_maps``);
        ``batch_images``: the images' positions in the batch, when they are a part of it (the
        step's record says so)."""
        if token_maps is not None:
            self.set_token_maps(token_maps)
        record = StepRecord(step, batch_images=batch_images)
        self.records.append(record)
        iterations = self.settings.schedule.iterations_at(step, total_steps)
        if allow_update and self.optimiser.enabled and self._n_concepts >= 2 and iterations:
            self.optimiser.run(x, space, lambda z, images: self.differentiable_loss(z, model, images), iterations, record,
                               self.update_settings, update_region, self._last_masks.get(group))
        self.last_output = self._fused_pass(x, step, total_steps, model, record, group)
        return self.last_output

    @contextlib.contextmanager
    def differentiable_loss(self, x: torch.Tensor, model: RowModel,
                            step_images: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, Backward]]:
        """Each image's contrastive loss (B,) at latent ``x`` (detached) and ``backward(weights, retain)``:
        the gradient of sum(weights * losses) w.r.t. ``x``, callable again while ``retain`` was True.

        One gradient pass: the B*V cond rows only, stopped after the last H/32 layer. With
        ``functional_gradient`` the pass runs under ``torch.func`` (vjp of the functionalised
        forward): hosts that sample in inference mode with inference-tensor weights and
        in-place residuals (the Forge family) allow no autograd graph, and this needs neither
        a graph on the weights nor a copy of them.

        ``step_images``: which of the step's images the images of ``x`` are (all, in order, when None;
        a refinement that goes on for some images only passes those).
        """
        images = x.shape[0]
        layout = RowLayout.build(images, self.n_variants, with_uncond=False, device=x.device)
        # the model and the token positions see the step's image numbers; ``layout`` indexes ``x``
        model_layout = layout if step_images is None else layout.of_images(step_images)

        request = self._request(layout, x, grad=True, step_images=step_images)
        built = self._deltas_built() if self.functional_gradient else contextlib.nullcontext()
        with gradient_ready(self.unet), built:
            # the calls' row bookkeeping is planned here, outside the pass: inside a torch.func
            # transform, tensors made there cannot be read back as Python values
            calls = self._calls(model, model_layout, request)

            settings = self.update_settings
            two = settings.update_keeps_means and settings.keeps_means_others_only

            def losses_of(maps: torch.Tensor) -> torch.Tensor:
                maps = maps.reshape(images, len(self._token_maps), *request.map_hw)
                if not two:
                    return self._image_losses(maps)
                # the same losses twice: through every map, then through the own-variant maps alone
                return torch.cat([self._image_losses(maps), self._image_losses(maps, LossGradient.OWN)])

            def losses_at(z: torch.Tensor) -> torch.Tensor:
                return losses_of(self._run(model, z.index_select(0, layout.image), model_layout, request, calls)[1])

            def paths(raw: Backward, losses: torch.Tensor) -> tuple[torch.Tensor, Backward]:
                if not two:
                    return losses.detach(), raw
                zero = torch.zeros(images, device=losses.device, dtype=losses.dtype)
                return losses[:images].detach(), TwoPaths(
                    lambda weights, retain: raw(torch.cat([weights.to(losses.dtype), zero]), retain),
                    lambda weights, retain: raw(torch.cat([zero, weights.to(losses.dtype)]), retain))

            if self.max_rows is not None and len(calls) > 1:
                # rows capped: one call's graph at a time (the maps of every call first, without a graph)
                losses, raw = self._recomputed_gradient(model, x, layout, model_layout, request, losses_of)
                yield paths(raw, losses)
                return
            if self.functional_gradient:
                losses, vjp = torch.func.vjp(torch.func.functionalize(losses_at), x.clone())
                yield paths(lambda weights, retain: vjp(weights.to(losses.dtype))[0], losses)
                return
            with torch.enable_grad():
                leaf = x.detach().requires_grad_(True)
                losses = losses_at(leaf)

                def backward(weights: torch.Tensor, retain: bool) -> torch.Tensor:
                    (grad,) = torch.autograd.grad((losses * weights.to(losses.dtype)).sum(), leaf, retain_graph=retain)
                    return grad

                yield paths(backward, losses)

    def _recomputed_gradient(self, model: RowModel, x: torch.Tensor, layout: RowLayout, model_layout: RowLayout,
                             request: CaptureRequest, losses_of: Callable[[torch.Tensor], torch.Tensor],
                             ) -> tuple[torch.Tensor, Backward]:
        """The gradient pass with at most one call's graph alive: the memory of ``max_rows`` rows.

        The maps of every call are taken first without a graph, and the loss's gradient with
        respect to them; each backward then runs every call again with its graph and sends that
        call's share of the map gradient back to the latent (the sum over calls is the whole
        gradient: each map depends on its own call's rows only). It costs one forward of every
        call more than the pass that keeps every graph, which is what a row cap is for.
        """
        with torch.no_grad():
            maps = self._run(model, x.index_select(0, layout.image), model_layout, request)[1]
        losses, map_vjp = torch.func.vjp(losses_of, maps)

        def backward(weights: torch.Tensor, retain: bool) -> torch.Tensor:
            (map_grad,) = map_vjp(weights.to(losses.dtype))
            grad = torch.zeros_like(x)
            for call in self._calls(model, model_layout, request):  # planned again: a halving may have cut them
                if call.request is None:
                    continue
                share = map_grad.index_select(0, call.picked.to(map_grad.device))

                def call_maps(z: torch.Tensor, call: _Call = call) -> torch.Tensor:
                    return self._run_call(model, z.index_select(0, layout.image), call)[1]

                if self.functional_gradient:
                    _, vjp = torch.func.vjp(torch.func.functionalize(call_maps), x.clone())
                    (part,) = vjp(share)
                else:
                    with torch.enable_grad():
                        leaf = x.detach().requires_grad_(True)
                        (part,) = torch.autograd.grad(call_maps(leaf), leaf, grad_outputs=share)
                grad = grad + part
            return grad

        return losses.detach(), backward

    @contextlib.contextmanager
    def _deltas_built(self) -> Iterator[None]:
        """The variants' lazy deltas built before the block and dropped after it: the forward of a
        functional gradient pass runs inside a torch.func transform, where a host's own merge may
        fail (the Forge hosts' adapters add in place: the host logs the error and the layer would
        get no delta)."""
        saved = self.variant_loras
        self.variant_loras = [[dataclasses.replace(use, deltas=self.router.built(use.deltas)) for use in uses]
                              for uses in saved]
        try:
            yield
        finally:
            self.variant_loras = saved

    def loss_and_gradient(self, x: torch.Tensor, model: RowModel) -> tuple[float, torch.Tensor]:
        """The contrastive loss at latent ``x``, summed over its images, and its gradient (one gradient pass)."""
        with self.differentiable_loss(x, model) as (losses, backward):
            grad = backward(torch.ones_like(losses), False)
        return float(losses.sum()), grad.detach()

    def _fused_pass(self, x: torch.Tensor, step: int, total_steps: int, model: RowModel, record: StepRecord,
                    group: Hashable = None) -> StepOutput:
        images = x.shape[0]
        shared = UncondRows(self.settings.uncond_rows) is UncondRows.SHARED
        layout = RowLayout.build(images, self.n_variants, with_uncond=True, device=x.device,
                                 uncond_variants=1 if shared else None)
        with torch.no_grad():
            request = self._request(layout, x, grad=False)
            out, maps = self._run(model, x.index_select(0, layout.image), layout, request)
            maps = maps.reshape(images, len(self._token_maps), *request.map_hw)
            record.image_loss_after = self._image_losses(maps).tolist()
            record.loss_after = sum(record.image_loss_after)
            record.overlap_after = float(
                torch.stack([concept_overlap(m, self._labels.to(m.device)) for m in maps]).mean()
            )
            masks = self.mask_method(maps, self._token_maps, self.n_variants, tuple(x.shape[-2:]), step, total_steps,
                                     self.settings)
            memory = self.settings.mask_memory
            held = self._last_masks.get(group)
            if memory and held is not None and held.shape == masks.shape:
                masks = memory * held + (1.0 - memory) * masks
            self._last_masks[group] = masks
            conds = out[: images * self.n_variants].reshape(images, self.n_variants, *out.shape[1:])
            cond = torch.stack([fuse(conds[b], masks[b]) for b in range(images)])
            if shared:
                uncond = out[images * self.n_variants:]
            else:
                unconds = out[images * self.n_variants:].reshape(images, self.n_variants, *out.shape[1:])
                uncond = torch.stack([fuse(unconds[b], masks[b]) for b in range(images)])
        return StepOutput(cond=cond, uncond=uncond, maps=maps, masks=masks)

    # -- pieces -------------------------------------------------------------------------------
    def _run(
        self, model: RowModel, x_rows: torch.Tensor, layout: RowLayout, request: CaptureRequest,
        calls: list["_Call"] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The model's output on every row (None after a gradient pass's early stop) and the requested maps.

        One call per row group of the model, each cut to ``max_rows`` (``calls``: planned by
        ``_calls`` beforehand); a call that runs out of device memory is run again as two halves
        (down to single rows). Each call routes its own rows and captures the maps that fall in
        it, which are put back in request order.
        """
        if calls is None:
            calls = self._calls(model, layout, request)
        if len(calls) == 1:
            try:
                y = None  # stays None when the capture stops a gradient pass early
                with self.router.routed(self._routes(layout), len(layout)), self.capture.capturing(request):
                    y = model(x_rows, layout)
                return y, self.capture.maps()
            except OUT_OF_MEMORY:
                if len(layout) == 1:
                    raise
                self._after_out_of_memory(x_rows.device, len(layout))
                calls = [self._call(layout, request, c) for c in split_rows(calls[0].rows, self.max_rows)]
        out: torch.Tensor | None = None
        parts, order = [], []
        pending = list(calls)
        while pending:
            call = pending.pop(0)
            try:
                y, maps = self._run_call(model, x_rows, call)
            except OUT_OF_MEMORY:
                if len(call.rows) == 1:
                    raise
                self._after_out_of_memory(x_rows.device, len(call.rows))
                pending = [self._call(layout, request, c) for p in [call, *pending] for c in split_rows(p.rows, self.max_rows)]
                continue
            if maps is not None:
                parts.append(maps)
                order.append(call.picked)
            if y is not None:
                out = y.new_empty((len(layout), *y.shape[1:])) if out is None else out
                out[call.rows] = y
        maps = torch.cat(parts).index_select(0, torch.argsort(torch.cat(order)))
        return out, maps

    def _calls(self, model: RowModel, layout: RowLayout, request: CaptureRequest) -> list["_Call"]:
        """The model calls that run ``layout``'s rows: the model's row groups, each cut to ``max_rows``."""
        chunks = [c for g in row_groups(model, layout) for c in split_rows(g, self.max_rows)]
        return [self._call(layout, request, rows) for rows in chunks]

    def _call(self, layout: RowLayout, request: CaptureRequest, rows: torch.Tensor) -> "_Call":
        device = request.rows.device
        rows = rows.to(device)
        local = torch.full((len(layout),), -1, dtype=torch.long, device=device)
        local[rows] = torch.arange(len(rows), device=device)
        picked = (local[request.rows] >= 0).nonzero().squeeze(1)
        sub = layout.select(rows)
        sub_request = (dataclasses.replace(request, rows=local[request.rows[picked]], cols=request.cols[picked])
                       if len(picked) else None)
        return _Call(rows, sub, self._routes(sub), sub_request, picked)

    def _run_call(self, model: RowModel, x_rows: torch.Tensor, call: "_Call") -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One planned call: its output and the maps of the requested rows among its rows."""
        capture = self.capture.capturing(call.request) if call.request is not None else contextlib.nullcontext()
        y = None  # stays None when the capture stops a gradient pass early
        with self.router.routed(call.routes, len(call.layout)), capture:
            y = model(x_rows.index_select(0, call.rows.to(x_rows.device)), call.layout)
        return y, self.capture.maps() if call.request is not None else None

    def _after_out_of_memory(self, device: torch.device, failed_rows: int) -> None:
        """Halve the row cap below the call that failed; it stays for the rest of the generation."""
        self.max_rows = min(self.max_rows or failed_rows, (failed_rows + 1) // 2)
        self.warn_once("oom_rows", "CLoRA: out of memory in a UNet call; its rows run in smaller chunks from now on")
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def masks(self, maps: torch.Tensor, latent_hw: Sequence[int], upsampling: MaskUpsampling | None = None) -> torch.Tensor:
        """(B, V, H, W) masks from (B, P, h, w) maps at a masked step, grown with the settings'
        ``mask_upsampling`` or with ``upsampling``."""
        return threshold_masks(maps, self._token_maps, self.n_variants, tuple(latent_hw), self.settings,
                               upsampling or self.settings.mask_upsampling)

    def _image_losses(self, maps: torch.Tensor, gradient: LossGradient | None = None) -> torch.Tensor:
        """(B,) contrastive loss of each image's (P, h, w) maps, over the maps the loss-token rule keeps
        (``gradient``: through which maps the gradient goes, instead of the settings' rule)."""
        labels = self._labels.to(maps.device)
        maps = with_gradient_through(maps, self._map_own, gradient or self.settings.loss_gradient)
        if LossTokens(self.settings.loss_tokens) is LossTokens.AGREEING:  # chosen per image and pass
            trigger = self._map_trigger.to(maps.device)
            return torch.stack([masked_contrastive_loss(m, labels, agreeing_maps(m, labels, trigger), self.settings.tau)
                                for m in maps])
        keep = self._loss_keep.to(maps.device)
        return torch.stack([contrastive_loss(m[keep], labels[keep], self.settings.tau) for m in maps])

    def _request(self, layout: RowLayout, x: torch.Tensor, grad: bool,
                 step_images: torch.Tensor | None = None) -> CaptureRequest:
        """The maps to capture for ``x``'s images (``step_images``: which of the step's images they are)."""
        images = x.shape[0]
        variants = self.n_variants
        maps = len(self._token_maps)
        image = torch.arange(images).repeat_interleave(maps)
        variant = self._map_variant.repeat(images)
        rows = image * variants + variant  # cond rows come first in every layout
        positions = self._map_position
        if len(positions) == 1:
            positions = positions.expand(images, -1)
        elif step_images is not None:
            positions = positions.index_select(0, step_images.to(positions.device))
        elif len(positions) != images:
            raise ValueError(f"token maps were set for {len(positions)} images, the step has {images}")
        cols = positions.reshape(-1)
        return CaptureRequest(
            rows=rows.to(x.device), cols=cols.to(x.device), map_hw=map_size(tuple(x.shape[-2:])), grad=grad, stop_early=grad,
            down_only=grad and self.settings.down_path_loss
        )

    def _routes(self, layout: RowLayout) -> list[Route]:
        routes = []
        variant = layout.variant.tolist()
        for v, uses in enumerate(self.variant_loras):
            rows = [r for r, rv in enumerate(variant) if rv == v]
            for use in uses:
                routes.append(Route(use.deltas, rows, use.multiplier, use.name))
        return routes
