"""LoRA formats as neutral factors, and the routed delta each becomes (host-free): one module per format.

Every host glue reads a LoRA file with its host's own reader, then describes each layer's
adapter as ``Factors``: the format's name, its tensors by the names its module lists, the host's
scale (alpha over rank, as that format defines it) and whether the delta is the factors alone
(``plain``: no DoRA scale, bias or reshape term). ``routed_delta`` turns factors into the
cheapest exact delta the RowRouter applies per row, out of place and from the factors only
(so it also runs inside the functional gradient pass); ``factor_shape`` tells the layer size
the factors make, to refuse a LoRA made for another model family before sampling.

``FORMATS`` maps each format's name to its module (``lora``: kohya LoRA, LoCon and PEFT;
``loha``; ``lokr``), each with ``factor_shape(factors, weight_shape)`` and
``routed_delta(factors, weight_shape)``. Adding a format is one module here and one test, for
every host. A format without a module (CP/Tucker cores, DoRA, OFT, BOFT, GLoRA, IA3, full weights,
...) gets None from ``routed_delta``: the glue builds its dense delta with the host's own merge,
outside any functional transform.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import torch

from ..routing import Delta


@dataclass(frozen=True)
class Factors:
    kind: str
    tensors: Mapping[str, torch.Tensor | None]
    scale: float = 1.0
    plain: bool = True

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)


def kernel_size(weight_shape: Sequence[int]) -> int:
    """kh * kw of a conv's weight shape, 1 for a Linear's."""
    return int(torch.Size(weight_shape[2:]).numel()) if len(weight_shape) > 2 else 1


class Format(Protocol):
    """One LoRA format's module."""

    def factor_shape(self, f: Factors, weight_shape: Sequence[int]) -> tuple[int, int] | None:
        """(out, in) of the layer the factors are made for, or None where they do not tell without
        building the delta."""

    def routed_delta(self, f: Factors, weight_shape: Sequence[int]) -> Delta | None:
        """The cheapest exact routed form of the layer's delta at multiplier 1 (plain factors only),
        or None: build it dense."""


from . import loha, lokr, lora  # noqa: E402  (the format modules use Factors and kernel_size)

FORMATS: dict[str, Format] = {"lora": lora, "loha": loha, "lokr": lokr}
lokr_scale = lokr.scale


def factor_shape(f: Factors, weight_shape: Sequence[int]) -> tuple[int, int] | None:
    """(out, in) of the layer the factors are made for, or None where the factors do not tell
    without building the delta (a format without a module, a Tucker core)."""
    fmt = FORMATS.get(f.kind)
    return None if fmt is None else fmt.factor_shape(f, weight_shape)


def routed_delta(f: Factors, weight_shape: Sequence[int], grouped: bool = False) -> Delta | None:
    """The cheapest exact routed form of the layer's delta at multiplier 1, or None (build it dense):
    factors with bias, DoRA or reshape terms and ``grouped`` convs (which only the dense form fits)
    take the host's merge."""
    fmt = FORMATS.get(f.kind)
    if fmt is None or not f.plain or grouped:
        return None
    return fmt.routed_delta(f, weight_shape)
