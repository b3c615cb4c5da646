"""The demo end to end, shortened: it runs on the committed miniature-world weights."""

from __future__ import annotations

import json

from PIL import Image

from miniworld import demo
from miniworld.loras import LORAS
from miniworld.model import read_manifest


def test_demo_writes_panels_and_a_summary_of_the_oracle(tmp_path):
    summary = demo.run(str(tmp_path), steps=6, seeds=(0,))
    for name in ("image.png", "maps_before.png", "maps_after.png", "masks_before.png", "masks_after.png"):
        with Image.open(tmp_path / name) as im:
            assert im.width > 100 and im.height > 100
    saved = json.loads((tmp_path / "summary.json").read_text())
    # the localisation figures are the held-out ones the manifest records for the committed weights
    assert saved["localisation"]["own_object_rate"] == read_manifest()["base"]["localisation"]["own_object_rate"]
    for key, task in demo.TASKS.items():
        methods = saved["oracle"][key]["methods"]
        assert set(methods) == set(demo.SHOWN)
        for picture in methods["merge"]["pictures"]:
            assert set(picture) == {"seed"} | {LORAS[n].shape for n in task.content}
            for verdict in (v for k, v in picture.items() if k != "seed"):
                assert set(verdict) == {"present", "count", "own_attribute", "other_attribute"}
        assert 0.0 <= methods["clora"]["mask_iou"] <= 1.0
    first = saved["first_step"]
    assert first["loss_after"] < first["loss_before"]
    assert summary["seconds"] == saved["seconds"]
