"""Prompt schedules and learned conditioning, like ``modules.prompt_parser``.

Prompt editing is reduced to one form, ``[from:to:N]`` with an integer step N, which
is enough to give the glue prompts that change during sampling; AND is one sub-prompt
per image unless the prompt contains `` AND ``. A model's conds are tensors, one per prompt,
or SDXL's dict of batched tensors (``crossattn``, ``vector``), split per prompt as the host does.
"""

from __future__ import annotations

import re
from collections import namedtuple

import torch

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])

_EDIT = re.compile(r"\[([^\[\]:]*):([^\[\]:]*):(\d+)\]")


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__(prompts)
        if copy_from is not None:
            is_negative_prompt = getattr(copy_from, "is_negative_prompt", is_negative_prompt)
            width = getattr(copy_from, "width", width)
            height = getattr(copy_from, "height", height)
        self.is_negative_prompt = is_negative_prompt
        self.width = width
        self.height = height


def get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps=None, use_old_scheduling=False):
    steps = hires_steps or base_steps
    out = []
    for prompt in prompts:
        switches = sorted({int(m.group(3)) for m in _EDIT.finditer(prompt) if int(m.group(3)) < steps})
        schedule = []
        for end in [*switches, steps]:
            text = _EDIT.sub(lambda m: m.group(1) if end <= int(m.group(3)) else m.group(2), prompt)
            schedule.append([end, text])
        out.append(schedule)
    return out


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    schedules = get_learned_conditioning_prompt_schedules(prompts, steps, hires_steps, use_old_scheduling)
    res = []
    for schedule in schedules:
        conds = model.get_learned_conditioning(SdConditioning([text for _, text in schedule], copy_from=prompts))
        if isinstance(conds, dict):
            conds = [{key: value[i] for key, value in conds.items()} for i in range(len(schedule))]
        res.append([ScheduledPromptConditioning(end, cond) for (end, _), cond in zip(schedule, conds)])
    return res


class ComposableScheduledPromptConditioning:
    def __init__(self, schedules, weight=1.0):
        self.schedules = schedules
        self.weight = weight


class MulticondLearnedConditioning:
    def __init__(self, shape, batch):
        self.shape = shape
        self.batch = batch


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    parts = [prompt.split(" AND ") for prompt in prompts]
    flat = SdConditioning([p for ps in parts for p in ps], copy_from=prompts)
    learned = iter(get_learned_conditioning(model, flat, steps, hires_steps, use_old_scheduling))
    batch = [[ComposableScheduledPromptConditioning(next(learned)) for _ in ps] for ps in parts]
    return MulticondLearnedConditioning((len(prompts),), batch)


def _at(schedule, step):
    for entry in schedule:
        if step <= entry.end_at_step:
            return entry.cond
    return schedule[-1].cond


def _stack(conds):
    """Rows of different token lengths are padded with their last token, as the host does."""
    if isinstance(conds[0], dict):
        return {"crossattn": _stack([c["crossattn"] for c in conds]), "vector": torch.stack([c["vector"] for c in conds])}
    length = max(c.shape[0] for c in conds)
    return torch.stack([torch.cat([c, c[-1:].expand(length - c.shape[0], -1)]) if c.shape[0] < length else c
                        for c in conds])


def reconstruct_cond_batch(c, current_step):
    return _stack([_at(schedule, current_step) for schedule in c])


def reconstruct_multicond_batch(c, current_step):
    conds_list, tensors = [], []
    for composable in c.batch:
        entry = []
        for part in composable:
            entry.append((len(tensors), part.weight))
            tensors.append(_at(part.schedules, current_step))
        conds_list.append(entry)
    return conds_list, _stack(tensors)
