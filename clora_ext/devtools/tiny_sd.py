"""Tiny, seeded, offline stand-ins for the Stable Diffusion parts CLoRA touches.

Development only: imported by tests, the demo and the benchmark, never by the
A1111 glue. Nothing here downloads anything; every weight is random.

* :func:`build_tiny_unet` -- an ``ldm`` ``UNetModel`` (the same classes A1111
  runs for SD1.x/2.x) with SD1.5's or SDXL's block/attention layout, tiny widths.
* :func:`build_tiny_text_encoder` -- a transformers ``CLIPTextModel``, tiny widths.
* :func:`clip_bpe` -- the real CLIP BPE tokenizer (openai-clip's vocab).
* :func:`encode_text` / :func:`encode_text_batch` -- A1111-style chunked encoding.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import sys
from types import ModuleType
from typing import Any

import torch
from torch import nn

__all__ = [
    "BOS",
    "EOS",
    "CHUNK_LEN",
    "tiny_unet_config",
    "tiny_text_config",
    "build_tiny_unet",
    "build_tiny_text_encoder",
    "clip_bpe",
    "encode_text",
    "encode_text_batch",
]

#: CLIP's start/end-of-text ids (A1111 pads SD1.x prompts with EOS).
BOS: int = 49406
EOS: int = 49407
#: Token ids per text-encoder chunk (75 prompt tokens + BOS + EOS).
CHUNK_LEN: int = 77

_LAYOUTS = ("sd15", "sdxl", "sd15-full")

#: Context width each layout uses when ``context_dim`` is not given.
DEFAULT_CONTEXT_DIM = {"sd15": 32, "sdxl": 32, "sd15-full": 768}


def tiny_unet_config(layout: str = "sd15", context_dim: int | None = None) -> dict[str, Any]:
    """Return the ``UNetModel`` keyword arguments used by :func:`build_tiny_unet`.

    ``sd15``: SD1.5's layout (attention at ds 1, 2, 4; 4 levels; depth 1).
    ``sdxl``: SDXL's layout (3 levels; attention only at ds 2 and 4;
    linear proj_in/proj_out; depth 2 standing in for SDXL's 2/10).
    ``sd15-full``: SD1.5's real UNet config (v1-inference.yaml: 320 channels,
    8 heads, context 768; ~860M parameters, 3.4 GB in fp32), random weights.
    For benchmarks; far too slow for unit tests.
    """
    if context_dim is None:
        context_dim = DEFAULT_CONTEXT_DIM.get(layout, 32)
    if layout in ("sd15", "sd15-full"):
        full = layout == "sd15-full"  # the real SD1.5 widths (v1-inference.yaml)
        return dict(
            image_size=32,
            in_channels=4,
            out_channels=4,
            model_channels=320 if full else 32,
            attention_resolutions=[4, 2, 1],
            num_res_blocks=2,
            channel_mult=[1, 2, 4, 4],
            num_heads=8 if full else 2,
            use_spatial_transformer=True,
            transformer_depth=1,
            context_dim=context_dim,
            use_checkpoint=True,  # as in the real SD config; the core must cope
            legacy=False,
        )
    if layout == "sdxl":
        depth = 2
        return dict(
            image_size=32,
            in_channels=4,
            out_channels=4,
            model_channels=32,
            attention_resolutions=[4, 2],
            num_res_blocks=2,
            channel_mult=[1, 2, 4],
            # SDXL fixes the head width (64) and lets the head count grow with
            # the width: here 32 -> 2 heads at ds 2 (64 ch), 4 heads at ds 4.
            num_heads=-1,
            num_head_channels=32,
            use_spatial_transformer=True,
            # This ldm's UNetModel only takes an int depth (SDXL has [0, 2, 10]).
            transformer_depth=depth,
            # This ldm's SpatialTransformer indexes context_dim per block, so a
            # depth > 1 needs one entry per block.
            context_dim=[context_dim] * depth,
            use_linear_in_transformer=True,
            use_checkpoint=True,
            legacy=False,
            # No vector conditioning: this ldm (stable-diffusion-sdkit 2.1.5)
            # supports num_classes=int or "continuous" only, not SDXL's
            # "sequential" + adm_in_channels, so SDXL's `y` input is skipped.
        )
    raise ValueError(f"unknown layout {layout!r}; expected one of {_LAYOUTS}")


# Set lazily (ldm is imported inside the builder); module-global so that
# deepcopy/pickle of a built sdxl UNet can find the class.
BroadcastContextSpatialTransformer: type | None = None


def _broadcast_context_cls() -> type:
    """A ``SpatialTransformer`` that feeds one context tensor to every block.

    The ldm SpatialTransformer wraps a tensor context into a 1-element list
    and then indexes it per transformer block, so depth > 1 fails with a plain
    tensor. SDXL's sgm code reuses context[0] for every block; do the same.
    """
    global BroadcastContextSpatialTransformer
    if BroadcastContextSpatialTransformer is None:
        from ldm.modules.attention import SpatialTransformer

        class _Cls(SpatialTransformer):
            def forward(self, x, context=None):  # type: ignore[override]
                if not isinstance(context, list):
                    context = [context] * len(self.transformer_blocks)
                return super().forward(x, context)

        _Cls.__name__ = _Cls.__qualname__ = "BroadcastContextSpatialTransformer"
        _Cls.__module__ = __name__
        BroadcastContextSpatialTransformer = _Cls
    return BroadcastContextSpatialTransformer


@torch.no_grad()
def _reinit_(model: nn.Module, seed: int) -> None:
    """Deterministically re-initialise every parameter of ``model`` from ``seed``.

    ldm zero-initialises output layers (``zero_module``); random non-zero
    weights everywhere keep every path alive. Weights: normal, std
    1/sqrt(fan_in); biases: normal, std 0.02; norm scales 1 + N(0, 0.1^2),
    norm shifts N(0, 0.1^2).
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    norm_types = (nn.GroupNorm, nn.LayerNorm)
    for module in model.modules():
        is_norm = isinstance(module, norm_types)
        for pname, p in module.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if is_norm:
                value = 1.0 + 0.1 * noise if pname == "weight" else 0.1 * noise
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                value = noise / math.sqrt(fan_in)
            else:
                value = 0.02 * noise
            p.copy_(value.to(dtype=p.dtype, device=p.device))


def build_tiny_unet(layout: str = "sd15", seed: int = 0, context_dim: int | None = None,
                    adm_in_channels: int | None = None) -> nn.Module:
    """Build a tiny, seeded ``ldm`` ``UNetModel`` (fp32, eval mode, CPU).

    ``layout`` is ``"sd15"``, ``"sdxl"`` or ``"sd15-full"`` (see
    :func:`tiny_unet_config`); ``context_dim`` defaults to 32 for the tiny
    layouts and 768 for ``sd15-full``.
    Call it as ``unet(x, timesteps, context=ctx)`` with ``x`` of shape
    (B, 4, H, W) (H, W multiples of 8 for sd15, of 4 for sdxl), ``timesteps``
    of shape (B,) and ``ctx`` of shape (B, T, context_dim).
    ``adm_in_channels`` (sdxl only) gives it SDXL's vector input: call it with
    ``y`` of shape (B, adm_in_channels) too, which SDXL's ``label_emb``
    (Linear, SiLU, Linear, at ``label_emb.0.0`` and ``label_emb.0.2``) adds to
    the timestep embedding.
    Cross-attention modules are ``ldm.modules.attention.CrossAttention`` at
    ``*.transformer_blocks.N.attn2``. Parameters keep ``requires_grad=True``
    as A1111's model does.
    """
    config = tiny_unet_config(layout, context_dim)
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    if adm_in_channels is not None:
        if layout != "sdxl":
            raise ValueError("adm_in_channels is SDXL's vector input; use layout 'sdxl'")
        # this ldm knows no "sequential" vector input: build "continuous" (y added to the timestep
        # embedding through label_emb) and give label_emb SDXL's form
        config["num_classes"] = "continuous"
    unet = UNetModel(**config)
    if adm_in_channels is not None:
        width = unet.time_embed[0].out_features
        unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, width), nn.SiLU(), nn.Linear(width, width)))
    if layout == "sdxl":
        cls = _broadcast_context_cls()
        for module in unet.modules():
            if type(module) is SpatialTransformer:
                module.__class__ = cls
    _reinit_(unet, seed)
    return unet.float().eval()


def tiny_text_config(hidden: int = 32) -> dict[str, Any]:
    """``CLIPTextConfig`` keywords of a small CLIP text encoder: CLIP's vocabulary and 77 positions, 2 layers."""
    return dict(
        vocab_size=49408,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=4 * hidden,
        max_position_embeddings=CHUNK_LEN,
        hidden_act="quick_gelu",
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )


def build_tiny_text_encoder(seed: int = 0, hidden: int = 32) -> nn.Module:
    """Build a tiny, seeded transformers ``CLIPTextModel`` (fp32, eval mode).

    CLIP's real vocabulary (49408 ids) and 77 positions, so ids from
    :func:`clip_bpe` can be fed directly. Nothing is downloaded.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = CLIPTextModel(CLIPTextConfig(**tiny_text_config(hidden)))
    return model.float().eval()


@functools.lru_cache(maxsize=None)
def _simple_tokenizer_module() -> ModuleType:
    """Load openai-clip's ``clip/simple_tokenizer.py`` without ``clip/__init__``.

    The package ``__init__`` imports torchvision and pkg_resources, which are
    deliberately not installed; the tokenizer module needs neither.
    """
    spec = importlib.util.find_spec("clip")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = next(
        (os.path.join(d, "simple_tokenizer.py") for d in locations
         if os.path.isfile(os.path.join(d, "simple_tokenizer.py"))),
        None,
    )
    if path is None:
        raise ImportError(
            "openai-clip is not installed (pip install --no-deps openai-clip==1.0.1)"
        )
    name = "_clora_devtools_clip_simple_tokenizer"
    mod_spec = importlib.util.spec_from_file_location(name, path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    mod_spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def clip_bpe() -> Any:
    """Return (cached) openai-clip's ``SimpleTokenizer``: CLIP's BPE, no BOS/EOS.

    ``clip_bpe().encode('a photo of a cat') == [320, 1125, 539, 320, 2368]``.
    """
    return _simple_tokenizer_module().SimpleTokenizer()


def _check_chunk(chunk: list[int], where: str) -> None:
    if len(chunk) != CHUNK_LEN:
        raise ValueError(f"{where}: chunk has {len(chunk)} ids, expected {CHUNK_LEN}")


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def encode_text(text_encoder: nn.Module, chunks: list[list[int]]) -> torch.Tensor:
    """Encode a prompt given as 77-id chunks -> (1, 77 * n_chunks, hidden).

    The chunks run as one (n_chunks, 77) batch; their ``last_hidden_state``
    rows are concatenated along the token axis, as A1111 does for long
    prompts. Runs under ``torch.no_grad()`` (conditioning is a constant).
    """
    if not chunks:
        raise ValueError("encode_text: need at least one chunk")
    for i, chunk in enumerate(chunks):
        _check_chunk(chunk, f"encode_text chunk {i}")
    ids = torch.tensor(chunks, dtype=torch.long, device=_device_of(text_encoder))
    with torch.no_grad():
        hidden = text_encoder(input_ids=ids).last_hidden_state  # (n, 77, h)
    return hidden.reshape(1, -1, hidden.shape[-1])


def encode_text_batch(
    text_encoder: nn.Module, batch_chunks: list[list[list[int]]]
) -> torch.Tensor:
    """Encode B prompts, each as n 77-id chunks -> (B, 77 * n, hidden).

    Every prompt must have the same chunk count. One batched encoder call per
    chunk index (rows in batch order), so row b of the result is prompt b.
    Runs under ``torch.no_grad()``.
    """
    if not batch_chunks:
        raise ValueError("encode_text_batch: empty batch")
    counts = {len(row) for row in batch_chunks}
    if len(counts) != 1:
        raise ValueError(
            f"encode_text_batch: all prompts need the same chunk count, got {sorted(counts)}"
        )
    n_chunks = counts.pop()
    if n_chunks == 0:
        raise ValueError("encode_text_batch: need at least one chunk per prompt")
    for b, row in enumerate(batch_chunks):
        for i, chunk in enumerate(row):
            _check_chunk(chunk, f"encode_text_batch row {b} chunk {i}")
    device = _device_of(text_encoder)
    outs = []
    with torch.no_grad():
        for k in range(n_chunks):
            ids = torch.tensor([row[k] for row in batch_chunks], dtype=torch.long, device=device)
            outs.append(text_encoder(input_ids=ids).last_hidden_state)  # (B, 77, h)
    return torch.cat(outs, dim=1)
