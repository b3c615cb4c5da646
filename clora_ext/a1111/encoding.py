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

from ..webui import host as webui
from ..webui.plan import ChunkedTokenizer, EncodeJob, VariantPlan
from . import host
from .lora_bridge import HostLoRA, text_encoder_loras

CACHE_SIZE = 64
_cache: "OrderedDict[tuple, list]" = OrderedDict()


@dataclass(frozen=True)
class Schedule:
    """How the host schedules prompt editing for one sampling pass."""

    steps: int
    hires_steps: int | None
    width: int
    height: int

    def prompt_schedules(self, texts: list[str]) -> list[list[tuple[int, str]]]:
        return host.prompt_schedules(texts, self.steps, self.hires_steps)


def host_tokenizer() -> ChunkedTokenizer:
    return ChunkedTokenizer(webui.prompt_chunker(host.sd_model()))


def _context_key(schedule: Schedule) -> tuple:
    return (schedule, host.scheduling_options(), host.prompt_loras(), host.encoding_options(host.sd_model()))


def encode(plan: VariantPlan, loras: Mapping[str, HostLoRA], schedule: Schedule) -> list[list[Any]]:
    """Scheduled conditionings ([(end_at_step, cond)]) of every job of ``plan``, in job order."""
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
        texts = [plan.jobs[i].text for i in missing]
        with text_encoder_loras([(loras[name], weight) for name, weight in lora_set]):
            conds = host.learned_conditioning(texts, negative, schedule.steps, schedule.hires_steps,
                                              schedule.width, schedule.height)
        for i, cond in zip(missing, conds):
            results[i] = cond
            _cache[key(plan.jobs[i])] = cond
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return [results[i] for i in range(len(plan.jobs))]


def clear_cache() -> None:
    _cache.clear()
