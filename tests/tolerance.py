"""Float comparisons that hold on any x86-64 CPU: tolerances scaled to the values compared.

Two computations of the same quantity by different paths (a batch against single rows, a fused
pass against the host's, factors against a merged weight) differ by float rounding, and Intel
and AMD kernels round differently: the difference grows with the magnitude of the values, so an
absolute tolerance that holds on one machine for values near 1 fails on another for values near
30. ``close`` bounds it relative to the largest value of the reference.
"""

from __future__ import annotations

import torch

# float32 rounding through a network of many layers, batched or not (about 250 ulps of the largest value)
NETWORK = 3e-5
# one layer, one kernel: a few ulps
LAYER = 1e-6


def scaled(expected: torch.Tensor, rel: float = NETWORK) -> dict:
    """``rtol``/``atol`` for ``torch.testing.assert_close``: ``rel`` of each value, and ``rel`` of the
    largest value of ``expected`` where the values themselves are near zero."""
    largest = float(expected.detach().abs().max()) if expected.numel() else 0.0
    return {"rtol": rel, "atol": rel * max(largest, 1e-12)}


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float = NETWORK) -> None:
    """Assert ``actual`` equals ``expected`` to within ``rel`` of the values (see ``scaled``)."""
    torch.testing.assert_close(actual, expected, **scaled(expected, rel))


def differs(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-3) -> bool:
    """Whether ``a`` and ``b`` differ by more than ``rel`` of the largest value of ``b``: a real
    change, not float rounding."""
    return float((a - b).abs().max()) > rel * float(b.detach().abs().max())
