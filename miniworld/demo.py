"""CLoRA in the miniature world: two and three trained LoRAs, plain vs merged vs CLoRA.

    .venv/bin/python -m miniworld.demo --out DIR

Loads the committed base model and LoRAs (``miniworld/weights``; nothing is trained
here) and writes into DIR:

* ``image.png``: "a circle and a square" with the circle LoRA (magenta, trigger
  ``sks``) and the square LoRA (cyan, ``ohwx``), and "a circle, a square and a
  triangle" with the triangle LoRA (white, ``zwx``) too; a row per seed, a column per
  method (no LoRA; LoRAs merged at weight 1 with every trigger in the prompt; CLoRA),
  each picture with the oracle's reading beneath;
* ``maps_before.png`` / ``maps_after.png``: the two-LoRA prompt's per-variant token
  maps at the first step, before and after its contrastive update (first seed);
* ``masks_before.png`` / ``masks_after.png``: the fusion masks made from them;
* ``summary.json``: ``localisation`` (held-out scenes), per method and prompt the
  oracle's reading of every picture (``present``, ``own_attribute``,
  ``other_attribute`` per subject) and the rates over the seeds, the CLoRA masks'
  IoU with the objects, the loss at the first step before and after its update.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from clora_ext.concepts import Composition
from clora_ext.devtools.tiny_sd import clip_bpe
from clora_ext.engine import CLoRAEngine, EngineSettings, StepOutput
from clora_ext.previews import maps_panel, masks_panel
from clora_ext.tokens import content_stream

from .compose import Result, Task, run as compose
from .localisation import localisation
from .model import load_model

TASKS = {
    "two": Task("a circle and a square", ("circle_sks", "square_ohwx")),
    "three": Task("a circle, a square and a triangle", ("circle_sks", "square_ohwx", "triangle_zwx")),
}
SHOWN = ("plain", "merge", "clora")
SCALE = 5


def _picture(result: Result, subjects) -> Image.Image:
    img = Image.fromarray((result.image.transpose(1, 2, 0) * 255).round().astype(np.uint8), mode="RGB")
    img = img.resize((img.width * SCALE, img.height * SCALE), Image.NEAREST)
    canvas = Image.new("RGB", (img.width, img.height + 12 * len(subjects) + 4), "white")
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, s in enumerate(subjects):
        v = result.verdict["subjects"][s.shape]
        found = [o.colour for o in result.analysis.objects if o.shape == s.shape]
        text = f"{s.shape}: {'/'.join(found) or 'missing'}"
        ok = v["present"] and v["count"] == 1 and (result.method == "plain" or (v["own_attribute"] and not v["other_attribute"]))
        draw.text((2, img.height + 2 + 12 * i), text, fill="darkgreen" if ok else "firebrick")
    return canvas


def grid(rows: list[tuple[str, list[Result]]]) -> Image.Image:
    """A row per (task, seed), a column per method."""
    labels = {"plain": "no LoRA", "merge": "LoRAs merged", "clora": "CLoRA"}
    cells = [[_picture(r, TASKS[key].subjects()) for r in results] for key, results in rows]
    cw = max(c.width for row in cells for c in row) + 6
    ch = [max(c.height for c in row) + 6 for row in cells]
    head, side = 16, 96
    out = Image.new("RGB", (side + cw * len(SHOWN), head + sum(ch)), "white")
    draw = ImageDraw.Draw(out)
    for j, m in enumerate(SHOWN):
        draw.text((side + j * cw + 2, 2), labels[m], fill="black")
    y = head
    for (key, results), row, h in zip(rows, cells, ch):
        draw.text((2, y + 4), TASKS[key].prompt.replace(", a ", ",\na ").replace(" and ", "\nand "), fill="black")
        draw.text((2, y + h - 20), f"seed {results[0].seed}", fill="gray")
        for j, cell in enumerate(row):
            out.paste(cell, (side + j * cw, y))
        y += h
    return out


def _token_names(engine: CLoRAEngine, prompts: list[str]) -> list[str]:
    from clora_ext.tokens import BPEChunkTokenizer

    tokenizer = BPEChunkTokenizer(clip_bpe().encode)
    streams = [dict(zip(*reversed(content_stream(tokenizer.chunks(p))))) for p in prompts]
    decode = clip_bpe().decode
    return [decode([streams[s.variant][s.position]]).strip() + ("*" if s.mask else "") for s in engine.token_maps]


def _rates(results: list[Result]) -> dict:
    n = len(results)
    rate = lambda key: round(sum(bool(r.verdict[key]) for r in results) / n, 3)  # noqa: E731
    return {"n": n, **{k: rate(k) for k in ("success", "bleed", "omission", "duplicate")}}


def run(out_dir: str, steps: int = 20, seeds: tuple[int, ...] = (0, 1, 2), sampler: str = "euler") -> dict:
    torch.set_flush_denormal(True)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    model = load_model()
    settings = EngineSettings()  # the shipped defaults: the paper's settings (docs/quality.md)
    first: dict[str, StepOutput] = {}
    engines: dict[str, CLoRAEngine] = {}

    def keep_first(label):
        def hook(i, engine):
            if i == 0:
                first[label], engines[label] = engine.last_output, engine
        return hook

    rows: list[tuple[str, list[Result]]] = []
    summary_methods: dict[str, dict] = {}
    for key, task in TASKS.items():
        concepts = task.concepts(model)
        per_method: dict[str, list[Result]] = {m: [] for m in SHOWN}
        for seed in seeds if key == "two" else seeds[:2]:
            row = []
            for method in SHOWN:
                hook = keep_first("after") if (key, method, seed) == ("two", "clora", seeds[0]) else None
                r = compose(model, task, method, seed, steps=steps, sampler=sampler, settings=settings,
                            concepts=concepts, on_step=hook)
                per_method[method].append(r)
                row.append(r)
            rows.append((key, row))
        # the first step without its update: the same seed with fusion only
        if key == "two":
            compose(model, task, "fusion_only", seeds[0], steps=1, sampler=sampler, settings=settings,
                    concepts=concepts, on_step=keep_first("before"))
        summary_methods[key] = {
            "prompt": task.prompt,
            "loras": list(task.content),
            "methods": {
                m: {
                    **_rates(rs),
                    "pictures": [{"seed": r.seed, **r.verdict["subjects"]} for r in rs],
                    **({"mask_iou": round(float(np.mean([v for r in rs for v in r.mask_iou])), 3)} if m == "clora" else {}),
                }
                for m, rs in per_method.items()
            },
        }
    grid(rows).save(os.path.join(out_dir, "image.png"))

    two = TASKS["two"]
    engine = engines["after"]
    prompts = [v.prompt for v in Composition.from_concepts([c.concept for c in two.concepts(model)]).variants(two.prompt)]
    variants = ["base"] + [f"{name.split('_')[0]} ({name})" for name in two.content]
    names = _token_names(engine, prompts)
    for label, output in first.items():
        maps_panel(output.maps[0], engine.token_maps, variants, names).save(os.path.join(out_dir, f"maps_{label}.png"))
        masks_panel(output.masks[0], variants).save(os.path.join(out_dir, f"masks_{label}.png"))
    before, after = engines["before"].records[0], engines["after"].records[0]
    summary = {
        "steps": steps,
        "sampler": sampler,
        "seeds": list(seeds),
        "clora_settings": {"refine_iterations": settings.schedule.refine_iterations, "refine_tolerance": None,
                           "step_size": settings.step_size, "mask_threshold": settings.mask_threshold},
        "localisation": localisation(model),
        "oracle": summary_methods,
        "first_step": {"loss_before": before.loss_after, "loss_after": after.loss_after,
                       "overlap_before": before.overlap_after, "overlap_after": after.overlap_after},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sampler", choices=["euler", "ddim"], default="euler")
    args = parser.parse_args(argv)
    summary = run(args.out, args.steps, tuple(args.seeds), args.sampler)
    print(json.dumps({"localisation": {k: summary["localisation"][k] for k in ("own_object_rate", "mask_iou")},
                      **{k: {m: v["success"] for m, v in o["methods"].items()} for k, o in summary["oracle"].items()},
                      "seconds": summary["seconds"]}, indent=2))
    print(f"wrote {args.out}/image.png, maps_*.png, masks_*.png, summary.json")


if __name__ == "__main__":
    main()
