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
  ``LoHaAdapter`` and ``LoKrAdapter`` (the layouts of Neo's weight adapters); each builds its
  delta in ``calculate_weight(weight, key, strength, strength_model, offset, function)``, which
  adds it to ``weight`` in place and returns it, logging an error instead of raising, as Neo's do.
  With ``FLAVOUR = "forge2"`` (set by the tests) it returns what lllyasviel Forge 2.x's comfy
  reader returns instead: tuples ``("lora", (up, down, alpha, mid, dora_scale))`` and
  ``("loha", (w1a, w1b, alpha, w2a, w2b, t1, t2, dora_scale))``, ``("lokr", (...))``, merged by
  ``merge_lora_to_weight(patches, weight, key, computation_dtype)`` with patch entries
  ``[strength, (kind, tensors), strength_model, offset, function]``.
"""

from __future__ import annotations

import logging

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
        """As Neo's adapters do: the factors cast to ``intermediate_dtype``, the delta added to
        ``weight`` in place; an error is logged and the weight returned unchanged. (Inside
        ``torch.func.functionalize`` that add fails when the file's factors are half precision:
        "mutating a non-functional tensor with a functional tensor", as in Neo.)"""
        try:
            delta = self.diff(weight.shape, intermediate_dtype)
            weight += function(strength * delta).type(weight.dtype)
        except Exception as e:  # noqa: BLE001 - Neo's adapters log and go on
            logging.error("ERROR %s %s %s", self.name, key, e)
        return weight


class LoRAAdapter(WeightAdapterBase):
    name = "lora"

    @classmethod
    def load(cls, x: str, lora: dict, alpha, dora_scale) -> "LoRAAdapter | None":
        up, down = f"{x}.lora_up.weight", f"{x}.lora_down.weight"
        if up not in lora:
            return None
        return cls({up, down}, (lora[up], lora[down], alpha, None, dora_scale, None))

    def diff(self, shape, dtype=torch.float32) -> torch.Tensor:
        up, down, alpha, mid, dora_scale, reshape = self.weights
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        return (up.flatten(1).to(dtype) @ down.flatten(1).to(dtype)).reshape(shape) * scale


class LoHaAdapter(WeightAdapterBase):
    name = "loha"

    @classmethod
    def load(cls, x: str, lora: dict, alpha, dora_scale) -> "LoHaAdapter | None":
        names = [f"{x}.hada_w1_a", f"{x}.hada_w1_b", f"{x}.hada_w2_a", f"{x}.hada_w2_b"]
        if names[0] not in lora:
            return None
        w1a, w1b, w2a, w2b = (lora[n] for n in names)
        return cls(set(names), (w1a, w1b, alpha, w2a, w2b, None, None, dora_scale))

    def diff(self, shape, dtype=torch.float32) -> torch.Tensor:
        w1a, w1b, alpha, w2a, w2b, t1, t2, dora_scale = self.weights
        scale = alpha / w1b.shape[0] if alpha is not None else 1.0
        return ((w1a.to(dtype) @ w1b.to(dtype)) * (w2a.to(dtype) @ w2b.to(dtype))).reshape(shape) * scale


class LoKrAdapter(WeightAdapterBase):
    """LyCORIS LoKr: ``.weights = (w1, w2, alpha, w1_a, w1_b, w2_a, w2_b, t2, dora_scale)``; the delta
    is kron(w1, w2) shaped as the weight (a conv's low-rank w2 is (out2, in2*kh*kw))."""

    name = "lokr"
    NAMES = ("lokr_w1", "lokr_w2", None, "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    @classmethod
    def load(cls, x: str, lora: dict, alpha, dora_scale) -> "LoKrAdapter | None":
        keys = [None if n is None else f"{x}.{n}" for n in cls.NAMES]
        if not any(k in lora for k in keys if k is not None):
            return None
        values = [alpha if k is None else lora.get(k) for k in keys]
        return cls({k for k in keys if k in lora}, (*values, dora_scale))

    def diff(self, shape, dtype=torch.float32) -> torch.Tensor:
        w1, w2, alpha, w1a, w1b, w2a, w2b, t2, dora_scale = self.weights
        rank = None
        if w1 is None:
            rank, w1 = w1b.shape[0], w1a.to(dtype) @ w1b.to(dtype)
        if w2 is None:
            rank, w2 = w2b.shape[0], w2a.to(dtype) @ w2b.to(dtype)
        w1, w2 = w1.to(dtype), w2.to(dtype)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        scale = alpha / rank if alpha is not None and rank is not None else 1.0
        return torch.kron(w1, w2).reshape(shape) * scale


ADAPTERS = (LoRAAdapter, LoHaAdapter, LoKrAdapter)
FLAVOUR = "neo"  # or "forge2" (the form load_lora returns), "reforge", "classic" (ldm_patched.modules.lora)


def as_forge2_tuple(adapter: WeightAdapterBase) -> tuple:
    if isinstance(adapter, LoRAAdapter):
        up, down, alpha, mid, dora_scale, _ = adapter.weights
        return ("lora", (up, down, alpha, mid, dora_scale))
    return (adapter.name, adapter.weights)


_KINDS = {cls.name: cls for cls in ADAPTERS}


def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    """Forge 2.x's merge of tuple patches into (a copy of) ``weight``."""
    weight = weight.to(computation_dtype).clone()
    for strength, (kind, tensors), strength_model, offset, function in patches:
        function = function or (lambda a: a)
        if strength_model != 1.0:
            weight *= strength_model
        length = {"lora": 6, "loha": 8, "lokr": 9}[kind]
        # Forge 2.x's tuples end with the DoRA scale, Classic's stop before it
        adapter = _KINDS[kind](set(), (*tensors, None, None)[:length])
        weight += function(strength * adapter.diff(weight.shape, computation_dtype))
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
