"""Train one of the miniature world's LoRAs on the frozen base model.

    .venv/bin/python -m miniworld.train_lora NAME [--world W] [--steps N]   (NAME: one of the world's LoRAs)

LoRA training as kohya's scripts do it, in LoCon form: rank-r factors on the UNet's
transformer layers (attention, feed-forward, proj_in/out), on its ResBlock convolutions,
and on the text encoder's self-attention; the base frozen, the denoising loss only (no
grounding term). The convolutions matter here: this UNet has attention only at 8x8,
and with factors there alone (rank 4, 400 steps) the loss was still falling at 4x the
base model's and the LoRAs drew noisy blobs. A
content LoRA sees only pictures of its own subject, one object in its colour,
captioned "a <trigger> <shape>" like a character LoRA's dataset; the style LoRA sees
ordinary scenes with film grain, captioned "<caption>, <trigger>". Captions are in the
world's style (``miniworld.worlds``). The factors run through the core's own per-row
routing; the file is written in kohya format, into the world's weights folder.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file

from clora_ext.devtools.loras import LOCON_TARGETS, TE_TARGETS, UNET_TARGETS, kohya_te_key, kohya_unet_key, lora_targets, put_kohya
from clora_ext.devtools.pipeline import NoiseSchedule
from clora_ext.devtools.tiny_sd import clip_bpe
from clora_ext.routing import LowRankDelta, Route, RowRouter

from .model import load_model, set_checkpointing, sha256, update_manifest
from .scenes import Scene, random_scene
from .training import TrainLog, diffusion_loss, lr_at, make_batch, set_seed
from .worlds import DEFAULT, WORLDS, LoRASpec, World, get_world, world_of


def init_factors(targets: list[tuple[str, torch.nn.Module]], rank: int, gen: torch.Generator) -> dict[str, LowRankDelta]:
    """Trainable factors: down random (std 1/sqrt(in)), up zero, so training starts at the base model."""
    deltas = {}
    for name, module in targets:
        w = module.weight
        kernel = tuple(w.shape[2:])
        down = (torch.randn((rank, w.shape[1], *kernel), generator=gen) / w[0].numel() ** 0.5).requires_grad_()
        up = torch.zeros((w.shape[0], rank, *([1] * len(kernel)))).requires_grad_()
        deltas[name] = LowRankDelta(down, up, scale=1.0)
    return deltas


def trigger_tokens(trigger: str) -> list[str]:
    """How CLIP's BPE splits a trigger ("</w>" ends a word): a multi-token trigger spreads over several maps."""
    bpe = clip_bpe()
    return [bpe.decoder[i] for i in bpe.encode(trigger)]


def training_scene(spec: LoRASpec, rng: np.random.Generator, world: World = DEFAULT) -> tuple[Scene, str]:
    if spec.style:
        scene = random_scene(rng, grain=True)
        return scene, world.caption(scene, rng, suffix=f", {spec.trigger}")
    scene = random_scene(rng, shapes=(spec.shape,), colours={spec.shape: spec.colour})
    return scene, world.caption(scene, rng, words={spec.shape: spec.trigger})


def train(name: str, steps: int, batch: int, lr: float, rank: int, seed: int, threads: int | None,
          out: str | None = None, base: str | None = None, quiet: bool = False, world: World = DEFAULT) -> dict:
    """Train ``world``'s LoRA ``name`` on ``base`` (default: the world's base model) into ``out``."""
    if name not in world.lora_specs:
        raise KeyError(f"world {world.name} has no LoRA {name!r}; it has {sorted(world.lora_specs)}")
    spec = world.lora_specs[name]
    rng, gen = set_seed(seed, threads)
    model = load_model(base, world=world)
    set_checkpointing(model.unet, False)
    for p in list(model.unet.parameters()) + list(model.text_encoder.parameters()):
        p.requires_grad_(False)
    unet_targets = lora_targets(model.unet, UNET_TARGETS) + lora_targets(model.unet, LOCON_TARGETS)
    unet_deltas = init_factors(unet_targets, rank, gen)
    te_deltas = init_factors(lora_targets(model.text_encoder, TE_TARGETS), rank, gen)
    params = [t for d in (*unet_deltas.values(), *te_deltas.values()) for t in (d.down, d.up)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = NoiseSchedule()
    unet_router, te_router = RowRouter(model.unet), RowRouter(model.text_encoder)
    log = TrainLog(steps, every=max(1, min(25, steps)), quiet=quiet)
    for step in range(steps):
        scenes, captions = zip(*(training_scene(spec, rng, world) for _ in range(batch)))
        data = make_batch(scenes, captions, rng)
        rows = list(range(batch))
        with te_router.routed([Route(te_deltas, rows, 1.0, name)], batch):
            context = model.text_encoder(input_ids=data.ids).last_hidden_state
        with unet_router.routed([Route(unet_deltas, rows, 1.0, name)], batch):
            loss, _ = diffusion_loss(model.unet, context, data.latents, schedule, gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=20)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.add(step, mse=loss.item())
    tensors: dict[str, torch.Tensor] = {}
    for module_name, d in unet_deltas.items():
        put_kohya(tensors, kohya_unet_key(module_name), d.down.detach().contiguous(), d.up.detach().contiguous(), rank)
    for module_name, d in te_deltas.items():
        put_kohya(tensors, kohya_te_key(module_name), d.down.detach().contiguous(), d.up.detach().contiguous(), rank)
    out = out or spec.path
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
                "ss_network_args": json.dumps({"conv_dim": str(rank), "conv_alpha": str(rank)}),
                "ss_tag_frequency": json.dumps({spec.trigger: steps * batch})}
    save_file({k: v.half() if v.dim() else v for k, v in tensors.items()}, out, metadata=metadata)
    return {
        "file": os.path.basename(out),
        "sha256": sha256(out),
        "bytes": os.path.getsize(out),
        "teaches": {"trigger": spec.trigger, "trigger_tokens": trigger_tokens(spec.trigger), "shape": spec.shape,
                    "colour": spec.colour, "style": spec.style},
        "world": world.name,
        "config": {"steps": steps, "batch": batch, "lr": lr, "rank": rank, "alpha": rank, "seed": seed,
                   "threads": torch.get_num_threads()},
        "train_seconds": round(log.seconds, 1),
        "loss_curve": log.curve,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(n for w in WORLDS.values() for n in w.lora_specs))
    parser.add_argument("--world", choices=sorted(WORLDS), default=None, help="default: the world the LoRA belongs to")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="output file (default: the world's NAME.safetensors)")
    parser.add_argument("--base", default=None, help="base model file (default: the world's base.safetensors)")
    parser.add_argument("--no-manifest", action="store_true")
    args = parser.parse_args(argv)
    world = get_world(args.world) if args.world else world_of(args.name)
    result = train(args.name, args.steps, args.batch, args.lr, args.rank, args.seed, args.threads, args.out, args.base,
                   world=world)
    if not args.no_manifest:
        update_manifest(f"lora:{args.name}", result, world)
    print(json.dumps({k: result[k] for k in ("file", "bytes", "train_seconds")}))


if __name__ == "__main__":
    main()
