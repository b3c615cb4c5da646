"""Cross-attention map capture (docs/algorithm.md, section 3).

Hooks sit on chosen cross-attention module instances (ldm and sgm ``CrossAttention``:
``to_q``, ``to_k``, ``heads``, ``scale``). The layer's output is whatever its own,
possibly optimised, forward computes: we only observe. Forward hooks on ``to_q`` and
``to_k`` record the projections the layer really used (LoRA routing included);
when the layer finishes and its query count is the H/32 token count, we compute
explicit fp32 softmax probabilities for the selected rows, keep the selected token
columns, average heads, and accumulate over layers.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn


class StopForward(Exception):
    """Raised after the last layer whose maps are needed, to cut a gradient pass short."""


def cross_attention_modules(root: nn.Module) -> dict[str, nn.Module]:
    """Every cross-attention (``attn2``) module of a UNet, by qualified name, in execution order."""
    return {
        name: m
        for name, m in root.named_modules()
        if name.endswith("attn2") and all(hasattr(m, a) for a in ("to_q", "to_k", "heads"))
    }


def map_size(latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Spatial size of the H/32 layers for a latent of (h, w) = (H/8, W/8): two stride-2 convs."""
    h, w = latent_hw
    return math.ceil(math.ceil(h / 2) / 2), math.ceil(math.ceil(w / 2) / 2)


@dataclass
class CaptureRequest:
    """Which maps to keep: map p is column ``cols[p]`` of batch row ``rows[p]``."""

    rows: torch.Tensor  # (P,) long
    cols: torch.Tensor  # (P,) long
    map_hw: tuple[int, int]
    grad: bool = False
    stop_early: bool = False
    down_only: bool = False  # only the down path's H/32 layers (``input_blocks``); stops after the last of them


def is_down_layer(name: str) -> bool:
    """An attention layer of the UNet's down path (ldm/sgm ``input_blocks``)."""
    return name.startswith("input_blocks.")


class AttentionCapture:
    """Accumulates head- and layer-averaged maps of selected (row, token) pairs."""

    def __init__(self, modules: dict[str, nn.Module]):
        self._modules = modules
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._request: CaptureRequest | None = None
        self._projections: dict[str, dict[str, torch.Tensor]] = {}
        self._sum: torch.Tensor | None = None
        self.layers: list[str] = []  # layers that contributed in the current pass
        self.known_layers: list[str] | None = None  # H/32 layers seen by the last complete pass

    # -- install / remove -------------------------------------------------------------
    def install(self) -> None:
        if self._handles:
            return
        for name, module in self._modules.items():
            for proj in ("to_q", "to_k"):
                self._handles.append(getattr(module, proj).register_forward_hook(self._projection_hook(name, proj)))
            self._handles.append(module.register_forward_hook(self._attention_hook(name)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._request = None
        self._projections.clear()
        self._sum = None

    @contextlib.contextmanager
    def installed(self) -> Iterator["AttentionCapture"]:
        self.install()
        try:
            yield self
        finally:
            self.remove()

    # -- one model pass ---------------------------------------------------------------
    @contextlib.contextmanager
    def capturing(self, request: CaptureRequest) -> Iterator["AttentionCapture"]:
        """Capture during one forward pass. A StopForward raised by an early stop is swallowed."""
        self._request = request
        self._sum = None
        self.layers = []
        try:
            yield self
        except StopForward:
            pass
        else:  # the pass ran to the end: it saw every H/32 layer
            self.known_layers = list(self.layers)
        finally:
            self._request = None
            self._projections.clear()

    def maps(self) -> torch.Tensor:
        """Captured maps (P, h, w), row-major, averaged over heads and layers; taken once per pass (the
        capture lets go of them, so that a gradient pass's graph does not outlive the pass)."""
        if self._sum is None or not self.layers:
            raise RuntimeError(
                "no cross-attention layer of the expected size ran; is the latent size consistent with the model?"
            )
        h, w = self._last_hw
        total, self._sum = self._sum, None
        return (total / len(self.layers)).reshape(-1, h, w)

    # -- hooks --------------------------------------------------------------------------
    def _projection_hook(self, name: str, proj: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self._request is not None:
                self._projections.setdefault(name, {})[proj] = output

        return hook

    def _attention_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            request = self._request
            if request is None:
                return
            projections = self._projections.pop(name, {})
            h, w = request.map_hw
            if "to_q" not in projections or projections["to_q"].shape[1] != h * w:
                return
            if request.down_only and not is_down_layer(name):
                if request.stop_early and self.layers:  # the down path's maps are complete
                    raise StopForward
                return
            if "to_k" not in projections:
                raise RuntimeError(f"{name}: the attention forward did not call to_k; cannot capture its maps")
            with torch.set_grad_enabled(request.grad):
                probs = self._selected_probabilities(module, projections["to_q"], projections["to_k"], request)
            self._sum = probs if self._sum is None else self._sum + probs
            self._last_hw = (h, w)
            self.layers.append(name)
            known = [n for n in self.known_layers or [] if not request.down_only or is_down_layer(n)]
            if request.stop_early and known and name == known[-1]:
                raise StopForward

        return hook

    @staticmethod
    def _selected_probabilities(
        module: nn.Module, q: torch.Tensor, k: torch.Tensor, request: CaptureRequest
    ) -> torch.Tensor:
        """(P, N): head-averaged softmax(q k^T * scale) of the requested (row, column) pairs, in fp32."""
        rows, inverse = torch.unique(request.rows.to(q.device), return_inverse=True)
        heads = module.heads
        q = q.index_select(0, rows).float()
        k = k.index_select(0, rows).float()
        r, n, inner = q.shape
        d = inner // heads
        scale = getattr(module, "scale", d**-0.5)
        q = q.reshape(r, n, heads, d).transpose(1, 2)
        k = k.reshape(r, k.shape[1], heads, d).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1).mean(dim=1)  # (r, N, M)
        return probs[inverse, :, request.cols.to(q.device)]  # (P, N)
