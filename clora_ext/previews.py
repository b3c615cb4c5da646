"""Preview panels of per-variant attention maps and masks (for the demo and the UI's gallery)."""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image, ImageDraw

from .tokens import TokenMapSpec

CELL = 96
LABEL_H = 14
ROW_LABEL_W = 110


def _to_image(values: torch.Tensor, size: int) -> Image.Image:
    v = values.detach().float().cpu()
    span = v.max() - v.min()
    v = (v - v.min()) / span if span > 1e-8 else v.clamp(0, 1)  # a constant mask keeps its value
    arr = (v * 255).round().to(torch.uint8).numpy()
    h, w = arr.shape
    scale = max(1, size // max(h, w))
    return Image.fromarray(arr, mode="L").resize((w * scale, h * scale), Image.NEAREST).convert("RGB")


def panel(rows: Sequence[tuple[str, Sequence[tuple[str, torch.Tensor]]]], cell: int = CELL) -> Image.Image:
    """A grid: one labelled row per entry, one titled cell per (title, 2-D tensor), each scaled to [0, 1]."""
    cols = max((len(cells) for _, cells in rows), default=1) or 1
    images = [[(title, _to_image(t, cell)) for title, t in cells] for _, cells in rows]
    cw = max((im.width for row in images for _, im in row), default=cell)
    ch = max((im.height for row in images for _, im in row), default=cell)
    out = Image.new("RGB", (ROW_LABEL_W + cols * (cw + 4), len(rows) * (ch + LABEL_H + 6) + 4), "white")
    draw = ImageDraw.Draw(out)
    for r, ((label, _), row) in enumerate(zip(rows, images)):
        y = 4 + r * (ch + LABEL_H + 6)
        draw.text((4, y + LABEL_H + ch // 2 - 6), label[:16], fill="black")
        for c, (title, im) in enumerate(row):
            x = ROW_LABEL_W + c * (cw + 4)
            draw.text((x, y), title[:16], fill="black")
            out.paste(im, (x, y + LABEL_H))
            draw.rectangle((x - 1, y + LABEL_H - 1, x + im.width, y + LABEL_H + im.height), outline="gray")
    return out


def maps_panel(
    maps: torch.Tensor,
    token_maps: Sequence[TokenMapSpec],
    variant_names: Sequence[str],
    token_names: Sequence[str],
) -> Image.Image:
    """One image's token maps (P, h, w), a row per variant; ``token_names[p]`` titles map p."""
    rows = []
    for v, name in enumerate(variant_names):
        cells = [(token_names[p], maps[p]) for p, s in enumerate(token_maps) if s.variant == v]
        rows.append((name, cells))
    return panel(rows)


def masks_panel(masks: torch.Tensor, variant_names: Sequence[str]) -> Image.Image:
    """One image's fusion masks (V, H, W), one cell per variant."""
    return panel([("masks", [(name, masks[v]) for v, name in enumerate(variant_names)])])
