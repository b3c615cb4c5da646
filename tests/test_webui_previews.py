"""Gallery previews of the glue: one image per generated image, maps above masks."""

from __future__ import annotations

import torch

from clora_ext.webui.plan import plan_variants
from clora_ext.webui.previews import PreviewStore
from clora_ext.concepts import Composition, Concept
from clora_ext.engine import StepOutput
from clora_ext.tokens import TokenMapSpec


def test_one_preview_per_image_in_batch_order():
    comp = Composition.from_concepts([Concept("cat", "a"), Concept("dog", "b")])
    plan = plan_variants(comp, ["a cat and a dog"] * 3, [""] * 3)
    specs = [TokenMapSpec(v, 2, 0, v == 1) for v in range(3)] + [TokenMapSpec(v, 5, 1, v == 2) for v in range(3)]
    out = StepOutput(
        cond=torch.zeros(2, 4, 8, 8), uncond=torch.zeros(2, 4, 8, 8), maps=torch.rand(2, 6, 2, 2), masks=torch.ones(2, 3, 8, 8)
    )
    store = PreviewStore()
    store.record(0, [2, 0], out, specs, plan)  # a group holding batch images 2 and 0
    store.record(0, [1], StepOutput(out.cond[:1], out.uncond[:1], out.maps[:1], out.masks[:1]), specs, plan)
    images = store.images()
    assert len(images) == 3 and all(im.mode == "RGB" for im in images)
    assert len({im.size for im in images}) == 1
