"""Train the miniature world's base model: UNet and text encoder together, from scratch.

    .venv/bin/python -m miniworld.train_base [--world NAME] [--steps N] [--out PATH] [--checkpoint PATH]

DDPM epsilon prediction with SD's scaled-linear betas on random scenes (1-3 objects,
base colours, captions in random order, 20 % of colours unnamed, 10 % empty captions
for classifier-free guidance). Besides the denoising loss, a grounding term (as
TokenCompose does for SD) asks the H/32 cross-attention map of each shape word,
normalised over the image, to match its object's footprint: real SD learned that
localisation from billions of images; a CPU-sized model in a 30-minute run does not
(a throwaway probe without it stayed at chance, own-object rate 0.52). The LoRAs are
trained without this term. Seeded, CPU by default; prints the loss curve, and the
weights (EMA, fp16), training time and localisation figures go to the world's weights
folder (``weights/`` for the default world; ``miniworld.worlds``). With ``--checkpoint`` a
stopped run resumes where its last checkpoint left it, with the same result.
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import numpy as np
import torch

from clora_ext.attention import AttentionCapture, CaptureRequest, cross_attention_modules

from .localisation import cell_fractions, localisation
from .model import (CHANNELS_PER_GROUP, TEXT_CONFIG, UNET_CONFIG, build_text_encoder, build_unet, load_model, save_model, sha256,
                    update_manifest)
from .scenes import random_scene
from .training import TrainLog, diffusion_loss, ema_update, lr_at, make_batch, set_seed
from .worlds import DEFAULT, WORLDS, World, get_world
from clora_ext.devtools.pipeline import NoiseSchedule


def grounding_loss(maps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """KL(target footprint || map normalised over the image), mean over maps. (P, h, w) each."""
    p = maps.flatten(1)
    p = p / p.sum(1, keepdim=True).clamp_min(1e-12)
    q = targets.flatten(1)
    q = q / q.sum(1, keepdim=True).clamp_min(1e-12)
    return (q * ((q + 1e-12).log() - (p + 1e-12).log())).sum(1).mean()


def _save_checkpoint(path: str, step: int, nets: dict, opt: torch.optim.Optimizer, rng: np.random.Generator,
                     gen: torch.Generator, log: TrainLog) -> None:
    state = {"step": step, "nets": {k: v.state_dict() for k, v in nets.items()}, "opt": opt.state_dict(),
             "numpy_rng": rng.bit_generator.state, "torch_gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
             "curve": log.curve, "window": log._window, "seconds": log.seconds}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # never a half-written checkpoint


def _resume(path: str, nets: dict, opt: torch.optim.Optimizer, rng: np.random.Generator, gen: torch.Generator,
            log: TrainLog) -> int:
    """Restore a checkpoint into the run's objects; the step to go on from."""
    state = torch.load(path, weights_only=False)
    for k, net in nets.items():
        net.load_state_dict(state["nets"][k])
    opt.load_state_dict(state["opt"])
    rng.bit_generator.state = state["numpy_rng"]
    gen.set_state(state["torch_gen"])
    torch.set_rng_state(state["torch_rng"])
    log.curve, log._window = state["curve"], state["window"]
    log.start -= state["seconds"]  # train_seconds counts the time before the stop too
    return state["step"]


def train(steps: int, batch: int, lr: float, grounding: float, seed: int, threads: int | None, out: str,
          ema_decay: float = 0.995, evaluate: bool = True, quiet: bool = False, world: World = DEFAULT,
          checkpoint: str | None = None, checkpoint_every: int = 100) -> dict:
    """Train ``world``'s base model (its captions; ``seed`` as given) into ``out``. With ``checkpoint``,
    the state is saved there every ``checkpoint_every`` steps and a run finding one resumes from it."""
    rng, gen = set_seed(seed, threads)
    unet, te = build_unet(use_checkpoint=False).train(), build_text_encoder().train()
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = NoiseSchedule()
    capture = AttentionCapture(cross_attention_modules(unet))
    log = TrainLog(steps, every=max(1, min(50, steps)), quiet=quiet)
    nets = {"unet": unet, "te": te, "ema_unet": ema_unet, "ema_te": ema_te}
    first = _resume(checkpoint, nets, opt, rng, gen, log) if checkpoint and os.path.exists(checkpoint) else 0
    with capture.installed():
        for step in range(first, steps):
            scenes = [random_scene(rng) for _ in range(batch)]
            captions = [world.caption(s, rng) if rng.random() >= 0.1 else "" for s in scenes]
            data = make_batch(scenes, captions, rng)
            rows = [b for b, pos in enumerate(data.noun_positions) for p in pos if p >= 0]
            cols = [p for pos in data.noun_positions for p in pos if p >= 0]
            targets = torch.cat([cell_fractions(m)[[i for i, p in enumerate(pos) if p >= 0]]
                                 for m, pos in zip(data.masks, data.noun_positions)])
            context = te(input_ids=data.ids).last_hidden_state
            # long dtype spelled out: a batch of only empty captions gives empty lists (a float tensor otherwise)
            request = CaptureRequest(torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long), (8, 8),
                                     grad=True)
            with capture.capturing(request):
                mse, _ = diffusion_loss(unet, context, data.latents, schedule, gen)
            ground = grounding_loss(capture.maps(), targets) if rows else mse.new_zeros(())
            loss = mse + grounding * ground
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(ema_decay, (1 + step) / (10 + step))
            ema_update(ema_unet, unet, decay)
            ema_update(ema_te, te, decay)
            log.add(step, mse=mse.item(), grounding=ground.item())
            if checkpoint and (step + 1) % checkpoint_every == 0:
                _save_checkpoint(checkpoint, step + 1, nets, opt, rng, gen, log)
    save_model(ema_unet, ema_te, out)
    result = {
        "file": os.path.basename(out),
        "sha256": sha256(out),
        "bytes": os.path.getsize(out),
        "config": {"world": world.name, "caption_style": world.caption_style.value,
                   "steps": steps, "batch": batch, "lr": lr, "grounding_weight": grounding, "seed": seed,
                   "threads": torch.get_num_threads(), "ema_decay": ema_decay, "unet": UNET_CONFIG,
                   "group_norm_channels_per_group": CHANNELS_PER_GROUP, "text_encoder": TEXT_CONFIG},
        "train_seconds": round(log.seconds, 1),
        "loss_curve": log.curve,
    }
    if evaluate:
        # the figures of the file as saved (fp16 weights, fp32 compute), as every user loads it
        result["localisation"] = localisation(load_model(out), world=world)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--grounding", type=float, default=0.1, help="weight of the attention grounding term")
    parser.add_argument("--world", choices=sorted(WORLDS), default=DEFAULT.name)
    parser.add_argument("--seed", type=int, default=None, help="default: the world's base seed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="default: the world's base.safetensors")
    parser.add_argument("--checkpoint", default=None, help="save the training state here, and resume from it")
    parser.add_argument("--no-manifest", action="store_true", help="do not record the run in the world's manifest.json")
    args = parser.parse_args(argv)
    world = get_world(args.world)
    out = args.out or world.base_path
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    seed = world.base_seed if args.seed is None else args.seed
    result = train(args.steps, args.batch, args.lr, args.grounding, seed, args.threads, out, world=world,
                   checkpoint=args.checkpoint)
    if not args.no_manifest:
        update_manifest("base", result, world)
    print(json.dumps({k: result[k] for k in ("train_seconds", "bytes", "localisation")}, indent=2))


if __name__ == "__main__":
    main()
