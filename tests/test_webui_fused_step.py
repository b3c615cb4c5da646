"""The glue's per-step path on the tiny models: conds table -> row model -> engine -> fused host rows.

The inner model stands in for the host's k-diffusion wrapper (x0 = x - sigma * eps,
UNet input x * c_in) and reads the conditioning dict exactly as the host builds it:
``c_crossattn`` for SD1.x, ``crossattn``/``vector`` for SDXL. The SDXL case is the
SDXL path of the glue, shown on the tiny SDXL-layout UNet (a real SDXL checkpoint
does not fit this machine's CPU budget).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from clora_ext.webui.plan import FusedProxy, ProxyRows, fused_step
from clora_ext.conditioning import ConditioningTable
from clora_ext.concepts import Composition, Concept
from clora_ext.engine import CLoRAEngine, EngineSettings, LoRAUse
from clora_ext.routing import LowRankDelta
from clora_ext.tokens import BPEChunkTokenizer, plan_token_maps
from clora_ext.update import Schedule
from tolerance import close

PROMPTS = ["a cat and a dog", "a dog chasing a cat"]  # the same subjects at different token positions
SETTINGS = EngineSettings(schedule=Schedule(refine_iterations=1), refine_tolerance=None)


class HostLikeDenoiser(nn.Module):
    def __init__(self, unet: nn.Module, sdxl: bool):
        super().__init__()
        self.unet, self.sdxl = unet, sdxl

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        assert cond["c_concat"][0].shape[0] == x.shape[0]
        if self.sdxl:
            assert cond["vector"].shape[0] == x.shape[0]
            context = cond["crossattn"]
        else:
            context = cond["c_crossattn"][0]
        s = sigma.reshape(-1, 1, 1, 1)
        eps = self.unet(x / (s**2 + 1).sqrt(), sigma * 10, context=context)
        return x - s * eps


def _loras(unet: nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, module in unet.named_modules():
        if name.endswith("attn2.to_k") or name.endswith("attn2.to_v"):
            deltas[name] = LowRankDelta(
                down=torch.randn(2, module.in_features, generator=g) * 0.3,
                up=torch.randn(module.out_features, 2, generator=g) * 0.3,
            )
    return deltas


def _setup(unet: nn.Module, clip_bpe, sdxl: bool, images: list[int], uncond_chunks: int = 1, settings=SETTINGS):
    comp = Composition.from_concepts([Concept("cat", "a", trigger="sks"), Concept("dog", "b")])
    tok = BPEChunkTokenizer(clip_bpe.encode)
    prompts = [PROMPTS[i] for i in images]
    maps = [tuple(plan_token_maps(comp, comp.variants(p), tok)) for p in prompts]
    g = torch.Generator().manual_seed(7)
    # one cond per (uncond, variant, prompt index), selected for the images asked for
    all_rows = {(u, v, i): torch.randn(77 * (uncond_chunks if u else 1), 32, generator=g)
                for u in (0, 1) for v in range(3) for i in range(2)}
    vectors = {key: torch.randn(6, generator=g) for key in all_rows}
    rows = [(u, v, i) for u in (0, 1) for v in range(3) for i in images]
    if sdxl:
        conds = [{"crossattn": all_rows[r], "vector": vectors[r]} for r in rows]
    else:
        conds = [all_rows[r] for r in rows]
    table = ConditioningTable(conds)
    uses = [[], [LoRAUse("a", _loras(unet, 1))], [LoRAUse("b", _loras(unet, 2))]]
    engine = CLoRAEngine(unet, uses, maps[0], settings)
    return engine, table, maps


def _run(unet, clip_bpe, sdxl, images, x, sigma, allow_update=True, uncond_chunks=1, inner=None, settings=SETTINGS,
         seen=None):
    engine, table, maps = _setup(unet, clip_bpe, sdxl, images, uncond_chunks, settings)
    inner = inner or HostLikeDenoiser(unet, sdxl)
    if seen is not None:
        seen.append(engine)
    with engine:
        return fused_step(
            engine, inner, ProxyRows(len(images), 3), x, sigma, torch.zeros(len(images), 5, 1, 1),
            table, maps, step=0, total=10, k_diffusion=True, allow_update=allow_update,
        )


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15", "sdxl"])
def test_batch_of_two_prompts_equals_each_image_alone(request, clip_bpe, sdxl):
    unet = request.getfixturevalue("tiny_unet_sdxl" if sdxl else "tiny_unet")
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 4, 16, 16, generator=g) * 14.6
    sigma = torch.tensor([14.6, 14.6])
    x = x0.clone()
    fused = _run(unet, clip_bpe, sdxl, [0, 1], x, sigma)
    assert fused.shape == (4, 4, 16, 16) and torch.isfinite(fused).all()
    assert not torch.equal(x, x0)  # the sampler's own tensor was updated in place
    for i in (0, 1):
        xi = x0[i : i + 1].clone()
        alone = _run(unet, clip_bpe, sdxl, [i], xi, sigma[i : i + 1])
        close(xi, x[i : i + 1])
        close(alone[0], fused[i])  # cond row
        close(alone[1], fused[2 + i])  # uncond row


def test_an_image_that_refines_on_after_another_stopped_keeps_its_own_prompt(tiny_unet, clip_bpe):
    """Refinement goes on for the images whose loss still falls: those passes see the images' own
    conds and token positions (image 1's, not image 0's, once image 0 has stopped)."""
    settings = EngineSettings(schedule=Schedule(refine_iterations=8), refine_tolerance=5e-2)
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3)) * 14.6
    sigma = torch.tensor([14.6, 14.6])
    x, engines = x0.clone(), []
    fused = _run(tiny_unet, clip_bpe, False, [0, 1], x, sigma, settings=settings, seen=engines)
    passes = {b: len(losses) for b, losses in engines[0].records[0].image_losses.items()}
    assert passes[0] != passes[1]  # the images stopped at different passes
    for i in (0, 1):
        xi, alone = x0[i : i + 1].clone(), []
        out = _run(tiny_unet, clip_bpe, False, [i], xi, sigma[i : i + 1], settings=settings, seen=alone)
        assert len(alone[0].records[0].image_losses[0]) == passes[i]
        close(xi, x[i : i + 1])
        close(out[0], fused[i])


def test_images_whose_maps_differ_only_in_position_share_each_model_call(tiny_unet, clip_bpe):
    calls = []

    class Recording(HostLikeDenoiser):
        def forward(self, x, sigma, cond):
            calls.append(x.shape[0])
            return super().forward(x, sigma, cond)

    engine, _, maps = _setup(tiny_unet, clip_bpe, False, [0, 1])
    assert [s.position for s in maps[0]] != [s.position for s in maps[1]]
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(6)) * 3
    _run(tiny_unet, clip_bpe, False, [0, 1], x, torch.tensor([3.0, 3.0]), inner=Recording(tiny_unet, False))
    # refinement 1 at step 0: two gradient passes over both images' 3 cond rows, one fused pass of all 12 rows
    assert calls == [6, 6, 12]
    with pytest.raises(ValueError, match="same structure"):
        engine.set_token_maps([maps[0], maps[0][:-1]])


def test_no_update_leaves_the_latent_and_the_proxy_serves_host_rows(tiny_unet, clip_bpe):
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4)) * 3
    before = x.clone()
    fused = _run(tiny_unet, clip_bpe, False, [0, 1], x, torch.tensor([3.0, 3.0]), allow_update=False)
    assert torch.equal(x, before)
    proxy = FusedProxy(nn.Module(), fused, ProxyRows(2, 3))
    served = torch.cat([proxy(x, None), proxy(x, None)])  # the host's split calls: cond rows, uncond rows
    assert torch.equal(served, fused)


def test_cond_rows_keep_their_own_length_beside_a_long_negative_prompt(tiny_unet, clip_bpe):
    """A1111 runs a 77-token prompt and a 154-token negative prompt in separate calls, unpadded."""
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(1, 4, 16, 16, generator=g) * 3
    sigma = torch.tensor([3.0])
    lengths = []

    class Recording(HostLikeDenoiser):
        def forward(self, x, sigma, cond):
            lengths.append((x.shape[0], cond["c_crossattn"][0].shape[1]))
            return super().forward(x, sigma, cond)

    x_short, x_long = x0.clone(), x0.clone()
    short = _run(tiny_unet, clip_bpe, False, [0], x_short, sigma, uncond_chunks=1)
    lengths.clear()
    long = _run(tiny_unet, clip_bpe, False, [0], x_long, sigma, uncond_chunks=2, inner=Recording(tiny_unet, False))
    # the gradient passes see the 3 cond rows at 77 tokens; the fused pass runs 77 and 154 apart
    assert set(lengths) == {(3, 77), (3, 154)}
    close(x_short, x_long)  # the latent update never sees the negative prompt
    close(short[0], long[0])  # nor does the fused cond prediction
    assert not torch.allclose(short[1], long[1], atol=1e-3)  # the uncond rows did change


@pytest.mark.parametrize("max_rows", [None, 2], ids=["one_call", "calls_of_2_rows"])
def test_functional_gradient_through_the_glue_equals_autograd(tiny_unet, clip_bpe, max_rows):
    """The Forge hosts' gradient pass (torch.func vjp of the functionalised forward) through the glue's
    row model and conditioning table: the row bookkeeping must not read tensors made inside the
    transform. Same latent update and fused rows as autograd; a long negative prompt splits the rows, and
    a row cap splits the gradient pass too (its calls are planned outside the transform)."""
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 4, 16, 16, generator=g) * 14.6
    sigma = torch.tensor([14.6, 14.6])
    results = {}
    for functional in (False, True):
        engine, table, maps = _setup(tiny_unet, clip_bpe, False, [0, 1], uncond_chunks=2)
        engine.functional_gradient = functional
        engine.max_rows = max_rows
        x = x0.clone()
        with engine:
            fused = fused_step(
                engine, HostLikeDenoiser(tiny_unet, False), ProxyRows(2, 3), x, sigma, torch.zeros(2, 5, 1, 1),
                table, maps, step=0, total=10, k_diffusion=True, allow_update=True,
            )
        results[functional] = (x, fused)
    assert not torch.equal(results[True][0], x0)
    close(results[True][0], results[False][0], 1e-4)
    close(results[True][1], results[False][1], 1e-4)


@pytest.mark.parametrize("functional", [False, True], ids=["autograd", "functional"])
def test_a_row_cap_keeps_one_calls_graph_at_a_time_with_the_same_update(tiny_unet, clip_bpe, functional):
    """With a row cap the gradient pass takes every call's maps without a graph first, then runs the calls
    again one by one with their graph for the backward: never more than the cap's rows hold a graph, and
    the latent update is the one the uncapped pass makes (refinement included: several backwards)."""
    settings = EngineSettings(schedule=Schedule(refine_iterations=2), refine_tolerance=None)
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(8)) * 14.6
    sigma = torch.tensor([14.6, 14.6])
    seen: list[tuple[int, bool]] = []

    class Recording(HostLikeDenoiser):
        def forward(self, x, sigma, cond):
            seen.append((x.shape[0], x.requires_grad or torch.is_grad_enabled()))
            return super().forward(x, sigma, cond)

    results = {}
    for max_rows in (None, 2):
        engine, table, maps = _setup(tiny_unet, clip_bpe, False, [0, 1], settings=settings)
        engine.functional_gradient = functional
        engine.max_rows = max_rows
        x, seen[:] = x0.clone(), []
        with engine:
            fused = fused_step(engine, Recording(tiny_unet, False), ProxyRows(2, 3), x, sigma, torch.zeros(2, 5, 1, 1),
                               table, maps, step=0, total=10, k_diffusion=True, allow_update=True)
        results[max_rows] = (x, fused, list(seen))
    assert not torch.equal(results[2][0], x0)
    close(results[2][0], results[None][0], 1e-4)
    close(results[2][1], results[None][1], 1e-4)
    capped = results[2][2]
    assert max(rows for rows, _ in capped) <= 2
    if not functional:  # (under torch.func the forward carries no autograd graph to see)
        # 3 gradient passes of 6 cond rows: each 3 calls without a graph, then the same 3 with one
        graph = [g for rows, g in capped[:-6]]
        assert graph == 3 * ([False] * 3 + [True] * 3)
