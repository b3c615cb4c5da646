"""One sampling pass on any host (host-free): ``Pass`` and the typed port it is driven through.

A host family's runtime makes a ``Pass`` for each sampling (one batch, first pass or hires) with a
``PassPort``: the port answers everything that is the host's (the model checks, its LoRA reader,
the variants' encodings, its tokenizer and prompt schedules, the sampler's name, the hook into its
sampling, padding, interrupt, progress line, the pass's facts). The pass does the rest, the same on
every host: variant plan, LoRA deltas on the device, token maps per prompt-editing segment, the
engine with its per-row routing, the schedule's notes, one fused step per model call
(``plan.fused_step``) and the cleanup. No host module is imported here.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Protocol, Sequence

import torch

from ..concepts import Composition
from ..conditioning import ConditioningTable
from ..engine import CLoRAEngine, EngineHooks, EngineSettings, LoRAUse
from ..records import update_summary
from ..routing import on_device
from ..tokens import PromptTokenizer
from ..update import schedule_notes
from . import samplers
from .plan import (CLoRARuntimeError, ProxyRows, VariantPlan, fused_step, pick_segment, plan_variants,
                   token_map_schedule)
from .previews import PreviewStore
from .samplers import SamplerSupport


@dataclass(frozen=True)
class PassFacts:
    """What one sampling pass is: its prompts and how the host schedules them."""

    hires: bool
    prompts: list[str]
    negatives: list[str]
    sampler_name: str
    steps: int  # the schedule's step count for prompt editing (the first pass's)
    hires_steps: int | None
    width: int
    height: int
    latent_updates: bool = True  # False: masks and fusion only, whatever the sampler allows


class PassPort(Protocol):
    """What a host family gives one sampling pass (one batch, first pass or hires): the typed port
    the shared ``Pass`` is driven through. Each host family's runtime makes one per pass."""

    # the gradient passes run under torch.func (hosts whose sampling allows no autograd graph)
    functional_gradient: bool

    def check_model(self) -> None:
        """Refuse a checkpoint this host's glue cannot run (``CLoRARuntimeError``)."""

    def load_lora(self, name: str) -> Any:
        """The installed LoRA ``name`` for the loaded model: an object whose ``unet`` maps UNet module
        names to deltas at strength 1 (cached between generations, on the CPU)."""

    def encode(self, plan: VariantPlan, loras: dict[str, Any], facts: PassFacts) -> list[list[tuple[int, Any]]]:
        """[(end_at_step, cond)] of every encoding job of ``plan``, each with its LoRAs' text-encoder part."""

    def tokenizer(self) -> PromptTokenizer:
        """The host's prompt tokenizer (its chunking), for the subject tokens' positions."""

    def prompt_schedules(self, texts: list[str], facts: PassFacts) -> list[list[tuple[int, str]]]:
        """[(end_at_step, text)] per text, by the host's prompt-editing rules."""

    def sampler_function(self) -> str | None:
        """The name of the host's sampler function (``samplers.SUPPORT``'s keys)."""

    def model_calls(self, total_steps: int, sampler: SamplerSupport) -> int | None:
        """The model calls the sampler makes in ``total_steps`` steps, where they are not the steps."""

    def attach(self) -> torch.nn.Module:
        """Hook the pass into the host's sampling; the UNet module the engine drives."""

    def pad_cond(self) -> torch.Tensor | None:
        """The cond every row is padded with to a common length, where the host pads cond and uncond."""

    def raise_interrupted(self) -> None:
        """Stop the UNet pass the way the host's own interrupt does."""

    # -- the generation's state in the host -----------------------------------------------------
    def facts(self) -> PassFacts:
        """What this pass is: its prompts and how the host schedules them."""

    def interrupted(self) -> bool:
        """Whether the user asked to interrupt or skip."""

    def refine_progress(self, iteration: int, iterations: int) -> None:
        """The latent refinement of the current step reached ``iteration`` of ``iterations``."""

    def progress_text_kept(self) -> ContextManager[None]:
        """The host's progress line as it was before the block, after it."""

    def batch_iteration(self) -> int:
        """Which batch of the generation this pass samples (previews are kept per batch)."""

    def max_rows(self, cond_rows: int) -> int | None:
        """The most UNet rows one call may take (None: no cap), for ``cond_rows`` cond rows."""

    def console(self, line: str) -> None:
        """A line for the host's console (what the pass's updates did)."""


class PassConcept(Protocol):
    lora: str


class PassArgs(Protocol):
    """What a pass reads of the generation's CLoRA settings (``webui.params.CLoRAArgs``)."""

    previews: bool

    @property
    def concepts(self) -> Sequence[PassConcept]: ...

    def composition(self) -> Composition: ...

    def engine_settings(self) -> EngineSettings: ...


class PassGeneration(Protocol):
    """What a pass needs of its generation (``webui.pipeline.GenerationState``)."""

    args: PassArgs
    previews: PreviewStore

    def note(self, message: str) -> None:
        """What runs differently from the settings (the infotext's notes)."""

    def warn(self, message: str) -> None:
        """What went wrong in the engine (a non-finite loss, out of memory), said once."""


class Pass:
    """One sampling pass on any web UI host, driven through its ``PassPort``: the variant plan, the
    LoRAs' deltas, the variants' encodings, token maps, the engine with its per-row routing, and the
    interrupt checks between UNet blocks. ``step`` runs one fused step; ``close`` takes every hook off."""

    def __init__(self, generation: PassGeneration, port: PassPort):
        self.generation = generation
        self.port = port
        args = generation.args
        facts = port.facts()
        self.hires = facts.hires
        composition = args.composition()
        port.check_model()
        try:
            self.plan = plan_variants(composition, facts.prompts, facts.negatives)
        except ValueError as e:
            raise CLoRARuntimeError(f"CLoRA: {e}") from None
        self.loras = {c.lora: port.load_lora(c.lora) for c in args.concepts}
        self.conds = port.encode(self.plan, self.loras, facts)
        self.cond_ends = [[end for end, _ in conds] for conds in self.conds]
        tokenizer = port.tokenizer()
        self.token_maps = []
        for variants in self.plan.variants:
            schedules = port.prompt_schedules([v.prompt for v in variants], facts)
            self.token_maps.append(token_map_schedule(composition, variants, tokenizer, schedules))
        self.images = len(facts.prompts)
        self.rows = ProxyRows(self.images, self.plan.n_variants)
        self.sampler = samplers.support(port.sampler_function())
        self.updates = facts.latent_updates and not self.hires and self.sampler.updates
        if self.hires:
            generation.note("hires pass: masks and routing only, no latent updates")
        elif facts.latent_updates and not self.sampler.updates:
            generation.note(f"sampler {facts.sampler_name!r} {self.sampler.reason}: masks and fusion only, no latent updates")
        self._noted_schedule = False
        unet = port.attach()
        # this pass's device copies of the cached (CPU) deltas: gone with the pass
        param = next(unet.parameters())
        deltas = {name: on_device(lora.unet, param.device, param.dtype) for name, lora in self.loras.items()}
        variant_loras = [[LoRAUse(name, deltas[name], weight) for name, weight in lora_set]
                         for lora_set in self.plan.unet_loras]
        hooks = EngineHooks(on_refine=port.refine_progress, interrupted=port.interrupted, warn=generation.warn)
        self.engine = CLoRAEngine(unet, variant_loras, self.token_maps[0][0][1], args.engine_settings(), hooks,
                                  functional_gradient=port.functional_gradient,
                                  max_rows=port.max_rows(self.images * self.plan.n_variants)).open()
        # Interrupt/Skip stop a (gradient) UNet pass between blocks, not only between passes
        blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
        self._stops = [block.register_forward_pre_hook(self._stop_if_interrupted) for block in blocks]

    def _stop_if_interrupted(self, module: Any, args: Any) -> None:
        if self.port.interrupted():
            self.port.raise_interrupted()

    def note_schedule(self, total_steps: int) -> None:
        """The schedule's notes (once per pass, where updates run), for a pass of ``total_steps`` steps."""
        if not self.updates or self._noted_schedule:
            return
        self._noted_schedule = True
        calls = self.port.model_calls(total_steps, self.sampler)
        for message in schedule_notes(self.generation.args.engine_settings().schedule, total_steps, calls,
                                      len(self.plan.composition.content)):
            self.generation.note(message)

    def cond_table(self, step: int) -> ConditioningTable:
        """Conds of every (uncond, variant, image) row at ``step``, stacked in ProxyRows.table_index order."""
        plan = self.plan
        rows = []
        for jobs in (plan.cond_job, plan.uncond_job):
            for v in range(plan.n_variants):
                for image in range(len(jobs)):
                    j = jobs[image][v]
                    rows.append(self.conds[j][pick_segment(self.cond_ends[j], step)][1])
        return ConditioningTable(rows, self.port.pad_cond())

    def step(self, inner: Callable[..., torch.Tensor], x: torch.Tensor, sigma: torch.Tensor, image_cond: torch.Tensor,
             step: int, total_steps: int, k_diffusion: bool, update_region: torch.Tensor | None) -> torch.Tensor:
        """One fused step (``plan.fused_step``) of the whole batch at the host's model step ``step``."""
        self.note_schedule(total_steps)
        maps = [segments[pick_segment([e for e, _ in segments], step)][1] for segments in self.token_maps]
        generation = self.generation
        previews = not self.hires and generation.args.previews
        iteration = self.port.batch_iteration()

        def on_group(group: list[int], out: Any) -> None:
            generation.previews.record(iteration, group, out, maps[group[0]], self.plan)

        with self.port.progress_text_kept():
            return fused_step(self.engine, inner, self.rows, x, sigma, image_cond, self.cond_table(step), maps, step,
                              total_steps, k_diffusion, self.updates, on_group if previews else None,
                              update_region=update_region)

    def close(self) -> None:
        """Take the pass's hooks off the model (idempotent) and report what its updates did."""
        if self.engine is None:
            return
        self.engine.close()
        for handle in self._stops:
            handle.remove()
        records = self.engine.records
        updated = sum(1 for r in records if r.iterations)
        if updated:  # did the updates lower the contrastive loss? per image, before and after at the same step
            self.port.console(f"{len(records)} model steps, {sum(r.iterations for r in records)} latent updates "
                              f"in {updated} steps")
            for line in update_summary(records):
                self.port.console(line)
        # the engine's hooks point back at this pass: break the cycle so that this pass's device
        # copies of the LoRAs are freed now, not at the next full garbage collection
        self.engine = None
        _return_freed_memory()


def _return_freed_memory() -> None:
    """Give the pass's freed CPU buffers back to the OS (glibc keeps them in its heap otherwise,
    so the server's RSS would only ever grow by each generation's peak)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to do
            pass
