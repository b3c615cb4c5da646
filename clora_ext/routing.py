"""Per-row LoRA routing (docs/algorithm.md, section 6).

All prompt variants run in one batch; each batch row gets the deltas of its own
LoRAs only. A forward hook on every targeted Linear/Conv2d adds, for each route,
``delta(x[rows])`` to ``out[rows]``. Plain LoRA/LoCon deltas go through their low-rank
factors (cheap), LoHa as an exact low-rank delta, LoKr through its Kronecker factors;
any other format is a weight delta built per routed pass.
Weights are never written: removing the hooks leaves the model exactly as it was.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def _conv_args(module: nn.Module) -> dict:
    return {"stride": module.stride, "padding": module.padding, "dilation": module.dilation, "groups": module.groups}


def routable(module: nn.Module) -> bool:
    """A layer a delta can be routed through: a Conv2d, or a Linear (torch's, or a host's own
    Linear class with a 2-D weight, as the Forge backends have, which does not subclass torch's)."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and not isinstance(module, nn.Embedding)


class Delta(Protocol):
    """One layer's weight change from a LoRA, at multiplier 1: applied to the routed rows' input
    (``apply``), never merged into the weight. Each LoRA format's form lives in ``formats``."""

    # built when a pass sets its routes and dropped with them (a weight-sized tensor), not kept on the device
    built_per_pass: bool

    def to(self, device: torch.device, dtype: torch.dtype) -> "Delta":
        """The form a pass routes, on ``device`` in ``dtype``."""

    def cached(self) -> "Delta":
        """The form a LoRA cache keeps between generations (on the CPU, in the file's dtype)."""

    def apply(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The delta's output for ``module``'s input rows ``x``."""

    def dense(self, weight_shape: torch.Size) -> torch.Tensor:
        """The full weight delta (float32), shaped like the module's weight."""


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

    @property
    def dtype(self) -> torch.dtype:
        return self.down.dtype

    built_per_pass = False

    def to(self, device: torch.device, dtype: torch.dtype) -> "LowRankDelta":
        mid = None if self.mid is None else self.mid.to(device, dtype)
        return LowRankDelta(self.down.to(device, dtype), self.up.to(device, dtype), self.scale, mid)

    def cached(self) -> "LowRankDelta":
        return self.to(torch.device("cpu"), self.dtype)

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

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    built_per_pass = False

    def to(self, device: torch.device, dtype: torch.dtype) -> "DenseDelta":
        bias = None if self.bias is None else self.bias.to(device, dtype)
        return DenseDelta(self.weight.to(device, dtype), bias)

    def cached(self) -> "DenseDelta":
        return self.to(torch.device("cpu"), self.dtype)

    def apply(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.reshape(module.weight.shape)
        if isinstance(module, nn.Conv2d):
            return F.conv2d(x, weight, self.bias, **_conv_args(module))
        return F.linear(x, weight, self.bias)

    def dense(self, weight_shape: torch.Size) -> torch.Tensor:
        return self.weight.float().reshape(weight_shape)


@dataclass
class KroneckerDelta:
    """W' = W + scale * kron(a, b) (LoKr), applied without building the weight-sized product.

    a (o1, i1); b (o2, i2) for a Linear, (o2, i2, kh, kw) for a Conv2d (the kernel is b's). The
    module is (o1*o2) x (i1*i2) [x kh x kw], row-major: input channel i1*I2 + i2, output o1*O2 + o2.
    A conv runs b over each of the i1 channel groups, then mixes the groups with a.
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float = 1.0

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    built_per_pass = False

    def to(self, device: torch.device, dtype: torch.dtype) -> "KroneckerDelta":
        return KroneckerDelta(self.a.to(device, dtype), self.b.to(device, dtype), self.scale)

    def cached(self) -> "KroneckerDelta":
        return self.to(torch.device("cpu"), self.dtype)

    def apply(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        (o1, i1), o2, i2 = self.a.shape, self.b.shape[0], self.b.shape[1]
        if isinstance(module, nn.Conv2d):
            n = x.shape[0]
            h = F.conv2d(x.reshape(n * i1, i2, *x.shape[2:]), self.b, **_conv_args(module))
            h = torch.einsum("nijhw,oi->nojhw", h.reshape(n, i1, o2, *h.shape[2:]), self.a)
            return h.reshape(n, o1 * o2, *h.shape[3:]) * self.scale
        y = torch.einsum("...jk,oj,pk->...op", x.reshape(*x.shape[:-1], i1, i2), self.a, self.b)
        return y.reshape(*x.shape[:-1], o1 * o2) * self.scale

    def dense(self, weight_shape: torch.Size) -> torch.Tensor:
        a = self.a.float()
        if self.b.dim() == 4:
            a = a[:, :, None, None]
        return (torch.kron(a, self.b.float()) * self.scale).reshape(weight_shape)


@dataclass
class LazyDelta:
    """A delta that only exists as a way to build it (``build() -> (weight delta, bias delta or None)``).

    For formats without a cheap factored form: the weight-sized tensor is built when a
    route is set up (``to``), in the model's dtype and on its device, and freed with the
    routes at the end of that pass, instead of being kept for the whole run.
    """

    build: Callable[[], tuple[torch.Tensor, torch.Tensor | None]]
    built_per_pass = True

    def to(self, device: torch.device, dtype: torch.dtype) -> DenseDelta:
        weight, bias = self.build()
        return DenseDelta(weight.to(device, dtype), None if bias is None else bias.to(device, dtype))

    def cached(self) -> "LazyDelta":
        return self  # a way to build it: the host's objects behind it stay where they are

    def apply(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.to(x.device, x.dtype).apply(module, x)

    def dense(self, weight_shape: torch.Size) -> torch.Tensor:
        return self.build()[0].float().reshape(weight_shape)


@dataclass
class HadamardDelta:
    """LoHa's factors as the file holds them; routed as the exact low-rank delta they make
    (``hadamard_as_low_rank``), built when a route is set up (``to``) so that only the small
    factors are kept between passes."""

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    scale: float
    weight_shape: tuple[int, ...]
    built_per_pass = False

    def low_rank(self, device: torch.device | None = None) -> "LowRankDelta":
        factors = [w.to(device).float() for w in (self.w1a, self.w1b, self.w2a, self.w2b)]
        return hadamard_as_low_rank(*factors, self.scale, self.weight_shape)

    def to(self, device: torch.device, dtype: torch.dtype) -> "LowRankDelta":
        return self.low_rank(device).to(device, dtype)

    def cached(self) -> "HadamardDelta":
        return self  # the file's small factors (the host's own tensors, on the CPU already)

    def apply(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.to(x.device, x.dtype).apply(module, x)

    def dense(self, weight_shape: torch.Size) -> torch.Tensor:
        return self.low_rank().dense(weight_shape)


def hadamard_as_low_rank(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
                         scale: float, weight_shape: Sequence[int]) -> LowRankDelta:
    """LoHa's (w1a @ w1b) * (w2a @ w2b) exactly, as one low-rank delta of rank r1 * r2.

    Entry (o, i) of the Hadamard product is sum over (j, k) of (w1a[o, j] w2a[o, k]) (w1b[j, i] w2b[k, i]):
    up[o, (j, k)] = w1a[o, j] w2a[o, k], down[(j, k), i] = w1b[j, i] w2b[k, i] (face-splitting products).
    A conv's ``*_b`` factors flatten (in, kh, kw); down gets the kernel back.
    """
    r1, r2 = w1a.shape[1], w2a.shape[1]
    up = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], r1 * r2)
    down = (w1b.flatten(1)[:, None, :] * w2b.flatten(1)[None, :, :]).reshape(r1 * r2, -1)
    if len(weight_shape) == 4:
        down = down.reshape(r1 * r2, *weight_shape[1:])
        up = up[:, :, None, None]
    return LowRankDelta(down=down, up=up, scale=scale)


def on_device(deltas: dict[str, Delta], device: torch.device, dtype: torch.dtype) -> dict[str, Delta]:
    """Device copies of cached deltas, in the model's dtype (LoHa's low-rank form is built here; a
    LazyDelta stays lazy: the router builds it per pass)."""
    return {k: d if d.built_per_pass else d.to(device, dtype) for k, d in deltas.items()}


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

    def built(self, deltas: Mapping[str, Delta]) -> dict[str, Delta]:
        """``deltas`` with every LazyDelta built now, on its module's device and in its dtype (the
        others as they are): for a pass in which a host's merge must not run, such as a torch.func
        transform (a host's in-place merge fails inside ``functionalize``)."""
        out: dict[str, Delta] = {}
        for name, delta in deltas.items():
            module = self._modules.get(name)
            if delta.built_per_pass and module is not None and routable(module):
                delta = delta.to(module.weight.device, module.weight.dtype)
            out[name] = delta
        return out

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
                if module is None or not routable(module):
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
                if delta.built_per_pass:
                    delta = delta.to(module.weight.device, torch.float32)
                backups[name] = (module.weight.detach().clone(), None if module.bias is None else module.bias.detach().clone())
                module.weight += (multiplier * delta.dense(module.weight.shape)).to(module.weight.dtype)
                bias = getattr(delta, "bias", None)  # a dense delta's bias term
                if bias is not None and module.bias is not None:
                    module.bias += (multiplier * bias).to(module.bias.dtype)
        yield
    finally:
        with torch.no_grad():
            for name, (weight, bias) in backups.items():
                modules[name].weight.copy_(weight)
                if bias is not None:
                    modules[name].bias.copy_(bias)
