"""Attention forwards swapped in per module INSTANCE for the benchmark, and restored afterwards.

* :func:`fast_attention` plays the host's optimised attention (A1111 replaces
  ``CrossAttention.forward`` by SDPA / xformers / sliced attention; here
  ``F.scaled_dot_product_attention``) for configurations a, c and d. CLoRA's own
  capture (``clora_ext.attention``) still computes explicit probabilities, but only
  for the selected rows of the H/32 layers.
* :func:`explicit_attention` is the reference implementation's attention: every
  self- and cross-attention layer materialises ``softmax(q k^T * scale)`` and
  multiplies it with ``v`` (diffusers' ``AttnProcessor``), and the probabilities of
  the H/32 cross-attention layers are handed to a :class:`MapRecorder` (the
  reference's attention store), inside the autograd graph.

Only instances are touched (``module.forward = ...``); no class or global is patched,
so other models in the process are unaffected.
"""

from __future__ import annotations

import contextlib
import types
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


def attention_modules(root: nn.Module) -> dict[str, nn.Module]:
    """Every ldm/sgm attention layer (``attn1`` and ``attn2``) of a UNet, by name."""
    return {
        name: m
        for name, m in root.named_modules()
        if all(hasattr(m, a) for a in ("to_q", "to_k", "to_v", "to_out", "heads"))
    }


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, inner = t.shape
    return t.reshape(b, n, heads, inner // heads).transpose(1, 2)  # (b, h, n, d)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def _qkv(self: nn.Module, x: torch.Tensor, context: torch.Tensor | None, mask) -> tuple[torch.Tensor, ...]:
    """Per-head q, k, v of a CrossAttention module (self-attention when ``context`` is None)."""
    if mask is not None:
        raise NotImplementedError("attention masks are not used by the SD UNet")
    context = x if context is None else context
    return tuple(_split_heads(proj(t), self.heads) for proj, t in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))


def _sdpa_forward(self: nn.Module, x: torch.Tensor, context: torch.Tensor | None = None, mask=None) -> torch.Tensor:
    q, k, v = _qkv(self, x, context, mask)
    out = F.scaled_dot_product_attention(q, k, v, scale=getattr(self, "scale", None))
    return self.to_out(_merge_heads(out))


class MapRecorder:
    """The reference's attention store: head-averaged cross-attention probabilities of
    the H/32 layers of one UNet call, averaged over ALL rows of the call (cond and
    uncond mixed, as the reference does) and over layers: (query tokens, context tokens).
    """

    def __init__(self, query_tokens: int):
        self.query_tokens = query_tokens
        self._sum: torch.Tensor | None = None
        self.layers = 0

    def reset(self) -> None:
        self._sum = None
        self.layers = 0

    def add(self, probs: torch.Tensor) -> None:
        """``probs`` (rows, heads, N, M) of one layer."""
        if probs.shape[2] != self.query_tokens:
            return
        m = probs.float().mean(dim=(0, 1))
        self._sum = m if self._sum is None else self._sum + m
        self.layers += 1

    def maps(self) -> torch.Tensor:
        if self._sum is None:
            raise RuntimeError("no H/32 cross-attention layer ran")
        return self._sum / self.layers


def _explicit_forward(recorder: MapRecorder | None, cross: bool) -> Callable:
    def forward(self: nn.Module, x: torch.Tensor, context: torch.Tensor | None = None, mask=None) -> torch.Tensor:
        q, k, v = _qkv(self, x, context, mask)
        scale = getattr(self, "scale", q.shape[-1] ** -0.5)
        probs = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
        if cross and recorder is not None:
            recorder.add(probs)
        return self.to_out(_merge_heads(probs.to(v.dtype) @ v))

    return forward


@contextlib.contextmanager
def _instance_forwards(modules: dict[str, nn.Module], make: Callable[[str], Callable]) -> Iterator[None]:
    saved: list[tuple[nn.Module, object]] = []
    sentinel = object()
    try:
        for name, module in modules.items():
            saved.append((module, module.__dict__.get("forward", sentinel)))
            module.forward = types.MethodType(make(name), module)
        yield
    finally:
        for module, previous in saved:
            if previous is sentinel:
                del module.forward
            else:
                module.forward = previous


def fast_attention(root: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Every attention layer of ``root`` runs SDPA for the duration of the block."""
    return _instance_forwards(attention_modules(root), lambda name: _sdpa_forward)


def explicit_attention(root: nn.Module, recorder: MapRecorder | None = None) -> contextlib.AbstractContextManager[None]:
    """Every attention layer of ``root`` runs eager softmax attention; attn2 layers feed ``recorder``."""
    return _instance_forwards(
        attention_modules(root), lambda name: _explicit_forward(recorder, name.endswith("attn2"))
    )
