"""Composing the miniature world's LoRAs three ways, and scoring the pictures with the oracle.

* ``plain``: the prompt without any LoRA;
* ``merge``: every LoRA merged into the weights at weight 1 (UNet and text encoder),
  every trigger in the prompt: what users do without CLoRA;
* ``fusion_only``: CLoRA's masks and fusion without the latent update;
* ``clora``: CLoRA through the core engine (``clora_ext.engine``), with the settings given.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from clora_ext.concepts import Composition, Role, insert_before_phrase
from clora_ext.devtools.pipeline import ConceptLoRA, TinySD, generate
from clora_ext.engine import CLoRAEngine, EngineSettings
from clora_ext.routing import merged

from .loras import concept
from .oracle import Analysis, Subject, analyse, is_grainy, judge
from .scenes import to_image
from .worlds import lora_spec

METHODS = ("plain", "merge", "fusion_only", "clora")


@dataclass(frozen=True)
class Task:
    """A prompt over subjects, with the content LoRA of each subject and optional style LoRA."""

    prompt: str
    content: tuple[str, ...]  # content LoRA names, one per subject
    style: str | None = None
    style_subjects: tuple[str, ...] = ()  # empty: a global style
    # per content subject, a word the prompt puts before its shape ("blue" in "a blue circle"), part of the
    # subject phrase its LoRA is mapped to; empty: none
    attributes: tuple[str, ...] = ()

    def subjects(self) -> list[Subject]:
        return [lora_spec(name).subject() for name in self.content]

    def concepts(self, model: TinySD) -> list[ConceptLoRA]:
        words = self.attributes or ("",) * len(self.content)
        out = [concept(model, name, subject=f"{word} {lora_spec(name).shape}" if word else None)
               for name, word in zip(self.content, words)]
        if self.style:
            if self.style_subjects:
                out.append(concept(model, self.style, Role.STYLE_SUBJECTS, subject=", ".join(self.style_subjects)))
            else:
                out.append(concept(model, self.style, Role.STYLE))
        return out


@dataclass
class Result:
    method: str
    seed: int
    image: np.ndarray  # (3, H, W) in [0, 1]
    analysis: Analysis
    verdict: dict
    mask_iou: list[float] = field(default_factory=list)  # per content subject
    gradient_passes: int = 0


def _all_triggers_prompt(task: Task, concepts: Sequence[ConceptLoRA]) -> str:
    """The prompt a user writes for merged LoRAs: every trigger before its subject (styles appended)."""
    composition = Composition.from_concepts([c.concept for c in concepts])
    variants = composition.variants(task.prompt)
    prompt = task.prompt
    for v in variants[1:]:
        if v.trigger:
            prompt = insert_before_phrase(prompt, composition.content[v.concept].subject, v.trigger)
    return variants[0].prompt.replace(task.prompt, prompt, 1)


@contextlib.contextmanager
def _merged_all(model: TinySD, concepts: Sequence[ConceptLoRA]):
    with contextlib.ExitStack() as stack:
        for c in concepts:
            stack.enter_context(merged(model.unet, c.lora.unet, c.concept.weight))
            stack.enter_context(merged(model.text_encoder, c.lora.text_encoder, c.concept.te_weight))
        yield


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def run(
    model: TinySD,
    task: Task,
    method: str,
    seed: int,
    *,
    steps: int = 20,
    sampler: str = "euler",
    cfg_scale: float = 5.0,
    settings: EngineSettings = EngineSettings(),
    concepts: Sequence[ConceptLoRA] | None = None,
    on_step: Callable[[int, CLoRAEngine | None], None] | None = None,
) -> Result:
    """One picture of ``task`` by ``method``, judged by the oracle. ``on_step`` sees the engine after each step."""
    concepts = list(concepts) if concepts is not None else task.concepts(model)
    common = dict(seed=seed, steps=steps, sampler=sampler, cfg_scale=cfg_scale, latent_hw=(32, 32))
    engine = None
    if method == "plain":
        latent, _ = generate(model, task.prompt, **common)
    elif method == "merge":
        with _merged_all(model, concepts):
            latent, _ = generate(model, _all_triggers_prompt(task, concepts), **common)
    elif method in ("clora", "fusion_only"):
        latent, engine = generate(model, task.prompt, concepts=concepts, settings=settings,
                                  allow_update=method == "clora", on_step=on_step, **common)
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    return score(task, method, seed, latent, engine)


def score(task: Task, method: str, seed: int, latent: torch.Tensor, engine: CLoRAEngine | None = None,
          masks: torch.Tensor | None = None, gradient_passes: int = 0) -> Result:
    """Judge the picture of ``latent`` with the oracle; CLoRA masks (from ``engine`` or given) against its objects."""
    image = to_image(latent)[0]
    analysis = analyse(image)
    verdict = judge(analysis, task.subjects() if method != "plain" else [Subject(s.shape) for s in task.subjects()])
    if task.style:
        verdict["style_ok"] = style_ok(analysis, task)
    result = Result(method, seed, image, analysis, verdict, gradient_passes=gradient_passes)
    if engine is not None and engine.last_output is not None:
        masks = engine.last_output.masks[0]
        result.gradient_passes = sum(len(r.losses) for r in engine.records)
    if masks is not None:
        masks = masks.detach().cpu()
        for k, subject in enumerate(task.subjects(), start=1):
            found = [o.mask for o in analysis.objects if o.shape == subject.shape]
            target = np.any(found, axis=0) if found else np.zeros(image.shape[1:], dtype=bool)
            result.mask_iou.append(_iou(masks[k].numpy() > 0.5, target))
    return result


def style_ok(analysis: Analysis, task: Task) -> bool:
    """Global style: the background is grainy. Attached style: the attached subjects are grainy and the others not."""
    if not task.style_subjects:
        return is_grainy(analysis.background_grain)
    attached = {lora_spec(n).shape for n in task.content if lora_spec(n).shape in task.style_subjects}
    grains = {o.shape: is_grainy(o.grain) for o in analysis.objects}
    return all(grains.get(s, False) == (s in attached) for s in (lora_spec(n).shape for n in task.content))
