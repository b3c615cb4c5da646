"""The CLoRA generation lifecycle every web UI host shares (host-facing through ``host``).

``begin`` (a script's ``process``) parses a request and opens its generation in the host
glue's ``Generations``; a generation is closed in one place, ``Generations.close_any``, when
the host closes ``p``. ``GenerationState`` holds what a generation carries across its passes
(arguments or the error that refuses it, notes, previews, the current pass); ``refused``
turns an error inside a pass into the answer the host's API gives. ``Pass`` is one sampling
pass on any host, driven through the host family's ``PassPort``: the host's runtime decides
only how the pass is hooked into its sampling and how each step's model call is made.
"""

from __future__ import annotations

import ctypes
import sys
import traceback
from typing import Any, Callable, Protocol, Sequence

import torch

from ..conditioning import ConditioningTable
from ..engine import CLoRAEngine, EngineHooks, LoRAUse
from ..records import update_summary
from ..routing import on_device
from ..tokens import PromptTokenizer
from ..update import schedule_notes
from . import host, infotext, samplers
from .loras import on_disk
from .params import CLoRAArgs, CLoRAArgsError, parse_args
from .plan import (CLoRARuntimeError, ProxyRows, VariantPlan, fused_step, pick_segment, plan_variants,
                   token_map_schedule)
from .previews import PreviewStore
from .samplers import SamplerSupport
from .settings import row_cap, settings_defaults


class RequestRefused(host.RefusalBase):
    """A request CLoRA cannot run, as the host's API answers it: 422 with the message.

    An HTTPException, because the host prints a full backtrace in its console for any
    other exception; the message is printed here once instead.
    """

    def __init__(self, message: str):
        super().__init__(status_code=422, detail=message)

    def __str__(self) -> str:
        return str(self.detail)


class HostError(host.RefusalBase):
    """An unexpected error inside a CLoRA pass (a host function that changed, a failing adapter, ...),
    as the API answers it: 500 with one line naming CLoRA, the host and its version; the traceback
    goes to the console once."""

    def __init__(self, message: str):
        super().__init__(status_code=500, detail=message)

    def __str__(self) -> str:
        return str(self.detail)


def refused(error: BaseException, host_label: str) -> BaseException:
    """The host-facing form of an error inside a CLoRA pass: CLoRA's own refusals answer 422 with
    their message; any other Exception answers 500 with one line (``HostError``); the host's own
    interruptions (BaseException, not Exception) and errors already in that form pass unchanged."""
    if isinstance(error, (CLoRARuntimeError, CLoRAArgsError)):
        message = str(error) if str(error).startswith("CLoRA") else f"CLoRA: {error}"
        print(f"{message} (request refused)")
        return RequestRefused(message)
    if not isinstance(error, Exception) or isinstance(error, host.RefusalBase):
        return error
    text = " ".join(str(error).split())
    if len(text) > 300:
        text = text[:300] + " ..."
    message = (f"CLoRA on {host_label} failed: {type(error).__name__}: {text}. The traceback is in the "
               "console; please report it with the host's version")
    traceback.print_exception(type(error), error, error.__traceback__)
    print(message)
    return HostError(message)


def begin(generations: Generations, p: Any, args: Sequence[Any], host_checks: Callable[[Any], None] | None = None) -> None:
    """The script's ``process``: parse the request and open its generation in ``generations``
    (``host_checks(p)``: the host family's own refusals, raised as ``CLoRARuntimeError``).

    Errors in the arguments cannot be raised here (the host logs and swallows script
    exceptions in ``process``): a generation opened with the error fails at its first
    model call, which fails the request (HTTP 422 through the API), so a request that
    asks for CLoRA is never run without it.
    """
    generations.close_any()  # what a run that never closed its p left open (X/Y/Z plot's copies)
    try:
        parsed = parse_args(args, settings_defaults())
    except CLoRAArgsError as e:
        if wants_clora(args):
            generations.open(p, None, e)
        return
    if not parsed.enabled:
        return
    if not parsed.concepts:
        print("CLoRA: enabled without any concept row (subject + LoRA); nothing to do")
        return
    try:
        if host_checks is not None:
            host_checks(p)
        if not (host.is_txt2img(p) or host.is_img2img(p)):
            raise CLoRARuntimeError(f"CLoRA: {type(p).__name__} is neither txt2img nor img2img; CLoRA runs in those two")
        refuse_refiner(p)
        units = host.controlnet_units_enabled(p)
        if units:
            raise CLoRARuntimeError(controlnet_message(f"ControlNet unit {units[0]} is enabled"))
        for concept in parsed.concepts:
            on_disk(concept.lora)  # fail early, naming a LoRA that is missing
    except CLoRARuntimeError as e:
        generations.open(p, None, e)
        return
    host.set_generation_param(p, infotext.KEY, infotext.dump(parsed))
    generations.open(p, parsed)


def refuse_refiner(p: Any) -> None:
    """The refiner switch loads another checkpoint part way, which the concepts' LoRAs do not fit
    (both glues: the Forge family keeps A1111's switch)."""
    if host.uses_refiner(p):
        raise CLoRARuntimeError("CLoRA: the refiner switch is not supported; turn the refiner off to use CLoRA")


def controlnet_message(what: str) -> str:
    # its UNet hook cannot tell CLoRA's variant rows cond from uncond, and it runs the UNet's
    # encoder without gradients, so the latent updates would silently do nothing
    return (f"CLoRA: {what}; CLoRA does not run together with ControlNet yet. "
            "Disable the ControlNet units or CLoRA")


def previews_of(generations: Generations, p: Any) -> list:
    """The script's ``postprocess``: the gallery previews of ``p``'s generation (none when off)."""
    generation = generations.serving(p)
    if generation is None or generation.args is None or not generation.args.previews:
        return []
    return generation.previews.images()


def wants_clora(args: Sequence[Any]) -> bool:
    if not args:
        return False
    first = args[0]
    return bool(first.get("enabled", True)) if isinstance(first, dict) else bool(first)


class Generations:
    """The owner of CLoRA generations: at most one is open, opened by ``open`` and closed
    only by ``close_any``, when the host closes its ``p`` (after success or failure) or when
    the next generation starts. ``make(p, args, error)`` builds a generation: each glue
    (A1111, Forge) has its own ``Generation`` and shares this owner."""

    def __init__(self, make: Callable[[Any, CLoRAArgs | None, Exception | None], Any]) -> None:
        self._make = make
        self._open: Any = None

    def open(self, p: Any, args: CLoRAArgs | None, error: Exception | None = None) -> Any:
        self.close_any()
        generation = self._make(p, args, error)
        self._open = generation
        host.on_close(p, lambda: self.close_any(p))
        return generation

    def serving(self, p: Any) -> Any:
        """The open generation of ``p``, if any."""
        generation = self._open
        return generation if generation is not None and p is not None and generation.p is p else None

    def close_any(self, p: Any = None) -> None:
        """Close the open generation (only ``p``'s when given); idempotent."""
        generation = self._open
        if generation is None or (p is not None and generation.p is not p):
            return
        self._open = None
        generation.close()


class GenerationState:
    """One CLoRA generation (all batches, both passes), for both glues: its arguments (or the error
    that refuses it), notes, previews and current pass (the glue's own, with ``close()``)."""

    def __init__(self, p: Any, args: CLoRAArgs | None, error: Exception | None):
        self.p = p
        self.args = args
        self.error = error
        self.notes: list[str] = []
        self.previews = PreviewStore()
        self._pass: Any = None

    def note(self, message: str) -> None:
        """Said once in the console and recorded in the infotext entry."""
        message = message.removeprefix("CLoRA: ")
        if message in self.notes:
            return
        self.notes.append(message)
        print(f"CLoRA: {message}")
        host.set_generation_param(self.p, infotext.KEY, infotext.dump(self.args, self.notes))

    def close_pass(self) -> None:
        if self._pass is not None:
            self._pass.close()
            self._pass = None

    def close(self) -> None:
        self.close_pass()


# -- one sampling pass ---------------------------------------------------------------------------


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

    def encode(self, plan: VariantPlan, loras: dict[str, Any], facts: host.PassFacts) -> list[list[tuple[int, Any]]]:
        """[(end_at_step, cond)] of every encoding job of ``plan``, each with its LoRAs' text-encoder part."""

    def tokenizer(self) -> PromptTokenizer:
        """The host's prompt tokenizer (its chunking), for the subject tokens' positions."""

    def prompt_schedules(self, texts: list[str], facts: host.PassFacts) -> list[list[tuple[int, str]]]:
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


class Pass:
    """One sampling pass on any web UI host, driven through its ``PassPort``: the variant plan, the
    LoRAs' deltas, the variants' encodings, token maps, the engine with its per-row routing, and the
    interrupt checks between UNet blocks. ``step`` runs one fused step; ``close`` takes every hook off."""

    def __init__(self, generation: GenerationState, port: PassPort):
        p = generation.p
        self.generation = generation
        self.port = port
        args = generation.args
        facts = host.pass_facts(p)
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
        self.updates = not self.hires and self.sampler.updates
        if self.hires:
            generation.note("hires pass: masks and routing only, no latent updates")
        elif not self.updates:
            generation.note(f"sampler {facts.sampler_name!r} {self.sampler.reason}: masks and fusion only, no latent updates")
        self._noted_schedule = False
        unet = port.attach()
        # this pass's device copies of the cached (CPU) deltas: gone with the pass
        param = next(unet.parameters())
        deltas = {name: on_device(lora.unet, param.device, param.dtype) for name, lora in self.loras.items()}
        variant_loras = [[LoRAUse(name, deltas[name], weight) for name, weight in lora_set]
                         for lora_set in self.plan.unet_loras]
        hooks = EngineHooks(on_refine=_on_refine, interrupted=host.interrupted, warn=generation.note)
        self.engine = CLoRAEngine(unet, variant_loras, self.token_maps[0][0][1], args.engine_settings(), hooks,
                                  functional_gradient=port.functional_gradient,
                                  max_rows=row_cap(self.images * self.plan.n_variants)).open()
        # Interrupt/Skip stop a (gradient) UNet pass between blocks, not only between passes
        blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
        self._stops = [block.register_forward_pre_hook(self._stop_if_interrupted) for block in blocks]

    def _stop_if_interrupted(self, module: Any, args: Any) -> None:
        if host.interrupted():
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
        iteration = host.batch_iteration(generation.p)

        def on_group(group: list[int], out: Any) -> None:
            generation.previews.record(iteration, group, out, maps[group[0]], self.plan)

        with host.progress_text_kept():
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
            print(f"CLoRA: {len(records)} model steps, {sum(r.iterations for r in records)} latent updates in {updated} steps")
            for line in update_summary(records):
                print(f"CLoRA: {line}")
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


def _on_refine(i: int, n: int) -> None:
    host.set_progress_text(f"CLoRA refine {i}/{n}")
