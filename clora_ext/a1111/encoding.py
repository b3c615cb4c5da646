"""Variant prompts through the host's prompt machinery, each with its text-encoder LoRAs (host-facing).

The host's cond cache cannot tell our text-encoder LoRA state apart, so results are
kept here, keyed by everything that changes an encoding: the text, the LoRA set and
the files' mtimes, the prompt's own LoRAs, the step counts of the schedule, the image
size (SDXL) and the options the host's own cache key holds.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping

from modules import devices, prompt_parser, shared

from .lora_bridge import HostLoRA, networks, text_encoder_loras
from .plan import ChunkedTokenizer, EncodeJob, VariantPlan

CACHE_SIZE = 64
_cache: "OrderedDict[tuple, list]" = OrderedDict()


@dataclass(frozen=True)
class Schedule:
    """How the host schedules prompt editing for one sampling pass."""

    steps: int
    hires_steps: int | None
    width: int
    height: int

    @property
    def use_old(self) -> bool:
        return bool(shared.opts.use_old_scheduling)

    def prompt_schedules(self, texts: list[str]) -> list[list[tuple[int, str]]]:
        raw = prompt_parser.get_learned_conditioning_prompt_schedules(texts, self.steps, self.hires_steps, self.use_old)
        return [[(int(end), text) for end, text in schedule] for schedule in raw]


def host_tokenizer() -> ChunkedTokenizer:
    model = shared.sd_model
    chunker = model.conditioner.embedders[0] if model.is_sdxl else model.cond_stage_model
    return ChunkedTokenizer(chunker)


def _context_key(schedule: Schedule) -> tuple:
    opts = shared.opts
    prompt_loras = tuple((n.name, n.te_multiplier, getattr(n, "mtime", None)) for n in networks().loaded_networks)
    return (
        id(shared.sd_model),
        shared.sd_model.sd_checkpoint_info,
        schedule,
        schedule.use_old,
        prompt_loras,
        opts.CLIP_stop_at_last_layers,
        opts.emphasis,
        opts.sdxl_crop_left,
        opts.sdxl_crop_top,
        opts.comma_padding_backtrack,
    )


def encode(plan: VariantPlan, loras: Mapping[str, HostLoRA], schedule: Schedule) -> list[list[Any]]:
    """Scheduled conditionings ([ScheduledPromptConditioning]) of every job of ``plan``, in job order."""
    context = _context_key(schedule)

    def key(job: EncodeJob) -> tuple:
        return (job, tuple(loras[name].mtime for name, _ in job.loras), context)

    results: dict[int, list] = {}
    for (lora_set, negative), indices in plan.jobs_by_lora_set().items():
        missing = []
        for i in indices:
            cached = _cache.get(key(plan.jobs[i]))
            if cached is None:
                missing.append(i)
            else:
                _cache.move_to_end(key(plan.jobs[i]))
                results[i] = cached
        if not missing:
            continue
        texts = prompt_parser.SdConditioning(
            [plan.jobs[i].text for i in missing],
            is_negative_prompt=negative,
            width=schedule.width,
            height=schedule.height,
        )
        with devices.autocast(), text_encoder_loras([(loras[name], weight) for name, weight in lora_set]):
            conds = prompt_parser.get_learned_conditioning(
                shared.sd_model, texts, schedule.steps, schedule.hires_steps, schedule.use_old
            )
        for i, cond in zip(missing, conds):
            results[i] = cond
            _cache[key(plan.jobs[i])] = cond
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return [results[i] for i in range(len(plan.jobs))]


def clear_cache() -> None:
    _cache.clear()
