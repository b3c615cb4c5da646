"""Per-row LoRA routing (docs/algorithm.md, section 6).

All prompt variants run in one batch; each batch row gets the deltas of its own
LoRAs only. A forward hook on every targeted Linear/Conv2d adds, for each route,
``delta(x[rows])`` to ``out[rows]``. Plain LoRA/LoCon deltas go through their low-rank
factors (cheap); any other format is applied as a materialised weight delta.
Weights are never written: removing the hooks leaves the model exactly as it was.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def _conv_args(module: nn.Module) -> dict:
    return {"stride": module.stride, "padding": module.padding, "dilation": module.dilation, "groups": module.groups}


@dataclass
class LowRankDelta:
    """W' = W + scale * up @ (mid) @ down for a Linear or Conv2d (kohya LoRA / LoCon, PEFT).

    Shapes: linear down (r, in), up (out, r); conv down (r, in, kh, kw), up (out, r, 1, 1);
    with a CP ``mid`` (r, r, kh, kw), conv down is (r, in, 1, 1) and mid carries the kernel.
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0
    mid: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def to(self, device: torch.device, dtype: torch.dtype) -> "LowRankDelta":
        mid = None if self.mid is None else self.mid.to(device, dtype)
        return LowRankDelta(self.down.to(device, dtype), self.up.to(device, dtype), self.scale, mid)

    def apply(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(module, nn.Conv2d):
            down = self.down if self.down.dim() == 4 else self.down[:, :, None, None]
            up = self.up if self.up.dim() == 4 else self.up[:, :, None, None]
            if self.mid is None:
                h = F.conv2d(x, down, **_conv_args(module))
            else:
                h = F.conv2d(x, down)
                h = F.conv2d(h, self.mid, **_conv_args(module))
            return F.conv2d(h, up) * self.scale
        down = self.down.flatten(1)
        up = self.up.flatten(1)
        return F.linear(F.linear(x, down), up) * self.scale

    def dense(self, weight_shape: torch.Size) -> torch.Tensor:
        """The full weight delta, shaped like the module's weight."""
        up = self.up.flatten(1).float()
        if self.mid is not None:
            # (out, r) x (r, r, kh, kw) x (r, in) -> (out, in, kh, kw)
            d = torch.einsum("or,rshw,si->oihw", up, self.mid.float(), self.down.flatten(1).float())
        elif len(weight_shape) == 4 and self.down.dim() == 4:
            d = torch.einsum("or,rihw->oihw", up, self.down.float())
        else:
            d = up @ self.down.flatten(1).float()
        return (d * self.scale).reshape(weight_shape)


@dataclass
class DenseDelta:
    """A materialised weight (and optional bias) delta, for LoHa, LoKr, OFT, full, ..."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def to(self, device: torch.device, dtype: torch.dtype) -> "DenseDelta":
        bias = None if self.bias is None else self.bias.to(device, dtype)
        return DenseDelta(self.weight.to(device, dtype), bias)

    def apply(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.reshape(module.weight.shape)
        if isinstance(module, nn.Conv2d):
            return F.conv2d(x, weight, self.bias, **_conv_args(module))
        return F.linear(x, weight, self.bias)

    def dense(self, weight_shape: torch.Size) -> torch.Tensor:
        return self.weight.float().reshape(weight_shape)


Delta = LowRankDelta | DenseDelta


@dataclass
class Route:
    """One LoRA on a set of batch rows: module name -> delta, times a multiplier."""

    deltas: Mapping[str, Delta]
    rows: Sequence[int]
    multiplier: float = 1.0
    name: str = ""


@dataclass
class _Target:
    module: nn.Module
    routes: list[tuple[torch.Tensor, Delta, float]] = field(default_factory=list)


class RowRouter:
    """Forward hooks that add each route's delta to its own batch rows only.

    ``batch_rows`` is the row count the routes refer to. A module that sees a
    multiple of it (e.g. attention tiled into batch rows, image-major) gets each
    row's route repeated over its tiles.
    """

    def __init__(self, root: nn.Module):
        self._root = root
        self._modules = dict(root.named_modules())
        self._targets: dict[str, _Target] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.batch_rows = 0

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def set_routes(self, routes: Sequence[Route], batch_rows: int) -> None:
        """Replace the routing table; hooks are (re)installed on exactly the modules used."""
        self.remove()
        self.batch_rows = batch_rows
        targets: dict[str, _Target] = {}
        for route in routes:
            if not route.rows or route.multiplier == 0:
                continue
            if max(route.rows) >= batch_rows or min(route.rows) < 0:
                raise ValueError(f"route {route.name!r} names rows outside 0..{batch_rows - 1}")
            rows_on: dict[torch.device, torch.Tensor] = {}  # one index tensor per device, not per module
            for name, delta in route.deltas.items():
                module = self._modules.get(name)
                if not isinstance(module, (nn.Linear, nn.Conv2d)):
                    raise KeyError(f"LoRA {route.name!r} targets {name!r}, which is not a Linear/Conv2d of this model")
                weight = module.weight
                if weight.device not in rows_on:
                    rows_on[weight.device] = torch.as_tensor(list(route.rows), dtype=torch.long, device=weight.device)
                rows = rows_on[weight.device]
                target = targets.setdefault(name, _Target(module))
                target.routes.append((rows, delta.to(weight.device, weight.dtype), route.multiplier))
        self._targets = targets
        for target in targets.values():
            self._handles.append(target.module.register_forward_hook(self._make_hook(target)))

    def _make_hook(self, target: _Target):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            tiles, rest = divmod(x.shape[0], self.batch_rows)
            if rest or tiles == 0:
                raise RuntimeError(
                    f"CLoRA routing expected a batch of {self.batch_rows} rows (or a multiple), got {x.shape[0]}"
                )
            indices, deltas = [], []
            for rows, delta, multiplier in target.routes:
                if tiles > 1:
                    rows = (rows[:, None] * tiles + torch.arange(tiles, device=rows.device)).reshape(-1)
                d = delta.apply(module, x.index_select(0, rows))
                indices.append(rows)
                deltas.append(d * multiplier if multiplier != 1 else d)
            return output.index_add(0, torch.cat(indices), torch.cat(deltas).to(output.dtype))

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._targets = {}

    @contextlib.contextmanager
    def routed(self, routes: Sequence[Route], batch_rows: int) -> Iterator["RowRouter"]:
        self.set_routes(routes, batch_rows)
        try:
            yield self
        finally:
            self.remove()


@contextlib.contextmanager
def merged(root: nn.Module, deltas: Mapping[str, Delta], multiplier: float = 1.0) -> Iterator[None]:
    """Merge deltas into the weights for the duration of the block, then restore the exact originals.

    What users do today without CLoRA; a reference for tests and the benchmark.
    """
    modules = dict(root.named_modules())
    backups: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    try:
        with torch.no_grad():
            for name, delta in deltas.items():
                module = modules[name]
                backups[name] = (module.weight.detach().clone(), None if module.bias is None else module.bias.detach().clone())
                module.weight += (multiplier * delta.dense(module.weight.shape)).to(module.weight.dtype)
                if isinstance(delta, DenseDelta) and delta.bias is not None and module.bias is not None:
                    module.bias += (multiplier * delta.bias).to(module.bias.dtype)
        yield
    finally:
        with torch.no_grad():
            for name, (weight, bias) in backups.items():
                modules[name].weight.copy_(weight)
                if bias is not None:
                    modules[name].bias.copy_(bias)
