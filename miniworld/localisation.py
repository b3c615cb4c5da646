"""Do the model's H/32 cross-attention maps find the nouns' objects? Measured on held-out scenes.

Each held-out scene (two objects, both colours named) is noised to a timestep and run
once through the UNet with the core's own capture (``clora_ext.attention``: the maps
CLoRA computes, head- and layer-averaged over the H/32 layers). Per noun:

* ``own_object_rate``: its map puts more mass on its own object than on the other
  (chance 0.5);
* ``mask_iou``: IoU of the lambda = 0.4 mask (map >= 0.4 * max) with the object's
  8x8 cells (cells at least half covered).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from clora_ext.attention import AttentionCapture, CaptureRequest, cross_attention_modules
from clora_ext.devtools.pipeline import TinySD

from .scenes import random_scene
from .training import make_batch
from .worlds import DEFAULT, World

HELD_OUT_SEED = 1_000_003
TIMESTEPS = (100, 300, 500, 700, 900)
MASK_THRESHOLD = 0.4


def cell_fractions(masks: np.ndarray, hw: tuple[int, int] = (8, 8)) -> torch.Tensor:
    """(n, H, W) boolean masks -> (n, h, w) fraction of each map cell they cover."""
    return F.adaptive_avg_pool2d(torch.as_tensor(masks, dtype=torch.float32)[:, None], hw)[:, 0]


def map_scores(maps: torch.Tensor, own: torch.Tensor, other: torch.Tensor) -> tuple[bool, float]:
    """(own mass > other mass, IoU of the 0.4-mask with the own object's cells) for one (h, w) map."""
    own_mass, other_mass = float((maps * own).sum()), float((maps * other).sum())
    mask = maps >= MASK_THRESHOLD * maps.max()
    cells = own >= 0.5
    union = float((mask | cells).sum())
    return own_mass > other_mass, float((mask & cells).sum()) / union if union else 0.0


@torch.no_grad()
def localisation(model: TinySD, n_scenes: int = 128, seed: int = HELD_OUT_SEED, batch: int = 32,
                 world: World = DEFAULT) -> dict:
    """``{"own_object_rate", "mask_iou", "n_maps", "per_timestep": {t: {...}}}`` over held-out scenes,
    captioned in ``world``'s style."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    scenes = [random_scene(rng, n_objects=2, p_unnamed=0.0) for _ in range(n_scenes)]
    capture = AttentionCapture(cross_attention_modules(model.unet))
    schedule = model.schedule
    per_t: dict[int, dict[str, list[float]]] = {t: {"own": [], "iou": []} for t in TIMESTEPS}
    with capture.installed():
        for start in range(0, n_scenes, batch):
            chunk = scenes[start : start + batch]
            data = make_batch(chunk, [world.caption(s, rng) for s in chunk], rng)
            context = model.text_encoder(input_ids=data.ids).last_hidden_state
            rows = torch.tensor([b for b, pos in enumerate(data.noun_positions) for _ in pos])
            cols = torch.tensor([p for pos in data.noun_positions for p in pos])
            fractions = [cell_fractions(m) for m in data.masks]
            for t in TIMESTEPS:
                abar = float(schedule.alphas_cumprod[t])
                noise = torch.randn(data.latents.shape, generator=gen)
                xt = abar**0.5 * data.latents + (1 - abar) ** 0.5 * noise
                with capture.capturing(CaptureRequest(rows, cols, (8, 8))):
                    model.unet(xt, torch.full((len(chunk),), t), context=context)
                maps = capture.maps()
                p = 0
                for b, pos in enumerate(data.noun_positions):
                    for i in range(len(pos)):
                        own = fractions[b][i]
                        other = fractions[b].sum(0) - own
                        win, iou = map_scores(maps[p], own, other)
                        per_t[t]["own"].append(win)
                        per_t[t]["iou"].append(iou)
                        p += 1
    own_all = [v for d in per_t.values() for v in d["own"]]
    iou_all = [v for d in per_t.values() for v in d["iou"]]
    return {
        "own_object_rate": round(float(np.mean(own_all)), 4),
        "mask_iou": round(float(np.mean(iou_all)), 4),
        "n_maps": len(own_all),
        "timesteps": list(TIMESTEPS),
        "per_timestep": {
            str(t): {"own_object_rate": round(float(np.mean(d["own"])), 4), "mask_iou": round(float(np.mean(d["iou"])), 4)}
            for t, d in per_t.items()
        },
    }
