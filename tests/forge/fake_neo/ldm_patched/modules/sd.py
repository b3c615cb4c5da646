"""reForge's CLIP patcher: the fake Neo's, with ComfyUI's ``add_patches(patches, strength_patch,
strength_model)`` (no file name, no online mode)."""

from __future__ import annotations

from backend.patcher.clip import CLIP as NeoCLIP


class CLIP(NeoCLIP):
    def clone(self) -> "CLIP":
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        return n

    def add_patches(self, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)
