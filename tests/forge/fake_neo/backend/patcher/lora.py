"""Neo's LoRA reading as the glue uses it (written for these tests): key maps from the loaded
models to file keys, and ``load_lora`` turning a file's tensors into weight adapters.

- ``model_lora_keys_unet(kmodel, key_map)``: kohya names (``lora_unet_<diffusers name>``, and
  ``lora_unet_<ldm name>`` as SDXL files name them) and plain names of the KModel's
  ``diffusion_model.*.weight`` keys;
- ``model_lora_keys_clip(cond_stage_model, key_map)``: ``lora_te_text_model_*`` names of the
  text encoders' ``clip_l.transformer.text_model.*.weight`` keys; with SDXL's clip_g there too,
  ``lora_te1_*`` (clip_l) and ``lora_te2_*`` (clip_g);
- ``load_lora(lora, to_load)`` -> ({model key: adapter}, {tensors not used}). Neo's adapters:
  ``LoRAAdapter`` (``.weights = (up, down, alpha, mid, dora_scale, reshape)``) and
  ``LoHaAdapter``; both build their delta in ``calculate_weight(weight, key, strength,
  strength_model, offset, function)``, which adds it to ``weight`` and returns it.
  With ``FLAVOUR = "forge2"`` (set by the tests) it returns what lllyasviel Forge 2.x's comfy
  reader returns instead: tuples ``("lora", (up, down, alpha, mid, dora_scale))`` and
  ``("loha", (w1a, w1b, alpha, w2a, w2b, t1, t2, dora_scale))``, merged by
  ``merge_lora_to_weight(patches, weight, key, computation_dtype)`` with patch entries
  ``[strength, (kind, tensors), strength_model, offset, function]``.
"""

from __future__ import annotations

import torch

from clora_ext.devtools.loras import kohya_te_key, kohya_unet_key

UNET_PREFIX, SUFFIX = "diffusion_model.", ".weight"


def model_lora_keys_unet(model, key_map: dict | None = None) -> dict:
    key_map = {} if key_map is None else key_map
    for key in model.state_dict():
        if not (key.startswith(UNET_PREFIX) and key.endswith(SUFFIX)):
            continue
        name = key[len(UNET_PREFIX):-len(SUFFIX)]
        key_map[key[:-len(SUFFIX)]] = key
        key_map[kohya_unet_key(name, "ldm")] = key
        try:
            key_map[kohya_unet_key(name)] = key
        except ValueError:
            pass
    return key_map


def model_lora_keys_clip(model, key_map: dict | None = None) -> dict:
    key_map = {} if key_map is None else key_map
    keys = [k for k in model.state_dict() if k.endswith(SUFFIX)]
    sdxl = any(k.startswith("clip_g.") for k in keys)
    prefixes = {"clip_l.transformer.": ["lora_te_"] + (["lora_te1_"] if sdxl else []),
                "clip_g.transformer.": ["lora_te2_"]}
    for key in keys:
        for encoder, kohya_prefixes in prefixes.items():
            if key.startswith(encoder):
                for prefix in kohya_prefixes:
                    key_map[kohya_te_key(key[len(encoder):-len(SUFFIX)], prefix)] = key
    return key_map


class WeightAdapterBase:
    def __init__(self, loaded_keys: set, weights: tuple):
        self.loaded_keys = loaded_keys
        self.weights = weights

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        delta = self.diff(weight.shape).to(intermediate_dtype)
        weight += function(strength * delta).to(weight.dtype)
        return weight


class LoRAAdapter(WeightAdapterBase):
    name = "lora"

    @classmethod
    def load(cls, x: str, lora: dict, alpha, dora_scale) -> "LoRAAdapter | None":
        up, down = f"{x}.lora_up.weight", f"{x}.lora_down.weight"
        if up not in lora:
            return None
        return cls({up, down}, (lora[up], lora[down], alpha, None, dora_scale, None))

    def diff(self, shape) -> torch.Tensor:
        up, down, alpha, mid, dora_scale, reshape = self.weights
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        return (up.flatten(1).float() @ down.flatten(1).float()).reshape(shape) * scale


class LoHaAdapter(WeightAdapterBase):
    name = "loha"

    @classmethod
    def load(cls, x: str, lora: dict, alpha, dora_scale) -> "LoHaAdapter | None":
        names = [f"{x}.hada_w1_a", f"{x}.hada_w1_b", f"{x}.hada_w2_a", f"{x}.hada_w2_b"]
        if names[0] not in lora:
            return None
        return cls(set(names), (*[lora[n] for n in names], alpha, None, None, dora_scale))

    def diff(self, shape) -> torch.Tensor:
        w1a, w1b, w2a, w2b, alpha, t1, t2, dora_scale = self.weights
        scale = alpha / w1b.shape[0] if alpha is not None else 1.0
        return ((w1a.float() @ w1b.float()) * (w2a.float() @ w2b.float())).reshape(shape) * scale


ADAPTERS = (LoRAAdapter, LoHaAdapter)
FLAVOUR = "neo"  # or "forge2" (the form load_lora returns), "reforge", "classic" (ldm_patched.modules.lora)


def as_forge2_tuple(adapter: WeightAdapterBase) -> tuple:
    if isinstance(adapter, LoRAAdapter):
        up, down, alpha, mid, dora_scale, _ = adapter.weights
        return ("lora", (up, down, alpha, mid, dora_scale))
    return ("loha", adapter.weights)


def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    """Forge 2.x's merge of tuple patches into (a copy of) ``weight``."""
    weight = weight.to(computation_dtype).clone()
    for strength, (kind, tensors), strength_model, offset, function in patches:
        function = function or (lambda a: a)
        if strength_model != 1.0:
            weight *= strength_model
        cls = LoRAAdapter if kind == "lora" else LoHaAdapter
        # Forge 2.x's tuples end with the DoRA scale, Classic's stop before it
        adapter = cls(set(), (*tensors, None, None)[:6] if kind == "lora" else (*tensors, None)[:8])
        weight += function(strength * adapter.diff(weight.shape).to(computation_dtype))
    return weight


def load_lora_objects(lora: dict, to_load: dict) -> tuple[dict, dict]:
    """({model key: adapter object}, {tensors not used})."""
    patches, loaded = {}, set()
    for x, model_key in to_load.items():
        alpha = float(lora[f"{x}.alpha"].item()) if f"{x}.alpha" in lora else None
        dora_scale = lora.get(f"{x}.dora_scale")
        for cls in ADAPTERS:
            adapter = cls.load(x, lora, alpha, dora_scale)
            if adapter is not None:
                patches[model_key] = adapter
                loaded |= adapter.loaded_keys | {f"{x}.alpha", f"{x}.dora_scale"}
                break
    return patches, {k: v for k, v in lora.items() if k not in loaded}


def load_lora(lora: dict, to_load: dict) -> tuple[dict, dict]:
    patches, rest = load_lora_objects(lora, to_load)
    if FLAVOUR == "forge2":
        patches = {key: as_forge2_tuple(adapter) for key, adapter in patches.items()}
    return patches, rest
