"""Rates over seeds: how often each method composes the LoRAs right, judged by the oracle.

    .venv/bin/python -m miniworld.evaluate [--seeds 32] [--task two] [--methods plain merge clora]

For each method: ``success`` (every subject present once, in its own LoRA's colour
and in no other's), ``bleed``, ``omission``, ``duplicate``, each with a 95 % Wilson
interval, and the CLoRA masks' IoU with the objects. ``--record`` stores the figures
in ``weights/manifest.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from clora_ext.engine import EngineSettings

from .compose import METHODS, Result, run
from .demo import TASKS
from .model import load_model, update_manifest

RATES = ("success", "bleed", "omission", "duplicate", "style_ok")


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial rate."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(max(0.0, centre - half), 3), round(min(1.0, centre + half), 3))


def summarise(results: list[Result]) -> dict:
    """``n``, each rate the verdicts carry (``style_ok`` only where judged) with its interval, the masks' IoU."""
    out: dict = {"n": len(results)}
    for key in RATES:
        values = [bool(r.verdict[key]) for r in results if key in r.verdict]
        if values:
            out[key] = round(sum(values) / len(values), 3)
            out[f"{key}_ci"] = list(wilson(sum(values), len(values)))
    ious = [v for r in results for v in r.mask_iou]
    if ious:
        out["mask_iou"] = round(float(np.mean(ious)), 3)
    return out


def evaluate(task_key: str, seeds: int, methods: tuple[str, ...], steps: int = 20, sampler: str = "euler") -> dict:
    torch.set_flush_denormal(True)
    model = load_model()
    task = TASKS[task_key]
    concepts = task.concepts(model)
    settings = EngineSettings()
    figures: dict = {"prompt": task.prompt, "loras": list(task.content), "seeds": seeds, "steps": steps,
                     "sampler": sampler, "methods": {}}
    for method in methods:
        t0 = time.perf_counter()
        results = [run(model, task, method, seed, steps=steps, sampler=sampler, settings=settings, concepts=concepts)
                   for seed in range(seeds)]
        figures["methods"][method] = {**summarise(results), "seconds_per_image": round((time.perf_counter() - t0) / seeds, 2)}
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--task", choices=sorted(TASKS), default="two")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["plain", "merge", "clora"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", choices=["euler", "ddim"], default="euler")
    parser.add_argument("--record", action="store_true", help="store the figures in weights/manifest.json")
    args = parser.parse_args(argv)
    figures = evaluate(args.task, args.seeds, tuple(args.methods), args.steps, args.sampler)
    if args.record:
        update_manifest(f"composition:{args.task}", figures)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
