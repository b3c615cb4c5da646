"""``backend.utils`` as the glue uses it: reading a LoRA file into a state dict."""

from __future__ import annotations

import torch
from safetensors.torch import load_file


def load_torch_file(ckpt: str, *, safe_load: bool = True, device=None, return_metadata: bool = False) -> dict:
    if not str(ckpt).lower().endswith(".safetensors"):
        raise ValueError("the fake Neo reads .safetensors only")
    return load_file(ckpt, device=str(device or torch.device("cpu")))
