"""reForge's and Forge Classic's LoRA reader as the glue uses it (written for these tests).

- the same key maps as Neo (``model_lora_keys_unet``/``model_lora_keys_clip``);
- reForge: ``load_lora(lora, to_load, log_missing=True)`` returns only {model key: patch}: Neo's
  adapter objects for LoRA and LoHa, and ``("diff", (tensor,))`` for a layer stored as a full
  weight difference (``<prefix>.diff``); ``calculate_weight(patches, weight, key,
  intermediate_dtype)`` merges patch entries ``(strength, patch, strength_model, offset,
  function)`` into ``weight``;
- Forge Classic (``backend.patcher.lora.FLAVOUR == "classic"``, set by the tests): the old
  ComfyUI reader, ``load_lora(lora, to_load)`` -> ({model key: tuple}, {tensors not used}) with
  ``("lora", (up, down, alpha, mid))``, ``("loha", (w1a, w1b, alpha, w2a, w2b, t1, t2))`` and
  ``("lokr", (w1, w2, alpha, w1_a, w1_b, w2_a, w2_b, t2))``,
  merged by the model patcher's ``calculate_weight`` method (``backend.patcher.unet``).
"""

from __future__ import annotations

import torch

from backend.patcher import lora as neo_lora
from backend.patcher.lora import ADAPTERS, WeightAdapterBase, model_lora_keys_clip, model_lora_keys_unet  # noqa: F401


def load_lora(lora: dict, to_load: dict, log_missing: bool = True):
    if neo_lora.FLAVOUR == "classic":
        return _classic_load_lora(lora, to_load)
    patches = {}
    for x, model_key in to_load.items():
        alpha = float(lora[f"{x}.alpha"].item()) if f"{x}.alpha" in lora else None
        for cls in ADAPTERS:
            adapter = cls.load(x, lora, alpha, lora.get(f"{x}.dora_scale"))
            if adapter is not None:
                patches[model_key] = adapter
                break
        if f"{x}.diff" in lora:
            patches[model_key] = ("diff", (lora[f"{x}.diff"],))
    return patches


def calculate_weight(patches, weight, key, intermediate_dtype=torch.float32, original_weights=None):
    for strength, patch, strength_model, offset, function in patches:
        function = function or (lambda a: a)
        if strength_model != 1.0:
            weight *= strength_model
        if isinstance(patch, WeightAdapterBase):
            weight = patch.calculate_weight(weight, key, strength, strength_model, offset, function, intermediate_dtype)
            continue
        kind, tensors = patch
        if kind == "diff":
            weight += function(strength * tensors[0].to(weight.dtype))
        elif kind == "set":
            weight.copy_(tensors[0])
    return weight


def _classic_load_lora(lora: dict, to_load: dict) -> tuple[dict, dict]:
    adapters, rest = neo_lora.load_lora_objects(lora, to_load)
    patches = {}
    for key, adapter in adapters.items():
        if adapter.name == "lora":
            up, down, alpha, mid = adapter.weights[:4]
            patches[key] = ("lora", (up, down, alpha, mid))
        else:  # without the DoRA scale
            patches[key] = (adapter.name, adapter.weights[:-1])
    return patches, rest
