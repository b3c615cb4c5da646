"""CLoRA on the tiny random-weight model with two generated LoRAs.

    .venv/bin/python -m clora_ext.demo --out DIR

Writes into DIR: ``image.png`` (the composed latent, and the same seed without the
contrastive update beside it), ``maps_before.png`` / ``maps_after.png`` (per-variant
token attention maps at the first step, before and after its contrastive update),
``masks_before.png`` / ``masks_after.png`` (the fusion masks from those maps) and
``summary.json``. With random weights the image is no picture; the maps, masks and
numbers show the mechanism at work.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from PIL import Image

from .concepts import Composition, Concept
from .devtools.loras import write_kohya_lora, write_peft_lora
from .devtools.pipeline import ConceptLoRA, TinySD, generate
from .devtools.tiny_sd import build_tiny_text_encoder, build_tiny_unet, clip_bpe
from .engine import CLoRAEngine, EngineSettings, StepOutput
from .lora_file import map_lora, read_lora_file
from .previews import maps_panel, masks_panel
from .tokens import content_stream
from .update import Schedule

PROMPT = "a photo of a cat and a dog on a sofa"
NEGATIVE = "blurry, low quality"


def latent_preview(latent: torch.Tensor, scale: int = 8) -> Image.Image:
    """The first three latent channels as RGB (no VAE in the tiny model)."""
    rgb = latent[0, :3].float()
    lo = rgb.flatten(1).min(1).values[:, None, None]
    hi = rgb.flatten(1).max(1).values[:, None, None]
    arr = ((rgb - lo) / (hi - lo + 1e-8) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr, mode="RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def token_names(model: TinySD, engine: CLoRAEngine, prompts: list[str]) -> list[str]:
    names = []
    decode = clip_bpe().decode
    streams = [dict(zip(*reversed(content_stream(model.tokenizer.chunks(p))))) for p in prompts]
    for spec in engine.token_maps:
        names.append(decode([streams[spec.variant][spec.position]]).strip() + ("*" if spec.mask else ""))
    return names


def run(out_dir: str, steps: int = 20, seed: int = 7, latent: int = 32, sampler: str = "euler") -> dict:
    torch.set_flush_denormal(True)
    os.makedirs(out_dir, exist_ok=True)
    unet, te = build_tiny_unet(seed=0), build_tiny_text_encoder(seed=0)
    model = TinySD(unet, te)
    with tempfile.TemporaryDirectory() as tmp:
        cat = write_kohya_lora(os.path.join(tmp, "cat_lora.safetensors"), unet, te, seed=1)
        dog = write_peft_lora(os.path.join(tmp, "dog_lora.safetensors"), unet, te, seed=2)
        concepts = [
            ConceptLoRA(Concept("cat", "cat_lora", trigger="sks"), map_lora(read_lora_file(cat), unet, te)),
            ConceptLoRA(Concept("dog", "dog_lora", trigger="ohwx"), map_lora(read_lora_file(dog), unet, te)),
        ]
    # the paper's schedule scaled to the step count (updates in the first half, refinement at 0/20/40 %)
    # with its fixed refinement count, so that the first step shows the whole effect of the update
    settings = EngineSettings(schedule=Schedule(refine_iterations=max(1, round(20 * steps / 50))), refine_tolerance=None)
    common = dict(seed=seed, steps=steps, sampler=sampler, latent_hw=(latent, latent), concepts=concepts, settings=settings)

    first: dict[str, StepOutput] = {}

    def keep_first(label):
        return lambda i, engine: first.setdefault(label, engine.last_output) if i == 0 else None

    t0 = time.perf_counter()
    fused_only, plain_engine = generate(model, PROMPT, NEGATIVE, allow_update=False, on_step=keep_first("before"), **common)
    t1 = time.perf_counter()
    composed, engine = generate(model, PROMPT, NEGATIVE, on_step=keep_first("after"), **common)
    t2 = time.perf_counter()

    prompts = [v.prompt for v in Composition.from_concepts([c.concept for c in concepts]).variants(PROMPT)]
    variants = ["base"] + [f"{c.concept.subject} ({c.concept.lora})" for c in concepts]
    names = token_names(model, engine, prompts)
    for label, output in first.items():
        maps_panel(output.maps[0], engine.token_maps, variants, names).save(os.path.join(out_dir, f"maps_{label}.png"))
        masks_panel(output.masks[0], variants).save(os.path.join(out_dir, f"masks_{label}.png"))
    side = Image.new("RGB", (latent * 16 + 8, latent * 8), "white")
    side.paste(latent_preview(composed), (0, 0))
    side.paste(latent_preview(fused_only), (latent * 8 + 8, 0))
    side.save(os.path.join(out_dir, "image.png"))

    before, after = plain_engine.records[0], engine.records[0]  # step 0 without / with its update
    summary = {
        "prompt": PROMPT,
        "concepts": {"cat": "cat_lora (kohya, trigger sks)", "dog": "dog_lora (PEFT, trigger ohwx)"},
        "steps": steps,
        "refine_iterations": settings.schedule.refine_iterations,
        "sampler": sampler,
        "latent": [latent, latent],
        "loss_before": before.loss_after,
        "loss_after": after.loss_after,
        "overlap_before": before.overlap_after,
        "overlap_after": after.overlap_after,
        "gradient_passes": sum(len(r.losses) for r in engine.records),
        "seconds_fusion_only": round(t1 - t0, 2),
        "seconds_clora": round(t2 - t1, 2),
        "per_step": [
            {"step": r.step, "updates": r.iterations, "losses": [round(v, 4) for v in r.losses], "loss_after": r.loss_after}
            for r in engine.records
        ],
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--latent", type=int, default=32, help="latent side (image side / 8)")
    parser.add_argument("--sampler", choices=["euler", "ddim"], default="euler")
    args = parser.parse_args(argv)
    summary = run(args.out, args.steps, args.seed, args.latent, args.sampler)
    print(json.dumps({k: summary[k] for k in ("loss_before", "loss_after", "overlap_before", "overlap_after")}, indent=2))
    print(f"wrote {args.out}/image.png, maps_*.png, masks_*.png, summary.json")


if __name__ == "__main__":
    main()
