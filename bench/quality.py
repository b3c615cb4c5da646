"""Composition quality in the miniature world: ``.venv/bin/python -m bench.quality [--quick] [--json PATH]``.

Every method renders the same prompts at the same seeds with the committed miniature
world (``miniworld/weights``), and the pixel oracle judges each picture:

* ``plain``: no LoRA; ``merge``: every LoRA merged at weight 1, every trigger in the
  prompt (what users do without CLoRA);
* ``fusion_only``: CLoRA's masks and fusion, no latent update;
* ``update_only``: CLoRA's latent update, no masks (every variant weighted equally at
  every pixel): the paper's ablation;
* ``clora_paper``: the paper's schedule with its fixed 20 refinement iterations;
* ``clora_default``: the extension's shipped defaults (``EngineSettings()``).

Suites: ``two`` (2 content LoRAs), ``three`` (3 content LoRAs), ``style`` (2 content
LoRAs and the grain style LoRA, global and attached to one subject). Samplers: Euler
and DDIM. Per method: ``success`` (every subject present once, in its own LoRA's
colour and in no other's), ``bleed``, ``omission``, ``duplicate``, ``style_ok`` (style
suite), ``mask_iou`` (CLoRA masks of the last step vs the oracle's objects),
``seconds_per_image``, ``gradient_passes`` (mean per image) and ``n``, each rate with
a 95 % Wilson interval.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from itertools import permutations
from typing import Iterable

import numpy as np
import torch
from PIL import Image, ImageDraw

from clora_ext.engine import EngineSettings
from clora_ext.update import Schedule
from miniworld.compose import Result, Task, run
from miniworld.evaluate import summarise as summarise_results
from miniworld.loras import BY_SHAPE, STYLE
from miniworld.model import load_model

METHODS = ("plain", "merge", "fusion_only", "update_only", "clora_paper", "clora_default")
SAMPLERS = ("euler", "ddim")


def method_settings(method: str) -> tuple[str, EngineSettings]:
    """The compose method and engine settings behind each benchmark method."""
    paper = EngineSettings(schedule=Schedule(refine_iterations=20), refine_tolerance=None)
    return {
        "plain": ("plain", EngineSettings()),
        "merge": ("merge", EngineSettings()),
        "fusion_only": ("fusion_only", paper),
        "update_only": ("clora", dataclasses.replace(paper, schedule=Schedule(refine_iterations=20, mask_start=1.0))),
        "clora_paper": ("clora", paper),
        "clora_default": ("clora", EngineSettings()),
    }[method]


def _prompt(shapes: Iterable[str]) -> str:
    phrases = [f"a {s}" for s in shapes]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def suites(quick: bool) -> dict[str, list[tuple[Task, int]]]:
    """(task, seed) pairs per suite. Full: 72 / 36 / 32 images per method and suite over both samplers."""
    pairs = [("circle", "square"), ("circle", "triangle"), ("square", "triangle")]
    two = [Task(_prompt(order), tuple(BY_SHAPE[s].name for s in order)) for p in pairs for order in (p, p[::-1])]
    three = [Task(_prompt(order), tuple(BY_SHAPE[s].name for s in order))
             for order in list(permutations(("circle", "square", "triangle")))[:3]]
    style = []
    for a, b in pairs[:2]:
        content = (BY_SHAPE[a].name, BY_SHAPE[b].name)
        style.append(Task(_prompt((a, b)), content, style=STYLE.name))
        style.append(Task(_prompt((a, b)), content, style=STYLE.name, style_subjects=(a,)))
    if quick:
        return {"two": [(two[0], s) for s in range(2)], "three": [(three[0], 0)], "style": [(style[1], 0)]}
    return {"two": [(t, s) for t in two for s in range(6)],
            "three": [(t, s) for t in three for s in range(6)],
            "style": [(t, s) for t in style for s in range(4)]}


@dataclass
class Scored:
    result: Result
    seconds: float
    suite: str
    sampler: str


def summarise(scored: list[Scored]) -> dict:
    out = summarise_results([s.result for s in scored])
    out["seconds_per_image"] = round(float(np.mean([s.seconds for s in scored])), 3)
    out["gradient_passes"] = round(float(np.mean([s.result.gradient_passes for s in scored])), 1)
    return out


def difference(a: list[Scored], b: list[Scored], key: str = "success") -> dict:
    """Paired difference of a rate (same tasks, seeds, samplers) with a 95 % normal interval."""
    d = np.array([float(x.result.verdict[key]) - float(y.result.verdict[key]) for x, y in zip(a, b)])
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else 1.0
    return {"difference": round(float(d.mean()), 3), "ci": [round(float(d.mean() - half), 3), round(float(d.mean() + half), 3)]}


def run_quality(quick: bool = False, methods: tuple[str, ...] = METHODS, samplers: tuple[str, ...] = SAMPLERS,
                steps: int = 20, log=print) -> tuple[dict, dict[str, list[Scored]]]:
    torch.set_flush_denormal(True)
    model = load_model()
    plan = suites(quick)
    scored: dict[str, list[Scored]] = {m: [] for m in methods}
    for suite, items in plan.items():
        for task, seed in items:
            concepts = task.concepts(model)
            for sampler in samplers:
                for method in methods:
                    how, settings = method_settings(method)
                    t0 = time.perf_counter()
                    result = run(model, task, how, seed, steps=steps, sampler=sampler, settings=settings, concepts=concepts)
                    scored[method].append(Scored(result, time.perf_counter() - t0, suite, sampler))
        log(f"{suite}: done ({len(items) * len(samplers)} images per method)")
    report = {
        "methods": {m: summarise(s) for m, s in scored.items()},
        "suites": {suite: {m: summarise([s for s in scored[m] if s.suite == suite]) for m in methods} for suite in plan},
        "samplers": {sampler: {m: summarise([s for s in scored[m] if s.sampler == sampler]) for m in methods}
                     for sampler in samplers},
        "settings": {"quick": quick, "steps": steps, "samplers": list(samplers), "cfg_scale": 5.0,
                     "methods": {m: _describe(m) for m in methods},
                     "images_per_method": {suite: len(items) * len(samplers) for suite, items in plan.items()}},
    }
    if "clora_default" in scored and "clora_paper" in scored:
        report["clora_default_minus_paper"] = difference(scored["clora_default"], scored["clora_paper"])
    if "clora_default" in scored and "merge" in scored:
        report["clora_default_minus_merge"] = difference(scored["clora_default"], scored["merge"])
    return report, scored


def _describe(method: str) -> dict:
    how, s = method_settings(method)
    if how in ("plain", "merge"):
        return {"method": how}
    return {"method": how, "step_size": s.step_size, "refine_iterations": s.schedule.refine_iterations,
            "refine_tolerance": s.refine_tolerance, "update_fraction": s.schedule.update_fraction,
            "refine_at": list(s.schedule.refine_at), "mask_threshold": s.mask_threshold,
            "morphology": s.morphology.value, "mask_start": s.schedule.mask_start}


def format_table(report: dict) -> str:
    def cell(m: dict, key: str) -> str:
        if key not in m:
            return "-"
        lo, hi = m[f"{key}_ci"]
        return f"{m[key]:.2f} [{lo:.2f}, {hi:.2f}]"

    lines = []
    for suite, methods in report["suites"].items():
        lines += [f"**{suite}** ({report['settings']['images_per_method'][suite]} images per method)", "",
                  "| method | success | bleed | omission | duplicate | style_ok | mask IoU | s/image | gradient passes |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, m in methods.items():
            lines.append(f"| {name} | {cell(m, 'success')} | {cell(m, 'bleed')} | {cell(m, 'omission')} | "
                         f"{cell(m, 'duplicate')} | {cell(m, 'style_ok')} | {m.get('mask_iou', '-')} | "
                         f"{m['seconds_per_image']:.2f} | {m['gradient_passes']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def image_grid(scored: dict[str, list[Scored]], columns: int = 8, scale: int = 3) -> Image.Image:
    """Methods as rows, the first ``columns`` pictures of the two-LoRA suite (Euler) as columns."""
    side = 32 * scale
    label_w = 96
    methods = list(scored)
    out = Image.new("RGB", (label_w + columns * (side + 2), len(methods) * (side + 2) + 14), "white")
    draw = ImageDraw.Draw(out)
    for r, method in enumerate(methods):
        picks = [s for s in scored[method] if s.suite == "two" and s.sampler == "euler"][:columns]
        y = 14 + r * (side + 2)
        draw.text((2, y + side // 2 - 6), method, fill="black")
        for c, s in enumerate(picks):
            if r == 0:
                draw.text((label_w + c * (side + 2), 1), f"seed {s.result.seed}", fill="gray")
            img = Image.fromarray((s.result.image.transpose(1, 2, 0) * 255).round().astype(np.uint8), mode="RGB")
            x = label_w + c * (side + 2)
            out.paste(img.resize((side, side), Image.NEAREST), (x, y))
            colour = "darkgreen" if s.result.verdict["success"] else "firebrick"
            draw.rectangle((x, y, x + side - 1, y + side - 1), outline=colour)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few images per suite (under 5 minutes on 2 cores)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--grid", help="write the methods x seeds picture grid here (PNG)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    report, scored = run_quality(args.quick, tuple(args.methods), tuple(args.samplers), args.steps)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(format_table(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.grid:
        image_grid(scored).save(args.grid)


if __name__ == "__main__":
    main()
