"""The CLIP patcher: one text encoder shared by its clones, each clone with its own patches."""

from __future__ import annotations

from .base import ModelPatcher


class CLIP:
    def __init__(self, cond_stage_model=None, no_init: bool = False):
        if no_init:
            return
        self.cond_stage_model = cond_stage_model
        self.patcher = ModelPatcher(cond_stage_model)

    def clone(self) -> "CLIP":
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        return n

    def add_patches(self, *args, **kwargs):
        return self.patcher.add_patches(*args, **kwargs)
