"""Per-row LoRA routing against merged weights, and the LoRA file reader."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from clora_ext.devtools.loras import write_kohya_lora, write_peft_lora
from clora_ext.devtools.tiny_sd import build_tiny_unet
from clora_ext.lora_file import LoRAFileError, ldm_to_diffusers, map_lora, read_lora_file
from clora_ext.routing import DenseDelta, LowRankDelta, Route, RowRouter, merged
from tolerance import LAYER, close


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_unet, tiny_text_encoder):
    d = tmp_path_factory.mktemp("loras")
    files = {
        "kohya": write_kohya_lora(d / "kohya.safetensors", tiny_unet, tiny_text_encoder, seed=1),
        "locon": write_kohya_lora(d / "locon.safetensors", tiny_unet, tiny_text_encoder, seed=2, conv=True, alpha=8),
        "ldm_names": write_kohya_lora(d / "ldmnames.safetensors", tiny_unet, None, seed=3, unet_naming="ldm"),
        "peft": write_peft_lora(d / "peft.safetensors", tiny_unet, tiny_text_encoder, seed=4),
    }
    return {k: map_lora(read_lora_file(p), tiny_unet, tiny_text_encoder) for k, p in files.items()}


def unet_inputs(rows: int, seed: int = 0, hw=(16, 24)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, *hw, generator=gen)
    t = torch.randint(0, 1000, (rows,), generator=gen).float()
    ctx = torch.randn(rows, 77, 32, generator=gen)
    return x, t, ctx


def state_hash(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_diffusers_names_of_known_sd15_layers():
    # names as they appear in real SD1.5 kohya files and diffusers checkpoints
    known = {
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks.8.1.transformer_blocks.0.attn2.to_k": "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k",
        "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks.4.0.skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "middle_block.1.proj_in": "mid_block.attentions.0.proj_in",
        "middle_block.2.emb_layers.1": "mid_block.resnets.1.time_emb_proj",
        "output_blocks.2.1.conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
        "output_blocks.5.1.transformer_blocks.0.ff.net.2": "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2",
        "output_blocks.11.0.out_layers.3": "up_blocks.3.resnets.2.conv2",
        "time_embed.2": "time_embedding.linear_2",
        "out.2": "conv_out",
    }
    for ldm, diffusers in known.items():
        assert ldm_to_diffusers(ldm) == diffusers


def test_reader_formats(loras, tiny_unet):
    modules = dict(tiny_unet.named_modules())
    # every format maps onto the same kind of layers
    for key in ("kohya", "ldm_names", "peft"):
        assert "input_blocks.7.1.transformer_blocks.0.attn2.to_k" in loras[key].unet
    assert set(loras["kohya"].unet) == set(loras["peft"].unet) == set(loras["ldm_names"].unet)
    assert loras["kohya"].text_encoder and loras["peft"].text_encoder and not loras["ldm_names"].text_encoder
    conv_targets = [n for n in loras["locon"].unet if isinstance(modules[n], nn.Conv2d) and modules[n].kernel_size == (3, 3)]
    assert conv_targets, "LoCon file should reach 3x3 convs"
    assert loras["locon"].unet[conv_targets[0]].scale == pytest.approx(8 / 4)  # alpha / rank
    assert next(iter(loras["peft"].unet.values())).scale == 1.0


@pytest.mark.parametrize("kind", ["kohya", "locon", "peft"])
def test_routed_rows_equal_merged_weights(loras, tiny_unet, kind):
    other = "peft" if kind != "peft" else "kohya"
    la, lb = loras[kind], loras[other]
    # rows: 0 base, 1 LoRA A, 2 LoRA B (x0.7), 3 A and B, 4 base again
    routes = [
        Route(la.unet, [1, 3], 1.0, "A"),
        Route(lb.unet, [2, 3], 0.7, "B"),
    ]
    x, t, ctx = unet_inputs(5)
    before = state_hash(tiny_unet)
    with torch.no_grad():
        plain = tiny_unet(x, t, context=ctx)
        router = RowRouter(tiny_unet)
        with router.routed(routes, 5):
            routed = tiny_unet(x, t, context=ctx)
        assert not router.installed
        with merged(tiny_unet, la.unet, 1.0):
            only_a = tiny_unet(x, t, context=ctx)
            with merged(tiny_unet, lb.unet, 0.7):
                both = tiny_unet(x, t, context=ctx)
        with merged(tiny_unet, lb.unet, 0.7):
            only_b = tiny_unet(x, t, context=ctx)
    assert all(torch.equal(v, tiny_unet.state_dict()[k]) for k, v in before.items())
    assert torch.equal(routed[0], plain[0]) and torch.equal(routed[4], plain[4])
    for row, reference in ((1, only_a), (2, only_b), (3, both)):
        diff = (routed[row] - reference[row]).abs().max().item()
        assert diff <= 1e-5, (row, diff)
        assert (reference[row] - plain[row]).abs().max() > 1e-2  # the LoRA does change the output


def test_dense_delta_and_cp_factors_match_merge():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1)
    lin = nn.Linear(6, 8)
    cp = LowRankDelta(down=torch.randn(2, 6, 1, 1), up=torch.randn(8, 2, 1, 1), mid=torch.randn(2, 2, 3, 3), scale=0.5)
    dense = DenseDelta(weight=torch.randn(8, 6) * 0.1, bias=torch.randn(8) * 0.1)
    root = nn.ModuleDict({"conv": conv, "lin": lin})
    xc, xl = torch.randn(2, 6, 5, 7), torch.randn(2, 3, 6)
    router = RowRouter(root)
    with torch.no_grad(), router.routed([Route({"conv": cp, "lin": dense}, [1], 1.0)], 2):
        routed_c, routed_l = conv(xc), lin(xl)
    with torch.no_grad(), merged(root, {"conv": cp, "lin": dense}):
        merged_c, merged_l = conv(xc), lin(xl)
    close(routed_c[1], merged_c[1])
    close(routed_l[1], merged_l[1])
    assert not torch.allclose(routed_c[0], merged_c[0])  # row 0 kept the plain weights


def test_tiled_rows_follow_their_image():
    lin = nn.Linear(4, 4)
    delta = DenseDelta(weight=torch.eye(4))
    router = RowRouter(nn.ModuleDict({"lin": lin}))
    x = torch.randn(6, 3, 4)  # 2 rows, each tiled 3 times (image-major)
    with torch.no_grad(), router.routed([Route({"lin": delta}, [1], 1.0)], 2):
        out = lin(x)
    plain = lin(x).detach()
    assert torch.equal(out[:3], plain[:3])
    close(out[3:], plain[3:] + x[3:], LAYER)


class HostLinear(nn.Module):
    """A host's own Linear that is not torch's (the Forge backends' operations.Linear)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))
        self.bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


def test_hosts_own_linear_layers_are_routed_and_embeddings_are_not():
    lin = HostLinear(4, 3)
    root = nn.ModuleDict({"lin": lin, "emb": nn.Embedding(5, 4)})
    delta = LowRankDelta(down=torch.randn(2, 4), up=torch.randn(3, 2), scale=0.5)
    x = torch.randn(2, 4)
    router = RowRouter(root)
    with torch.no_grad(), router.routed([Route({"lin": delta}, [1], 1.0)], 2):
        out = lin(x)
    with torch.no_grad(), merged(root, {"lin": delta}):
        expected = lin(x)
    assert torch.equal(out[0], lin(x)[0].detach())
    close(out[1], expected[1], LAYER)
    with pytest.raises(KeyError, match="not a Linear"):
        router.set_routes([Route({"emb": delta}, [0], 1.0)], 2)


def test_router_rejects_bad_rows_and_unknown_modules(loras, tiny_unet):
    router = RowRouter(tiny_unet)
    with pytest.raises(ValueError, match="outside"):
        router.set_routes([Route(loras["kohya"].unet, [4], 1.0, "A")], 2)
    with pytest.raises(KeyError, match="not a Linear"):
        router.set_routes([Route({"nope.layer": next(iter(loras["kohya"].unet.values()))}, [0], 1.0, "A")], 2)
    assert not router.installed


def test_bad_files_are_refused_with_a_message(tmp_path, tiny_unet, tiny_text_encoder):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    good = write_kohya_lora(tmp_path / "good.safetensors", tiny_unet, tiny_text_encoder, seed=1)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(open(good, "rb").read()[:1000])
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04not really")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(256))
    for path, match in ((empty, "empty"), (truncated, "not a readable"), (pickle, "only .safetensors"), (garbage, "not a readable")):
        with pytest.raises(LoRAFileError, match=match) as e:
            read_lora_file(path)
        assert path.stem in str(e.value)
    nolora = tmp_path / "nolora.safetensors"
    save_file({"some.weight": torch.zeros(2)}, str(nolora))
    with pytest.raises(LoRAFileError, match="no LoRA"):
        read_lora_file(nolora)


def test_lora_for_another_family_is_refused(tmp_path, tiny_unet, tiny_unet_sdxl):
    # an SDXL-layout LoRA on the SD1.5 layout, and the reverse
    sdxl_file = write_kohya_lora(tmp_path / "xl.safetensors", tiny_unet_sdxl, None, seed=1, unet_naming="ldm")
    with pytest.raises(LoRAFileError, match="another model family"):
        map_lora(read_lora_file(sdxl_file), tiny_unet)
    sd15_file = write_kohya_lora(tmp_path / "sd15.safetensors", tiny_unet, None, seed=1, unet_naming="ldm")
    with pytest.raises(LoRAFileError, match="another model family"):
        map_lora(read_lora_file(sd15_file), tiny_unet_sdxl)
    wide = build_tiny_unet("sd15", seed=0, context_dim=48)  # same names, other shapes
    with pytest.raises(LoRAFileError, match="another model family"):
        map_lora(read_lora_file(sd15_file), wide)


# -- factored formats: LoHa as low rank, LoKr through its Kronecker factors, others built per pass --------


def test_loha_as_low_rank_is_exact_for_linear_and_conv():
    from clora_ext.routing import hadamard_as_low_rank

    g = torch.Generator().manual_seed(0)
    for shape in [(24, 40), (16, 8, 3, 3)]:
        out, fan_in = shape[0], int(torch.tensor(shape[1:]).prod())
        w1a, w1b = torch.randn(out, 4, generator=g), torch.randn(4, fan_in, generator=g)
        w2a, w2b = torch.randn(out, 3, generator=g), torch.randn(3, fan_in, generator=g)
        delta = hadamard_as_low_rank(w1a, w1b, w2a, w2b, 0.5, shape)
        want = ((w1a @ w1b) * (w2a @ w2b) * 0.5).reshape(shape)
        assert delta.rank == 12
        close(delta.dense(torch.Size(shape)), want, 1e-5)
        module = torch.nn.Linear(40, 24) if len(shape) == 2 else torch.nn.Conv2d(8, 16, 3, padding=1)
        x = torch.randn(2, 40, generator=g) if len(shape) == 2 else torch.randn(2, 8, 6, 6, generator=g)
        plain = torch.nn.functional.linear(x, want) if len(shape) == 2 else torch.nn.functional.conv2d(x, want, padding=1)
        close(delta.apply(module, x), plain, 1e-5)


def test_kronecker_delta_applies_without_building_the_weight():
    from clora_ext.routing import KroneckerDelta

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 5, generator=g), torch.randn(6, 8, generator=g)
    delta = KroneckerDelta(a, b, scale=0.25)
    module = torch.nn.Linear(40, 24)
    x = torch.randn(3, 7, 40, generator=g)
    want = torch.nn.functional.linear(x, torch.kron(a, b) * 0.25)
    close(delta.apply(module, x), want, 1e-5)
    close(delta.dense(torch.Size((24, 40))), torch.kron(a, b) * 0.25, LAYER)
    # a conv: b carries the kernel; stride and padding are the module's
    b4 = torch.randn(6, 2, 3, 3, generator=g)
    conv = torch.nn.Conv2d(10, 24, 3, stride=2, padding=1)
    delta = KroneckerDelta(a, b4, scale=0.5)
    x = torch.randn(2, 10, 9, 9, generator=g)
    weight = delta.dense(conv.weight.shape)
    close(weight, torch.kron(a[:, :, None, None], b4) * 0.5, LAYER)
    close(delta.apply(conv, x), torch.nn.functional.conv2d(x, weight, stride=2, padding=1), 1e-5)


def test_lazy_delta_is_built_once_per_routed_pass_and_matches_dense():
    from clora_ext.routing import LazyDelta, RowRouter

    builds = []
    weight = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))

    def build():
        builds.append(1)
        return weight, None

    net = torch.nn.Sequential(torch.nn.Linear(5, 6))
    lazy = {"0": LazyDelta(build)}
    x = torch.randn(2, 5)
    with torch.no_grad():
        base = net(x)
        with RowRouter(net).routed([Route(lazy, [1])], 2):
            out = net(x)
            net(x)
    assert len(builds) == 1  # built when the routes were set, not per call
    assert torch.equal(out[0], base[0])
    close(out[1], base[1] + x[1] @ weight.T, LAYER)


def test_hadamard_delta_keeps_the_factors_and_routes_as_low_rank():
    from clora_ext.routing import HadamardDelta, LowRankDelta, hadamard_as_low_rank

    g = torch.Generator().manual_seed(3)
    w = [torch.randn(24, 4, generator=g), torch.randn(4, 40, generator=g), torch.randn(24, 2, generator=g),
         torch.randn(2, 40, generator=g)]
    delta = HadamardDelta(*[t.half() for t in w], 0.5, (24, 40))
    routed = delta.to(torch.device("cpu"), torch.float32)
    assert isinstance(routed, LowRankDelta) and routed.rank == 8 and routed.up.dtype == torch.float32
    want = hadamard_as_low_rank(*[t.half().float() for t in w], 0.5, (24, 40)).dense(torch.Size((24, 40)))
    close(delta.dense(torch.Size((24, 40))), want, LAYER)
