"""The demo end to end, shortened."""

from __future__ import annotations

import json

from PIL import Image

from clora_ext import demo


def test_demo_writes_panels_and_a_summary_showing_separation(tmp_path):
    summary = demo.run(str(tmp_path), steps=4, latent=16)
    for name in ("image.png", "maps_before.png", "maps_after.png", "masks_before.png", "masks_after.png"):
        with Image.open(tmp_path / name) as im:
            assert im.width > 50 and im.height > 50
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["loss_before"] == summary["loss_before"]
    assert saved["loss_after"] < saved["loss_before"]
    assert saved["overlap_after"] < saved["overlap_before"]
    assert saved["gradient_passes"] >= 2
