"""How the shipped defaults were chosen: ``.venv/bin/python -m bench.defaults [--seeds 4] [--shard 1/2]``.

Each candidate is the paper's settings with one quality-relevant setting changed
(refinement rule, step size, mask threshold, morphology), rendered on the two-LoRA
suite of ``bench.quality`` at the same seeds with both samplers and judged by the
oracle. The report gives each candidate's ``success`` with its Wilson interval and
its paired difference to the paper's settings with a 95 % interval, and the mean
gradient passes per image (what the candidate costs).

Shards split the candidates between processes (``--shard 1/2`` and ``--shard 2/2``
with OMP_NUM_THREADS=1 use both cores); each writes its rows to ``--out``
(JSON lines), and ``--report`` reads every row file given and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
import torch

from clora_ext.engine import EngineSettings
from clora_ext.masks import Morphology
from miniworld.compose import run
from miniworld.evaluate import wilson
from miniworld.model import load_model

from .quality import PAPER_SETTINGS, paired, suites

PAPER = "paper"


def candidates(steps: int) -> dict[str, EngineSettings]:
    """The paper's settings and single-setting departures from them."""
    paper = PAPER_SETTINGS
    scaled = max(1, round(paper.schedule.refine_iterations * steps / 50))
    out = {
        PAPER: paper,
        f"refine_{scaled}_scaled": dataclasses.replace(paper, schedule=dataclasses.replace(paper.schedule, refine_iterations=scaled)),
        "tolerance_1e-2": dataclasses.replace(paper, refine_tolerance=1e-2),
        "tolerance_1e-3": dataclasses.replace(paper, refine_tolerance=1e-3),
        "step_10": dataclasses.replace(paper, step_size=10.0),
        "step_40": dataclasses.replace(paper, step_size=40.0),
        "threshold_0.3": dataclasses.replace(paper, mask_threshold=0.3),
        "threshold_0.5": dataclasses.replace(paper, mask_threshold=0.5),
        "morphology_open": dataclasses.replace(paper, morphology=Morphology.OPEN),
        "morphology_close": dataclasses.replace(paper, morphology=Morphology.CLOSE),
    }
    # cheaper refinement (issue #11): fewer iterations, plain or with a larger step or with momentum
    for n in (0, 1, 2, 3, 5, 10):
        fewer = dataclasses.replace(paper.schedule, refine_iterations=n)
        out[f"refine_{n}"] = dataclasses.replace(paper, schedule=fewer)
        if n >= 3:
            out[f"refine_{n}_momentum_0.9"] = dataclasses.replace(paper, schedule=fewer, momentum=0.9)
            scale = paper.schedule.refine_iterations / n
            out[f"refine_{n}_step_{paper.step_size * scale:.0f}"] = dataclasses.replace(
                paper, schedule=fewer, step_size=paper.step_size * scale)
    out["refine_5_down_path_loss"] = dataclasses.replace(
        paper, schedule=dataclasses.replace(paper.schedule, refine_iterations=5), down_path_loss=True)
    return out


def sweep(names: list[str], seeds: int, samplers: tuple[str, ...], steps: int, out_path: str) -> None:
    torch.set_flush_denormal(True)
    model = load_model()
    settings = candidates(steps)
    items = [(t, s) for t, s in suites(False)["two"] if s < seeds]
    done = set()
    if os.path.exists(out_path):  # a stopped sweep goes on where it stopped
        rows = [json.loads(line) for line in open(out_path) if line.strip()]
        done = {(r["candidate"], r["prompt"], r["seed"], r["sampler"]) for r in rows}
    with open(out_path, "a") as out:
        for task, seed in items:
            concepts = task.concepts(model)
            for sampler in samplers:
                for name in names:
                    if (name, task.prompt, seed, sampler) in done:
                        continue
                    t0 = time.perf_counter()
                    seen = []
                    r = run(model, task, "clora", seed, steps=steps, sampler=sampler, settings=settings[name],
                            concepts=concepts, on_step=lambda i, engine: seen.append(engine.records[-1]))
                    row = {"candidate": name, "prompt": task.prompt, "seed": seed, "sampler": sampler,
                           "verdict": {k: bool(v) for k, v in r.verdict.items()}, "passes": r.gradient_passes,
                           "mask_iou": r.mask_iou, "seconds": round(time.perf_counter() - t0, 3),
                           # the contrastive loss of the maps each update step's prediction used
                           "loss_after": {rec.step: round(rec.loss_after, 5) for rec in seen if rec.losses}}
                    out.write(json.dumps(row) + "\n")
                    out.flush()


def report(paths: list[str]) -> dict:
    rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
    by: dict[str, dict[tuple, dict]] = {}
    for r in rows:
        by.setdefault(r["candidate"], {})[(r["prompt"], r["seed"], r["sampler"])] = r
    base = by.get(PAPER, {})
    table = {}
    for name, cells in by.items():
        ok = [c["verdict"]["success"] for c in cells.values()]
        entry = {"n": len(ok), "success": round(float(np.mean(ok)), 3), "success_ci": list(wilson(sum(ok), len(ok))),
                 "gradient_passes": round(float(np.mean([c["passes"] for c in cells.values()])), 1),
                 "mask_iou": round(float(np.mean([v for c in cells.values() for v in c["mask_iou"]] or [0])), 3)}
        losses = [c["loss_after"] for c in cells.values() if c.get("loss_after")]
        if losses:  # rows written before the losses were recorded have none
            entry["loss_update_steps"] = round(float(np.mean([np.mean(list(loss.values())) for loss in losses])), 4)
            entry["loss_last_update"] = round(float(np.mean([loss[max(loss, key=int)] for loss in losses])), 4)
        shared = [k for k in cells if k in base]
        if name != PAPER and len(shared) > 1:
            diff = paired([float(cells[k]["verdict"]["success"]) - float(base[k]["verdict"]["success"]) for k in shared])
            entry["minus_paper"], entry["minus_paper_ci"] = diff["difference"], diff["ci"]
        table[name] = entry
    return table


def format_report(table: dict) -> str:
    lines = ["| candidate | n | success | minus paper | gradient passes | mask IoU | loss: update steps, last |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, e in table.items():
        diff = f"{e['minus_paper']:+.3f} [{e['minus_paper_ci'][0]:+.3f}, {e['minus_paper_ci'][1]:+.3f}]" if "minus_paper" in e else "-"
        lines.append(f"| {name} | {e['n']} | {e['success']:.3f} [{e['success_ci'][0]:.2f}, {e['success_ci'][1]:.2f}] | "
                     f"{diff} | {e['gradient_passes']:.1f} | {e['mask_iou']:.3f} | "
                     f"{e.get('loss_update_steps', '-')}, {e.get('loss_last_update', '-')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.defaults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt (6 prompts)")
    parser.add_argument("--samplers", nargs="+", default=["euler", "ddim"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--candidates", nargs="+", help="default: all")
    parser.add_argument("--shard", default="1/1", help="i/n: run every n-th candidate from the i-th")
    parser.add_argument("--out", default="out/defaults.jsonl", help="rows are appended here")
    parser.add_argument("--report", nargs="+", metavar="ROWS", help="only print the table of these row files")
    args = parser.parse_args(argv)
    if args.report:
        table = report(args.report)
        print(format_report(table))
        print(json.dumps(table, indent=1))
        return
    names = args.candidates or list(candidates(args.steps))
    i, n = (int(v) for v in args.shard.split("/"))
    sweep(names[i - 1::n], args.seeds, tuple(args.samplers), args.steps, args.out)


if __name__ == "__main__":
    main()
