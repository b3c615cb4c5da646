"""``UnetPatcher``: a ModelPatcher around a KModel with Neo's extra model options."""

from __future__ import annotations

from .base import ModelPatcher


class UnetPatcher(ModelPatcher):
    def __init__(self, model):
        super().__init__(model)
        self.controlnet_linked_list = None  # Neo's ControlNet units hang here (sd_forge_controlnet)
        self.extra_concat_condition = None

    def add_conditioning_modifier(self, modifier, ensure_uniqueness: bool = False) -> None:
        self.append_model_option("conditioning_modifiers", modifier, ensure_uniqueness)

    def calculate_weight(self, patches, weight, key):
        """Forge Classic's merge (the old ComfyUI model patcher method): entries ``(strength, patch,
        strength_model)`` with tuple patches, added into ``weight``."""
        from .lora import merge_lora_to_weight

        for strength, patch, strength_model in patches:
            weight = merge_lora_to_weight([[strength, patch, strength_model, None, None]], weight, key,
                                          computation_dtype=weight.dtype)
        return weight
