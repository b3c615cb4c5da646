"""The miniature world's text-to-image model: an ``ldm`` UNet and a CLIP text encoder, small.

The UNet keeps SD1.5's block layout where CLoRA looks: four levels, two res blocks
each, so that ``input_blocks`` 7, 8 and ``output_blocks`` 3, 4, 5 hold the H/32
cross-attention (8x8 for the 32x32 latent). To train on a CPU, attention lives only
there (and in the middle block); the widths are small. The text encoder is a
transformers ``CLIPTextModel`` over CLIP's real BPE vocabulary, trained with the UNet.

One hyper-parameter follows SD's proportions rather than its number: ldm normalises in
32 groups, which at SD's widths (320+) puts 10 or more channels in a group; at these
widths 32 groups would normalise every channel on its own, which removes each
channel's spatial mean right before the output convolution. Such a model cannot move
an image's colour away from the mean of its starting noise (a first run showed the
background and object colours following the seed). Here a group keeps 8 channels.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clora_ext.devtools.pipeline import TinySD
from clora_ext.devtools.tiny_sd import tiny_text_config

from .worlds import DEFAULT, World

WEIGHTS_DIR = DEFAULT.weights_dir  # world 1's; other worlds keep theirs in a folder below it
MANIFEST = DEFAULT.manifest

TEXT_WIDTH = 64

UNET_CONFIG: dict[str, Any] = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[4],  # ds 4 = H/32 of the image: input_blocks 7, 8, output_blocks 3, 4, 5
    num_res_blocks=2,
    channel_mult=[1, 1, 2, 2],
    num_heads=2,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=TEXT_WIDTH,
    legacy=False,
)

TEXT_CONFIG: dict[str, Any] = tiny_text_config(TEXT_WIDTH)


CHANNELS_PER_GROUP = 8


def build_unet(use_checkpoint: bool = True) -> nn.Module:
    """The UNet with its default (ldm) initialisation. ``use_checkpoint`` as SD's configs set it."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**UNET_CONFIG, use_checkpoint=use_checkpoint)
    for module in unet.modules():
        if isinstance(module, nn.GroupNorm):  # ldm's GroupNorm32, same class, fewer groups
            module.num_groups = module.num_channels // CHANNELS_PER_GROUP
    return unet


def set_checkpointing(root: nn.Module, enabled: bool) -> None:
    """Switch ldm's gradient checkpointing (``checkpoint`` / ``use_checkpoint`` flags); training needs it off:
    ldm's checkpoint function cannot differentiate through frozen weights."""
    for module in root.modules():
        for attr in ("checkpoint", "use_checkpoint"):
            if isinstance(module.__dict__.get(attr), bool):
                setattr(module, attr, enabled)


def build_text_encoder() -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))


def save_model(unet: nn.Module, text_encoder: nn.Module, path: str) -> None:
    """Both networks in one safetensors file, fp16 (the CPU upcasts to fp32 on load)."""
    tensors = {f"unet.{k}": v.detach().half().contiguous() for k, v in unet.state_dict().items()}
    tensors.update({f"text.{k}": v.detach().half().contiguous() for k, v in text_encoder.state_dict().items()
                    if not k.endswith("position_ids")})
    save_file(tensors, path)


def load_model(path: str | None = None, device: str | torch.device = "cpu", world: World = DEFAULT) -> TinySD:
    """The trained model (fp32, eval mode) as the harness's ``TinySD``: ``path``, else ``world``'s base model."""
    path = path or world.base_path
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; train it with `python -m miniworld.train_base --world {world.name}`")
    tensors = load_file(path)
    unet, te = build_unet(), build_text_encoder()
    unet.load_state_dict({k[5:]: v.float() for k, v in tensors.items() if k.startswith("unet.")})
    missing, unexpected = te.load_state_dict({k[5:]: v.float() for k, v in tensors.items() if k.startswith("text.")}, strict=False)
    if unexpected or [m for m in missing if not m.endswith("position_ids")]:
        raise ValueError(f"{path}: text encoder keys do not match ({missing[:3]}, {unexpected[:3]})")
    return TinySD(unet.float().eval().to(device), te.float().eval().to(device))


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(world: World = DEFAULT) -> dict:
    with open(world.manifest) as f:
        return json.load(f)


def update_manifest(section: str, entry: dict, world: World = DEFAULT) -> None:
    """Set one section of the world's ``manifest.json`` (base, a LoRA, or figures)."""
    os.makedirs(world.weights_dir, exist_ok=True)
    # LoRAs train two at a time: a lock keeps one run's read-modify-write from dropping the other's section
    with open(os.path.join(tempfile.gettempdir(), f"miniworld-{world.name}-manifest.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = read_manifest(world) if os.path.exists(world.manifest) else {}
        data[section] = entry
        with open(world.manifest, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
