"""Composition quality in the miniature world: ``.venv/bin/python -m bench.quality [--quick] [--world NAME] [--json PATH]``.

Every method renders the same prompts at the same seeds with a committed miniature
world (``--world``: ``shapes``, world 1 in ``miniworld/weights``, by default; ``relations``,
world 2 in ``miniworld/weights/relations``, whose prompts name spatial relations), and the
pixel oracle judges each picture:

* ``plain``: no LoRA; ``merge``: every LoRA merged at weight 1, every trigger in the
  prompt (what users do without CLoRA);
* ``fusion_only``: CLoRA's masks and fusion, no latent update;
* ``update_only``: CLoRA's latent update, no masks (every variant weighted equally at
  every pixel): the paper's ablation;
* ``clora_paper``: the paper's schedule with its fixed 20 refinement iterations;
* ``clora_default``: the extension's shipped defaults (``EngineSettings()``).

Suites: ``two`` (2 content LoRAs), ``three`` (3 content LoRAs), ``style`` (2 content
LoRAs and the grain style LoRA, global and attached to one subject), ``attribute`` (the
``two`` prompts with a colour word in one subject's phrase). Samplers: Euler
and DDIM. Per method: ``success`` (every subject present once, in its own LoRA's
colour and in no other's), ``bleed``, ``omission``, ``duplicate``, ``style_ok`` (style
suite), ``grain_background`` (the oracle finds the background grainy: the style's reach,
or noise left behind), ``mask_iou`` (CLoRA masks of the last step vs the oracle's objects),
``seconds_per_image``, ``gradient_passes`` (mean per image) and ``n``, each rate with
a 95 % Wilson interval.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import time
from dataclasses import dataclass
from itertools import permutations
from typing import Iterable

import numpy as np
import torch
from scipy import stats as scipy_stats
from PIL import Image, ImageDraw

from clora_ext.engine import EngineSettings, UncondRows
from clora_ext.loss import LossGradient, LossTokens
from clora_ext.masks import MaskOverlap, MaskTokens, MaskUpsampling, Morphology
from clora_ext.update import Schedule
from miniworld.compose import Result, Task, run, score
from miniworld.evaluate import summarise as summarise_results, wilson
from miniworld.model import load_model
from miniworld.oracle import is_grainy
from miniworld.scenes import join_phrases
from miniworld.worlds import DEFAULT, WORLDS, CaptionStyle, World, get_world

from .reference import generate_reference

METHODS = ("plain", "merge", "fusion_only", "update_only", "clora_paper", "clora_default")
# on request: the shipped defaults with another mask-token rule (masks.MaskTokens): the maps each
# variant's mask is made of
MASK_METHODS = tuple(f"clora_masks_{rule.value}" for rule in MaskTokens)
# soft (bilinear) mask edges instead of the paper's blocks, without and with the latent update; hard edges along
# the maps' level lines (contour); masks averaged over steps (mask_memory); soft edges from half the steps on
SOFT_METHODS = ("fusion_only_bilinear", "clora_masks_subject_bilinear", "clora_masks_subject_contour",
                "clora_mask_memory_0.5", "clora_soft_edges_late")
# one owner per pixel where masks overlap (masks.MaskOverlap.EXCLUSIVE), with the subject and the base rule
EXCLUSIVE_METHODS = ("clora_masks_subject_exclusive", "clora_masks_base_exclusive")
# the contrastive loss over the subject words only (loss.LossTokens.SUBJECT), with the subject masks
LOSS_METHODS = ("clora_masks_subject_loss_subject", "clora_masks_subject_exclusive_loss_subject")
# the loss with each trigger map only where it lies with its subject (loss.LossTokens.AGREEING), and one
# shared unconditional row per image (engine.UncondRows.SHARED), the latent update without its mean per mask
# region (update_keeps_means), updates in the first fifth of the steps only (before colours set; refinement
# at step 0 only), each on top of the shipped defaults
# the loss's gradient through each concept's own variant only (loss.LossGradient.OWN); the regional means
# taken out of the gradient through the other variants' maps only (keeps_means_others_only)
LEVER_METHODS = ("clora_loss_agreeing", "clora_shared_uncond", "clora_update_keeps_means", "clora_updates_early",
                 "clora_own_gradient", "clora_keeps_means_others")
# the paper's 20 refinement iterations on top of the shipped defaults (README's advice for 3+ LoRAs)
REFINE_METHODS = ("clora_refine_20",)
# on request: the reference implementation's per-step computation (bench.reference: stale maps and
# prediction after an update, maps averaged over cond and uncond rows), paper settings, Euler only
REFERENCE = "clora_reference"
SAMPLERS = ("euler", "ddim")


# The paper's method: Attend-and-Excite's schedule as fractions (updates in the first half,
# refinement at 0 %, 20 %, 40 %), a fixed 20 refinement iterations, alpha 20, lambda 0.4.
PAPER_SETTINGS = EngineSettings(step_size=20.0, schedule=Schedule(update_fraction=0.5, refine_at=(0.0, 0.2, 0.4),
                                                                  refine_iterations=20, mask_start=0.0),
                                refine_tolerance=None, mask_threshold=0.4, morphology=Morphology.NONE,
                                mask_tokens=MaskTokens.PAPER, mask_upsampling=MaskUpsampling.NEAREST,
                                mask_overlap=MaskOverlap.SHARED, loss_tokens=LossTokens.PAPER,
                                uncond_rows=UncondRows.PER_VARIANT)


def method_settings(method: str) -> tuple[str, EngineSettings]:
    """The compose method and engine settings behind each benchmark method."""
    paper = PAPER_SETTINGS
    return {
        "plain": ("plain", EngineSettings()),
        "merge": ("merge", EngineSettings()),
        "fusion_only": ("fusion_only", paper),
        "update_only": ("clora", dataclasses.replace(paper, schedule=Schedule(refine_iterations=20, mask_start=1.0))),
        "clora_paper": ("clora", paper),
        "clora_default": ("clora", EngineSettings()),
        REFERENCE: (REFERENCE, paper),
        **{f"clora_masks_{rule.value}": ("clora", dataclasses.replace(EngineSettings(), mask_tokens=rule))
           for rule in MaskTokens},
        "fusion_only_bilinear": ("fusion_only", dataclasses.replace(paper, mask_upsampling=MaskUpsampling.BILINEAR)),
        "clora_masks_subject_bilinear": ("clora", dataclasses.replace(EngineSettings(), mask_tokens=MaskTokens.SUBJECT,
                                                                      mask_upsampling=MaskUpsampling.BILINEAR)),
        "clora_mask_memory_0.5": ("clora", dataclasses.replace(EngineSettings(), mask_memory=0.5)),
        "clora_update_keeps_means": ("clora", dataclasses.replace(EngineSettings(), update_keeps_means=True)),
        "clora_updates_early": ("clora", dataclasses.replace(EngineSettings(), schedule=Schedule(update_fraction=0.2))),
        "clora_keeps_means_others": ("clora", dataclasses.replace(EngineSettings(), update_keeps_means=True,
                                                                  keeps_means_others_only=True)),
        "clora_own_gradient": ("clora", dataclasses.replace(EngineSettings(), loss_gradient=LossGradient.OWN)),
        # 0.6.0's update at any number of subjects (the defaults before keeps_means_from)
        "clora_keeps_means_never": ("clora", dataclasses.replace(EngineSettings(), keeps_means_from=0)),
        "clora_soft_edges_late": ("clora", dataclasses.replace(EngineSettings(), soft_edges_from=0.5)),
        "clora_masks_subject_contour": ("clora", dataclasses.replace(EngineSettings(), mask_tokens=MaskTokens.SUBJECT,
                                                                     mask_upsampling=MaskUpsampling.CONTOUR)),
        **{f"clora_masks_{rule}_exclusive": ("clora", dataclasses.replace(EngineSettings(), mask_tokens=MaskTokens(rule),
                                                                          mask_overlap=MaskOverlap.EXCLUSIVE))
           for rule in ("subject", "base")},
        **{f"clora_masks_subject{overlap}_loss_subject": (
            "clora", dataclasses.replace(EngineSettings(), mask_tokens=MaskTokens.SUBJECT, loss_tokens=LossTokens.SUBJECT,
                                         mask_overlap=MaskOverlap.EXCLUSIVE if overlap else MaskOverlap.SHARED))
           for overlap in ("", "_exclusive")},
        "clora_loss_agreeing": ("clora", dataclasses.replace(EngineSettings(), loss_tokens=LossTokens.AGREEING)),
        "clora_shared_uncond": ("clora", dataclasses.replace(EngineSettings(), uncond_rows=UncondRows.SHARED)),
        "clora_refine_20": ("clora", dataclasses.replace(
            EngineSettings(), schedule=dataclasses.replace(Schedule(), refine_iterations=20))),
    }[method]


def _prompt(shapes: Iterable[str], relations: list[str | None] | None = None,
            attributes: Iterable[str] | None = None) -> str:
    """"a circle, a square and a triangle"; with ``relations``, "a circle left of a square and a triangle";
    with ``attributes`` (one word or "" per shape), "a blue circle and a square"."""
    shapes = list(shapes)
    words = list(attributes) if attributes is not None else [""] * len(shapes)
    return join_phrases([f"a {w} {s}" if w else f"a {s}" for w, s in zip(words, shapes)], relations)


# The attribute suite's colour word per shape: base-palette colours no LoRA of either world teaches, so the
# word and the subject's LoRA disagree about its colour and the judge still wants the LoRA's (issue 20)
ATTRIBUTE_WORDS = {"circle": "blue", "square": "red", "triangle": "green"}


# World 2's prompts: the relation joining each pair of subjects, one entry per task of the suite
# (every word of the world's captions used; the layout the sampler draws is free, so these need not come true)
TWO_RELATIONS = (["left of"], ["next to"], ["below"], ["above"], ["right of"], ["next to"])
THREE_RELATIONS = (["left of", None], [None, "above"], ["next to", None])


def suites(quick: bool, seed_offset: int = 0, world: World = DEFAULT,
           other_orders: bool = False) -> dict[str, list[tuple[Task, int]]]:
    """(task, seed) pairs per suite. Full: 72 / 36 / 32 images per method and suite over both samplers.
    ``seed_offset``: seeds from there on instead of 0 (settings chosen on seeds 0-5 are reported on others).
    ``world``: its LoRAs; in a world of relation captions the two- and three-LoRA prompts name relations.
    ``other_orders``: the three-LoRA suite in the three word orders it leaves out otherwise (prompts that chose
    nothing, for a held-out report; the two-LoRA suite already has all six)."""
    by_shape, style_lora = world.by_shape, world.style.name
    relational = world.caption_style is CaptionStyle.RELATIONS
    pairs = [("circle", "square"), ("circle", "triangle"), ("square", "triangle")]
    orders = [order for p in pairs for order in (p, p[::-1])]
    two = [Task(_prompt(order, TWO_RELATIONS[k] if relational else None), tuple(by_shape[s].name for s in order))
           for k, order in enumerate(orders)]
    three = [Task(_prompt(order, THREE_RELATIONS[k] if relational else None), tuple(by_shape[s].name for s in order))
             for k, order in enumerate(list(permutations(("circle", "square", "triangle")))[3:] if other_orders
                                       else list(permutations(("circle", "square", "triangle")))[:3])]
    # the two-LoRA orders again, the first pair member's phrase with a colour word: first-named in one order,
    # second-named in the other
    attribute = []
    for k, order in enumerate(orders):
        words = tuple(ATTRIBUTE_WORDS[s] if s == pairs[k // 2][0] else "" for s in order)
        attribute.append(Task(_prompt(order, TWO_RELATIONS[k] if relational else None, words),
                              tuple(by_shape[s].name for s in order), attributes=words))
    style = []
    for a, b in pairs[:2]:
        content = (by_shape[a].name, by_shape[b].name)
        style.append(Task(_prompt((a, b)), content, style=style_lora))
        style.append(Task(_prompt((a, b)), content, style=style_lora, style_subjects=(a,)))
    o = seed_offset
    if quick:
        return {"two": [(two[0], o + s) for s in range(2)], "three": [(three[0], o)], "style": [(style[1], o)]}
    return {"two": [(t, o + s) for t in two for s in range(6)],
            "three": [(t, o + s) for t in three for s in range(6)],
            "style": [(t, o + s) for t in style for s in range(4)],
            "attribute": [(t, o + s) for t in attribute for s in range(6)]}


@dataclass
class Scored:
    result: Result
    seconds: float
    suite: str
    sampler: str
    item: int = 0  # position in the run's (suite, task, seed) order, for merging shards
    world: str = DEFAULT.name  # pickles from before worlds read as world 1


def summarise(scored: list[Scored]) -> dict:
    out = summarise_results([s.result for s in scored])
    grainy = sum(is_grainy(s.result.analysis.background_grain) for s in scored)
    out["grain_background"] = round(grainy / len(scored), 3)
    out["grain_background_ci"] = list(wilson(grainy, len(scored)))
    out["seconds_per_image"] = round(float(np.mean([s.seconds for s in scored])), 3)
    out["gradient_passes"] = round(float(np.mean([s.result.gradient_passes for s in scored])), 1)
    return out


def difference(a: list[Scored], b: list[Scored], key: str = "success") -> dict:
    """Paired difference of a rate over the pictures both have (same item, seed and sampler), with a
    95 % normal interval over pictures (``ci``) and one over seeds (``ci_by_seed``, see ``paired``)."""
    theirs = {(s.item, s.sampler): s for s in b}
    pairs = [(x, theirs[(x.item, x.sampler)]) for x in a if (x.item, x.sampler) in theirs]
    return paired([float(x.result.verdict[key]) - float(y.result.verdict[key]) for x, y in pairs],
                  [x.result.seed for x, _ in pairs])


def paired(differences: list[float], clusters: list[int] | None = None) -> dict:
    """Mean of per-picture differences with a 95 % normal interval (half-width 1 for a single pair).

    With ``clusters`` (each picture's seed) also ``ci_by_seed``: the pictures of one seed share
    their initial noise over prompts and samplers, so their outcomes go together and the
    per-picture interval is too narrow. This one is cluster-robust (the sum of each seed's
    residuals, Student's t with seeds - 1 degrees of freedom)."""
    d = np.array(differences)
    mean = float(d.mean())
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else 1.0
    out = {"difference": round(mean, 3), "ci": [round(mean - half, 3), round(mean + half, 3)], "n": len(d)}
    if clusters is not None:
        seeds = sorted(set(clusters))
        if len(seeds) > 1:
            sums = np.array([sum(x - mean for x, c in zip(d, clusters) if c == seed) for seed in seeds])
            g = len(seeds)
            se = math.sqrt(g / (g - 1) * float((sums ** 2).sum())) / len(d)
            half = float(scipy_stats.t.ppf(0.975, g - 1)) * se
        else:
            half = 1.0
        out["ci_by_seed"] = [round(mean - half, 3), round(mean + half, 3)]
        out["seeds"] = len(seeds)
    return out


def collect(quick: bool = False, methods: tuple[str, ...] = METHODS, samplers: tuple[str, ...] = SAMPLERS,
            steps: int = 20, shard: tuple[int, int] = (1, 1), only: tuple[str, ...] = (),
            log=print, seed_offset: int = 0, world: World = DEFAULT, other_orders: bool = False) -> dict[str, list[Scored]]:
    """Render and judge every (suite, task, seed) item of ``shard`` = (i, n): items i-1, i-1+n, ...,
    with ``world``'s model, LoRAs and prompts.

    A method whose settings equal an earlier method's (``clora_default`` and ``clora_paper``
    when the defaults are the paper's) shares that method's pictures instead of rendering
    the same ones again.
    """
    torch.set_flush_denormal(True)
    model = load_model(world=world)
    items = [(suite, task, seed) for suite, pairs in suites(quick, seed_offset, world, other_orders).items() for task, seed in pairs]
    scored: dict[str, list[Scored]] = {m: [] for m in methods}
    for k, (suite, task, seed) in enumerate(items):
        if k % shard[1] != shard[0] - 1 or (only and suite not in only):
            continue
        concepts = task.concepts(model)
        for sampler in samplers:
            done: dict[tuple, Scored] = {}
            for method in methods:
                how, settings = method_settings(method)
                key = (how, settings)
                if how == REFERENCE and sampler != "euler":
                    continue
                if key not in done:
                    t0 = time.perf_counter()
                    if how == REFERENCE:
                        result = _reference(model, task, seed, steps, settings, concepts)
                    else:
                        result = run(model, task, how, seed, steps=steps, sampler=sampler, settings=settings,
                                     concepts=concepts)
                    done[key] = Scored(result, time.perf_counter() - t0, suite, sampler, k, world.name)
                scored[method].append(dataclasses.replace(done[key]))
        log(f"{suite} item {k + 1}/{len(items)} done")
    return scored


def _reference(model, task: Task, seed: int, steps: int, settings: EngineSettings, concepts) -> Result:
    latent, stats = generate_reference(model, task.prompt, "", concepts, seed=seed, steps=steps, cfg_scale=5.0,
                                       latent_hw=(32, 32), schedule=settings.schedule, step_size=settings.step_size,
                                       mask_threshold=settings.mask_threshold, tau=settings.tau)
    return score(task, REFERENCE, seed, latent, gradient_passes=stats.backward_passes)


def merge(parts: list[dict[str, list[Scored]]]) -> dict[str, list[Scored]]:
    """The scored pictures of several shards (or runs of other methods), in the order one run gives."""
    methods = list(dict.fromkeys(m for p in parts for m in p))
    return {m: sorted((s for p in parts for s in p.get(m, [])), key=lambda s: (s.item, SAMPLERS.index(s.sampler)))
            for m in methods}


def _summaries(scored: dict[str, list[Scored]], keep) -> dict:
    """Each method's summary over the pictures ``keep`` selects (methods without any are left out)."""
    picked = {m: [s for s in v if keep(s)] for m, v in scored.items()}
    return {m: summarise(v) for m, v in picked.items() if v}


def build_report(scored: dict[str, list[Scored]], quick: bool, steps: int) -> dict:
    methods = list(scored)
    samplers = sorted({s.sampler for v in scored.values() for s in v}, key=SAMPLERS.index)
    suite_names = list(dict.fromkeys(s.suite for s in next(iter(scored.values()))))
    worlds = {s.world for v in scored.values() for s in v}
    if len(worlds) != 1:
        raise ValueError(f"pictures of several worlds in one report: {sorted(worlds)}")
    report = {
        "methods": {m: summarise(s) for m, s in scored.items()},
        "suites": {suite: _summaries(scored, lambda s: s.suite == suite) for suite in suite_names},
        "samplers": {sampler: _summaries(scored, lambda s: s.sampler == sampler) for sampler in samplers},
        "settings": {"world": worlds.pop(), "quick": quick, "steps": steps, "samplers": samplers, "cfg_scale": 5.0,
                     "methods": {m: _describe(m) for m in methods},
                     "defaults_are_the_papers": method_settings("clora_default") == method_settings("clora_paper"),
                     "images_per_method": {suite: sum(s.suite == suite for s in next(iter(scored.values())))
                                           for suite in suite_names}},
    }
    if "clora_default" in scored and "clora_paper" in scored:
        report["clora_default_minus_paper"] = difference(scored["clora_default"], scored["clora_paper"])
    if REFERENCE in scored and "clora_paper" in scored:
        report["clora_paper_minus_reference"] = difference(scored["clora_paper"], scored[REFERENCE])
    if "clora_default" in scored and "merge" in scored:
        report["clora_default_minus_merge"] = difference(scored["clora_default"], scored["merge"])
        for suite in suite_names:
            pick = {m: [s for s in scored[m] if s.suite == suite] for m in ("clora_default", "merge")}
            report.setdefault("clora_default_minus_merge_by_suite", {})[suite] = difference(
                pick["clora_default"], pick["merge"])
    for method in scored:
        if method.startswith("clora_masks_") and "clora_default" in scored:  # each mask rule against the shipped one
            report.setdefault("mask_rules_minus_default", {})[method] = {
                suite: difference([s for s in scored[method] if s.suite == suite],
                                  [s for s in scored["clora_default"] if s.suite == suite]) for suite in suite_names}
    return report


def run_quality(quick: bool = False, methods: tuple[str, ...] = METHODS, samplers: tuple[str, ...] = SAMPLERS,
                steps: int = 20, log=print, world: World = DEFAULT) -> tuple[dict, dict[str, list[Scored]]]:
    scored = collect(quick, methods, samplers, steps, log=log, world=world)
    return build_report(scored, quick, steps), scored


def _describe(method: str) -> dict:
    how, s = method_settings(method)
    if how in ("plain", "merge"):
        return {"method": how}
    return {"method": how, "step_size": s.step_size, "refine_iterations": s.schedule.refine_iterations,
            "refine_tolerance": s.refine_tolerance, "update_fraction": s.schedule.update_fraction,
            "refine_at": list(s.schedule.refine_at), "mask_threshold": s.mask_threshold,
            "morphology": s.morphology.value, "mask_start": s.schedule.mask_start,
            "mask_tokens": MaskTokens(s.mask_tokens).value, "mask_upsampling": MaskUpsampling(s.mask_upsampling).value,
            "mask_overlap": MaskOverlap(s.mask_overlap).value, "loss_tokens": LossTokens(s.loss_tokens).value,
            "uncond_rows": UncondRows(s.uncond_rows).value, "mask_memory": s.mask_memory,
            "update_keeps_means": s.update_keeps_means, "keeps_means_others_only": s.keeps_means_others_only,
            "soft_edges_from": s.soft_edges_from,
            "loss_gradient": LossGradient(s.loss_gradient).value}


def format_table(report: dict) -> str:
    def cell(m: dict, key: str) -> str:
        if key not in m:
            return "-"
        lo, hi = m[f"{key}_ci"]
        return f"{m[key]:.2f} [{lo:.2f}, {hi:.2f}]"

    lines = []
    for suite, methods in report["suites"].items():
        lines += [f"**{suite}** ({report['settings']['images_per_method'][suite]} images per method)", "",
                  "| method | n | success | bleed | omission | duplicate | style_ok | mask IoU | s/image | gradient passes |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, m in methods.items():
            lines.append(f"| {name} | {m['n']} | {cell(m, 'success')} | {cell(m, 'bleed')} | {cell(m, 'omission')} | "
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
    parser.add_argument("--world", choices=sorted(WORLDS), default=DEFAULT.name,
                        help="the miniature world: its model, LoRAs and prompts (default: world 1)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--grid", help="write the methods x seeds picture grid here (PNG)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        choices=METHODS + (REFERENCE,) + MASK_METHODS + SOFT_METHODS + EXCLUSIVE_METHODS + LOSS_METHODS
                        + LEVER_METHODS + REFINE_METHODS)
    parser.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed-offset", type=int, default=0,
                        help="seeds from here on (default 0: the seeds the defaults were chosen on)")
    parser.add_argument("--suites", nargs="+", choices=("two", "three", "style", "attribute"), default=[],
                        help="only these suites (default: all)")
    parser.add_argument("--other-orders", action="store_true",
                        help="the three-LoRA suite in its three other word orders (prompts that chose nothing)")
    parser.add_argument("--shard", default="1/1", help="i/n: render every n-th item from the i-th (with --save)")
    parser.add_argument("--save", help="pickle the judged pictures here (to --merge shards later)")
    parser.add_argument("--merge", nargs="+", metavar="PICKLE", help="report on saved shards instead of rendering")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.merge:
        parts = []
        for path in args.merge:
            with open(path, "rb") as f:
                parts.append(pickle.load(f))
        scored = merge(parts)
    else:
        shard = tuple(int(v) for v in args.shard.split("/"))
        scored = collect(args.quick, tuple(args.methods), tuple(args.samplers), args.steps, shard, tuple(args.suites),
                         seed_offset=args.seed_offset, world=get_world(args.world), other_orders=args.other_orders)
        if args.save:
            with open(args.save, "wb") as f:
                pickle.dump(scored, f)
            if shard != (1, 1):
                return
    report = build_report(scored, args.quick, args.steps)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(format_table(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.grid:
        image_grid(scored).save(args.grid)


if __name__ == "__main__":
    # run the imported module, so that pickled pictures name bench.quality's classes, not __main__'s
    from bench.quality import main as _main

    _main()
