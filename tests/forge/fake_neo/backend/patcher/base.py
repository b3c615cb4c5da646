"""``ModelPatcher`` as the glue relies on it (written for these tests).

- ``clone()`` shares the model and copies the patch lists, and **deep-copies**
  ``model_options`` (what Neo does: a bound method stored there drags its object along);
- ``add_patches(patches, strength_patch, ..., filename=..., online_mode=...)`` records
  weight patches {state-dict key: adapter}; they are merged into the weights only while
  the patcher is in use (``patched()``), and taken out again after it.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch


class ModelPatcher:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.patches: dict[str, list[tuple[float, Any, float]]] = {}
        self.model_options: dict[str, Any] = {"transformer_options": {}}
        self.parent: "ModelPatcher | None" = None

    def clone(self) -> "ModelPatcher":
        n = self.__class__.__new__(self.__class__)
        n.__dict__.update(self.__dict__)
        n.patches = {k: list(v) for k, v in self.patches.items()}
        n.model_options = copy.deepcopy(self.model_options)
        n.parent = self
        return n

    def is_clone(self, other: "ModelPatcher") -> bool:
        return other.model is self.model

    def add_patches(self, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0, *,
                    filename: str | None = None, online_mode: bool | None = None) -> list[str]:
        state = self.model.state_dict()
        added = []
        for key, adapter in patches.items():
            if key in state:
                self.patches.setdefault(key, []).append((strength_patch, adapter, strength_model))
                added.append(key)
        return added

    def set_model_unet_function_wrapper(self, unet_wrapper_function) -> None:
        self.model_options["model_function_wrapper"] = unet_wrapper_function

    def append_model_option(self, name: str, value: Any, ensure_uniqueness: bool = False) -> None:
        entries = self.model_options.setdefault(name, [])
        if ensure_uniqueness and value in entries:
            return
        entries.append(value)

    @contextlib.contextmanager
    def patched(self):
        """The patches merged into the model's weights (inference tensors, changed in place under
        inference mode as Neo's loader does), restored afterwards."""
        saved = []
        params = dict(self.model.named_parameters())
        with torch.inference_mode():
            for key, entries in self.patches.items():
                weight = params[key]
                saved.append((weight, weight.clone()))
                for strength, adapter, strength_model in entries:
                    if isinstance(adapter, tuple):  # Forge 2.x's reader
                        from .lora import merge_lora_to_weight

                        merged = merge_lora_to_weight([[strength, adapter, strength_model, None, None]], weight, key)
                        weight.copy_(merged.to(weight.dtype))
                        continue
                    weight.copy_(adapter.calculate_weight(weight.clone(), key, strength, strength_model, None,
                                                          lambda a: a))
        try:
            yield
        finally:
            with torch.inference_mode():
                for weight, original in reversed(saved):
                    weight.copy_(original)
