"""Checks of the tiny offline SD stand-ins in clora_ext.devtools.tiny_sd."""

from __future__ import annotations

import copy

import pytest
import torch

from clora_ext.devtools import tiny_sd
from clora_ext.devtools.tiny_sd import BOS, EOS
from tolerance import close

SD15_ATTN2 = {
    *(f"input_blocks.{i}.1.transformer_blocks.0.attn2" for i in (1, 2, 4, 5, 7, 8)),
    "middle_block.1.transformer_blocks.0.attn2",
    *(f"output_blocks.{i}.1.transformer_blocks.0.attn2" for i in range(3, 12)),
}
SDXL_ATTN2 = {
    f"{block}.1.transformer_blocks.{d}.attn2"
    for block in (
        *(f"input_blocks.{i}" for i in (4, 5, 7, 8)),
        "middle_block",
        *(f"output_blocks.{i}" for i in range(6)),
    )
    for d in (0, 1)
}


def _chunk(bpe, text: str) -> list[int]:
    ids = bpe.encode(text)[:75]
    return [BOS, *ids] + [EOS] * (76 - len(ids))


def _attn2_names(unet: torch.nn.Module) -> set[str]:
    return {n for n, _ in unet.named_modules() if n.endswith(".attn2")}


def _inputs(seed: int = 1, hw: int = 16, ctx_dim: int = 32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, hw, hw, generator=g)
    t = torch.tensor([500])
    ctx = torch.randn(1, 77, ctx_dim, generator=g)
    return x, t, ctx


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_unet_is_tiny(layout):
    """Small enough to build and run in a CI test: about 8.5M parameters (SD1.5's UNet has 860M).
    The size is asserted, not the build time: a wall-clock bound fails on a loaded machine."""
    unet = tiny_sd.build_tiny_unet(layout, seed=6)
    assert sum(p.numel() for p in unet.parameters()) < 10_000_000
    assert not unet.training
    assert all(p.dtype == torch.float32 for p in unet.parameters())


def test_sd15_attention_layout(tiny_unet):
    from ldm.modules.attention import CrossAttention, SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    assert isinstance(tiny_unet, UNetModel)
    assert _attn2_names(tiny_unet) == SD15_ATTN2
    modules = dict(tiny_unet.named_modules())
    for name in SD15_ATTN2:
        attn2 = modules[name]
        assert isinstance(attn2, CrossAttention)
        assert attn2.to_k.in_features == 32 and attn2.heads == 2
    transformers = [m for m in tiny_unet.modules() if isinstance(m, SpatialTransformer)]
    assert len(transformers) == 16
    assert all(isinstance(m.proj_in, torch.nn.Conv2d) for m in transformers)


def test_sdxl_attention_layout(tiny_unet_sdxl):
    from ldm.modules.attention import CrossAttention, SpatialTransformer

    assert _attn2_names(tiny_unet_sdxl) == SDXL_ATTN2
    modules = dict(tiny_unet_sdxl.named_modules())
    assert all(isinstance(modules[n], CrossAttention) for n in SDXL_ATTN2)
    transformers = [m for m in tiny_unet_sdxl.modules() if isinstance(m, SpatialTransformer)]
    assert len(transformers) == 11
    assert all(len(m.transformer_blocks) == 2 for m in transformers)
    assert all(isinstance(m.proj_in, torch.nn.Linear) for m in transformers)
    assert len(tiny_unet_sdxl.input_blocks) == 9 and len(tiny_unet_sdxl.output_blocks) == 9
    # SDXL head width is fixed (32 here), so the head count grows with width.
    assert modules["input_blocks.4.1.transformer_blocks.0.attn2"].heads == 2
    assert modules["input_blocks.7.1.transformer_blocks.0.attn2"].heads == 4


@pytest.mark.parametrize("fixture", ["tiny_unet", "tiny_unet_sdxl"])
def test_gradient_checkpointing_is_on(fixture, request):
    from ldm.modules.attention import BasicTransformerBlock
    from ldm.modules.diffusionmodules.openaimodel import ResBlock

    unet = request.getfixturevalue(fixture)
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    resblocks = [m for m in unet.modules() if isinstance(m, ResBlock)]
    assert blocks and all(b.checkpoint for b in blocks)
    assert resblocks and all(r.use_checkpoint for r in resblocks)


@pytest.mark.parametrize("fixture", ["tiny_unet", "tiny_unet_sdxl"])
def test_unet_output_is_alive(fixture, request):
    unet = request.getfixturevalue(fixture)
    x, t, ctx = _inputs()
    with torch.no_grad():
        out = unet(x, t, context=ctx)
        assert out.shape == x.shape
        assert torch.isfinite(out).all()
        assert out.abs().max() > 1e-3

        def delta(**kw):
            args = dict(x=x, timesteps=t, context=ctx) | kw
            return (unet(**args) - out).abs().max().item()

        assert delta(x=x + 0.1 * torch.randn_like(x)) > 1e-3
        assert delta(timesteps=torch.tensor([50])) > 1e-3
        assert delta(context=ctx + 0.5 * torch.randn_like(ctx)) > 1e-3
        assert delta() == 0.0  # deterministic


def test_unet_batch_and_no_zero_params(tiny_unet):
    for name, p in tiny_unet.named_parameters():
        assert p.detach().abs().sum() > 0, f"{name} is all zeros"
    x, t, ctx = _inputs()
    x2, _, ctx2 = _inputs(seed=2)
    with torch.no_grad():
        both = tiny_unet(torch.cat([x, x2]), torch.tensor([500, 500]), context=torch.cat([ctx, ctx2]))
        one = tiny_unet(x2, t, context=ctx2)
    close(both[1:], one, 1e-4)


def test_unet_seeding():
    a = tiny_sd.build_tiny_unet("sd15", seed=3)
    b = tiny_sd.build_tiny_unet("sd15", seed=3)
    c = tiny_sd.build_tiny_unet("sd15", seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, pc), name


def test_sdxl_unet_deepcopies(tiny_unet_sdxl):
    clone = copy.deepcopy(tiny_unet_sdxl)
    x, t, ctx = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(clone(x, t, context=ctx), tiny_unet_sdxl(x, t, context=ctx))


def test_unet_grad_wrt_latent():
    unet = tiny_sd.build_tiny_unet("sd15", seed=7)  # private: grads land on params
    x, t, ctx = _inputs()
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(unet(x, t, context=ctx).square().mean(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_unknown_layout():
    with pytest.raises(ValueError):
        tiny_sd.build_tiny_unet("sd3")


def test_clip_bpe(clip_bpe):
    assert clip_bpe.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tiny_sd.clip_bpe() is clip_bpe
    assert clip_bpe.encoder["<|startoftext|>"] == BOS == 49406
    assert clip_bpe.encoder["<|endoftext|>"] == EOS == 49407


def test_text_encoder(tiny_text_encoder, clip_bpe):
    cat = tiny_sd.encode_text(tiny_text_encoder, [_chunk(clip_bpe, "a photo of a cat")])
    dog = tiny_sd.encode_text(tiny_text_encoder, [_chunk(clip_bpe, "a photo of a dog")])
    assert cat.shape == (1, 77, 32) and dog.shape == (1, 77, 32)
    assert torch.isfinite(cat).all()
    assert not cat.requires_grad
    # Same prefix up to the differing token (causal mask), different after.
    torch.testing.assert_close(cat[:, :5], dog[:, :5])
    assert (cat[:, 5:] - dog[:, 5:]).abs().max() > 1e-3
    again = tiny_sd.build_tiny_text_encoder(seed=0)
    torch.testing.assert_close(tiny_sd.encode_text(again, [_chunk(clip_bpe, "a photo of a cat")]), cat)


def test_text_encoder_seeding_does_not_touch_global_rng():
    state = torch.get_rng_state()
    a = tiny_sd.build_tiny_text_encoder(seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    b = tiny_sd.build_tiny_text_encoder(seed=2)
    assert not torch.equal(a.text_model.embeddings.token_embedding.weight,
                           b.text_model.embeddings.token_embedding.weight)


def test_encode_text_chunks_and_batch(tiny_text_encoder, clip_bpe):
    c1, c2, c3, c4 = (_chunk(clip_bpe, p) for p in ("a cat", "on a mat", "a dog", "in a fog"))
    long = tiny_sd.encode_text(tiny_text_encoder, [c1, c2])
    assert long.shape == (1, 154, 32)
    close(long[:, 77:], tiny_sd.encode_text(tiny_text_encoder, [c2]))

    batch = tiny_sd.encode_text_batch(tiny_text_encoder, [[c1, c2], [c3, c4]])
    assert batch.shape == (2, 154, 32)
    close(batch[0:1], long)
    close(batch[1:2], tiny_sd.encode_text(tiny_text_encoder, [c3, c4]))

    with pytest.raises(ValueError):
        tiny_sd.encode_text_batch(tiny_text_encoder, [[c1, c2], [c3]])
    with pytest.raises(ValueError):
        tiny_sd.encode_text(tiny_text_encoder, [c1[:76]])


def test_text_conditions_the_unet(tiny_unet, tiny_text_encoder, clip_bpe):
    x, t, _ = _inputs()
    ctx = tiny_sd.encode_text_batch(
        tiny_text_encoder, [[_chunk(clip_bpe, "a cat")], [_chunk(clip_bpe, "a dog")]]
    )
    with torch.no_grad():
        out = tiny_unet(x.expand(2, -1, -1, -1), t.expand(2), context=ctx)
    assert (out[0] - out[1]).abs().max() > 1e-4
