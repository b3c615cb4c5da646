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
