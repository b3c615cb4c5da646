"""LoRA formats as neutral factors (clora_ext.formats): the layer size the factors make, and the
routed delta each becomes, equal to the merged weight delta the format defines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clora_ext.formats import Factors, factor_shape, lokr_scale, routed_delta
from clora_ext.routing import HadamardDelta, KroneckerDelta, LowRankDelta
from tolerance import close


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _apply_matches_dense(delta, shape) -> None:
    """The routed delta applied to an input equals the layer run with its dense delta as weight."""
    g = _gen(9)
    dense = delta.dense(torch.Size(shape))
    if len(shape) == 2:
        module = torch.nn.Linear(shape[1], shape[0])
        x = torch.randn(3, shape[1], generator=g)
        want = F.linear(x, dense)
    else:
        module = torch.nn.Conv2d(shape[1], shape[0], shape[2], padding=shape[2] // 2)
        x = torch.randn(2, shape[1], 7, 7, generator=g)
        want = F.conv2d(x, dense, padding=shape[2] // 2)
    routed = delta.to(torch.device("cpu"), torch.float32)
    close(routed.apply(module, x), want, 1e-5)


@pytest.mark.parametrize("shape", [(12, 20), (16, 8, 3, 3), (16, 8, 1, 1)])
def test_lokr_with_a_low_rank_w2_routes_through_its_kronecker_factors(shape):
    """LyCORIS writes a LoKr without Tucker core as a full w1 and a low-rank w2 whose ``w2_b`` is
    (rank, in2*kh*kw) for a conv; the layer is (o1*o2) x (i1*i2) x kh x kw, as the host's merge
    (kron(w1, w2_a @ w2_b) reshaped to the weight) makes it."""
    g = _gen(1)
    (o1, o2), (i1, i2) = (4, shape[0] // 4), (2, shape[1] // 2)
    kernel = int(torch.tensor(shape[2:]).prod()) if len(shape) == 4 else 1
    w1 = torch.randn(o1, i1, generator=g).half()
    w2a, w2b = torch.randn(o2, 2, generator=g).half(), torch.randn(2, i2 * kernel, generator=g).half()
    f = Factors("lokr", {"w1": w1, "w2": None, "w1a": None, "w1b": None, "w2a": w2a, "w2b": w2b, "t2": None},
                scale=lokr_scale(4.0, None, w2b))
    assert f.scale == 2.0  # alpha over w2's rank
    assert factor_shape(f, shape) == tuple(shape[:2])
    delta = routed_delta(f, shape)
    assert isinstance(delta, KroneckerDelta)
    merged = (torch.kron(w1.float(), w2a.float() @ w2b.float()) * 2.0).reshape(shape)  # the host's merge
    close(delta.dense(torch.Size(shape)), merged, 1e-3)  # half-precision factors, multiplied apart
    _apply_matches_dense(delta, shape)


def test_a_lokr_made_for_another_width_does_not_fit():
    g = _gen(2)
    f = Factors("lokr", {"w1": torch.randn(4, 2, generator=g), "w2a": torch.randn(4, 2, generator=g),
                         "w2b": torch.randn(2, 4 * 9, generator=g)})
    assert factor_shape(f, (16, 8, 3, 3)) == (16, 8)
    assert factor_shape(f, (16, 24, 3, 3)) == (16, 8) and routed_delta(f, (16, 24, 3, 3)) is None


@pytest.mark.parametrize("shape", [(24, 40), (16, 8, 3, 3)])
def test_loha_routes_as_its_exact_low_rank_product(shape):
    g = _gen(3)
    fan_in = int(torch.tensor(shape[1:]).prod())
    w1a, w1b = torch.randn(shape[0], 2, generator=g), torch.randn(2, fan_in, generator=g)
    w2a, w2b = torch.randn(shape[0], 2, generator=g), torch.randn(2, fan_in, generator=g)
    f = Factors("loha", {"w1a": w1a, "w1b": w1b, "w2a": w2a, "w2b": w2b, "t1": None, "t2": None}, scale=0.5)
    assert factor_shape(f, shape) == tuple(shape[:2])
    delta = routed_delta(f, shape)
    assert isinstance(delta, HadamardDelta)
    close(delta.dense(torch.Size(shape)), ((w1a @ w1b) * (w2a @ w2b) * 0.5).reshape(shape), 1e-5)
    _apply_matches_dense(delta, shape)


def test_locon_3x3_stays_low_rank_and_a_linear_takes_1x1_factors():
    g = _gen(4)
    down, up = torch.randn(4, 8, 3, 3, generator=g), torch.randn(16, 4, 1, 1, generator=g)
    delta = routed_delta(Factors("lora", {"up": up, "down": down, "mid": None}, scale=0.5), (16, 8, 3, 3))
    assert isinstance(delta, LowRankDelta)
    close(delta.dense(torch.Size((16, 8, 3, 3))), torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down) * 0.5, 1e-5)
    _apply_matches_dense(delta, (16, 8, 3, 3))
    linear = routed_delta(Factors("lora", {"up": up, "down": down[:, :, :1, :1], "mid": None}), (16, 8))
    assert isinstance(linear, LowRankDelta)
    _apply_matches_dense(linear, (16, 8))
    # a 3x3 down cannot serve a Linear or a 1x1 conv
    assert routed_delta(Factors("lora", {"up": up, "down": down, "mid": None}), (16, 8, 1, 1)) is None


@pytest.mark.parametrize("factors", [
    Factors("lora", {"up": torch.ones(16, 2), "down": torch.ones(2, 8), "mid": None}, plain=False),  # DoRA
    Factors("lora", {"up": torch.ones(16, 2, 1, 1), "down": torch.ones(2, 2, 1, 1), "mid": torch.ones(2, 2, 3, 3)}),
    Factors("loha", {"w1a": torch.ones(16, 2), "w1b": torch.ones(2, 8), "w2a": torch.ones(16, 2),
                     "w2b": torch.ones(2, 8), "t1": torch.ones(2, 2, 3, 3), "t2": torch.ones(2, 2, 3, 3)}),
    Factors("oft", {"blocks": torch.ones(2, 8, 8)}),
])
def test_formats_without_a_factored_form_are_left_to_the_dense_build(factors):
    assert routed_delta(factors, (16, 8, 3, 3)) is None


def test_a_grouped_conv_is_left_to_the_dense_build():
    f = Factors("lora", {"up": torch.ones(16, 2, 1, 1), "down": torch.ones(2, 8, 3, 3), "mid": None})
    assert routed_delta(f, (16, 8, 3, 3), grouped=True) is None


def test_a_format_is_one_module_in_the_registry(monkeypatch):
    """``formats.FORMATS`` maps a format's name to its module; the shared entry points dispatch there,
    and refuse non-plain factors and grouped convs before any module runs. A name without a module
    is built dense by the host (None)."""
    import types

    from clora_ext import formats
    from clora_ext.routing import DenseDelta

    assert set(formats.FORMATS) == {"lora", "loha", "lokr"}
    seen = []
    scaled = types.SimpleNamespace(
        factor_shape=lambda f, shape: tuple(f.get("w").shape[:2]),
        routed_delta=lambda f, shape: seen.append(tuple(shape)) or DenseDelta(f.get("w") * f.scale),
    )
    monkeypatch.setitem(formats.FORMATS, "scaled", scaled)
    w = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    f = Factors("scaled", {"w": w}, scale=2.0)
    assert factor_shape(f, (3, 5)) == (3, 5)
    delta = routed_delta(f, (3, 5))
    assert seen == [(3, 5)] and torch.equal(delta.weight, 2.0 * w)
    assert routed_delta(Factors("scaled", {"w": w}, plain=False), (3, 5)) is None
    assert routed_delta(f, (3, 5), grouped=True) is None and seen == [(3, 5)]
    assert routed_delta(Factors("oft", {"w": w}), (3, 5)) is None and factor_shape(Factors("oft", {}), (3, 5)) is None
