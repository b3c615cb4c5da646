"""Attention capture, the latent update and its space scaling on the tiny model."""

from __future__ import annotations

import pytest
import torch

from clora_ext.attention import AttentionCapture, CaptureRequest, cross_attention_modules, map_size
from clora_ext.engine import CLoRAEngine, EngineSettings, LoRAUse, RowLayout, gradient_ready
from clora_ext.tokens import TokenMapSpec
from clora_ext.update import DDPMSpace, Schedule, SigmaSpace, apply_update, without_region_means
from tolerance import close, differs

SD15_H32 = [f"input_blocks.{i}.1.transformer_blocks.0.attn2" for i in (7, 8)] + [
    f"output_blocks.{i}.1.transformer_blocks.0.attn2" for i in (3, 4, 5)
]
SDXL_H32 = [
    f"{block}.1.transformer_blocks.{d}.attn2"
    for block in ("input_blocks.7", "input_blocks.8", "middle_block", "output_blocks.0", "output_blocks.1", "output_blocks.2")
    for d in (0, 1)
]


def manual_maps(unet, x, t, ctx, layers, rows, cols, hw):
    """Independent oracle: recompute softmax(q k^T * scale) from each layer's recorded input."""
    modules = dict(unet.named_modules())
    inputs = {}
    handles = [
        modules[n].register_forward_hook(lambda m, a, kw, o, n=n: inputs.__setitem__(n, (a[0], kw.get("context"))), with_kwargs=True)
        for n in layers
    ]
    with torch.no_grad():
        out = unet(x, t, context=ctx)
    for h in handles:
        h.remove()
    acc = 0
    for n in layers:
        m = modules[n]
        hidden, context = inputs[n]
        q, k = m.to_q(hidden), m.to_k(context)
        b, nq, inner = q.shape
        d = inner // m.heads
        q = q.reshape(b, nq, m.heads, d).permute(0, 2, 1, 3)
        k = k.reshape(b, -1, m.heads, d).permute(0, 2, 1, 3)
        p = torch.softmax((q @ k.transpose(-1, -2)) * m.scale, dim=-1).mean(1)
        acc = acc + p[rows, :, cols]
    return out, (acc / len(layers)).reshape(-1, *hw)


@pytest.mark.parametrize("layout_name,expected", [("sd15", SD15_H32), ("sdxl", SDXL_H32)])
def test_capture_selects_h32_layers_and_matches_explicit_softmax(request, layout_name, expected):
    unet = request.getfixturevalue("tiny_unet" if layout_name == "sd15" else "tiny_unet_sdxl")
    gen = torch.Generator().manual_seed(0)
    latent_hw = (16, 24)  # non-square: 4 x 6 maps
    x = torch.randn(3, 4, *latent_hw, generator=gen)
    t = torch.tensor([10.0, 500.0, 900.0])
    ctx = torch.randn(3, 77, 32, generator=gen)
    rows, cols = torch.tensor([0, 2, 2]), torch.tensor([1, 5, 76])
    capture = AttentionCapture(cross_attention_modules(unet))
    with torch.no_grad(), capture.installed():
        with capture.capturing(CaptureRequest(rows, cols, map_size(latent_hw))):
            captured_out = unet(x, t, context=ctx)
        maps = capture.maps()
    assert capture.layers == expected
    ref_out, ref_maps = manual_maps(unet, x, t, ctx, expected, rows, cols, map_size(latent_hw))
    assert maps.shape == (3, 4, 6)
    close(maps, ref_maps, 1e-5)
    assert torch.equal(captured_out, ref_out)  # the layer's own output is untouched
    assert all(not m._forward_hooks for m in unet.modules())


def test_capture_carries_autograd_through_checkpointing_and_stops_early(tiny_unet):
    assert any(getattr(m, "checkpoint", False) is True for m in tiny_unet.modules())
    x = torch.randn(2, 4, 16, 16)
    t, ctx = torch.tensor([400.0, 400.0]), torch.randn(2, 77, 32)
    def req(grad, stop):
        return CaptureRequest(torch.tensor([0, 1]), torch.tensor([2, 3]), (4, 4), grad=grad, stop_early=stop)
    capture = AttentionCapture(cross_attention_modules(tiny_unet))
    ran: list[str] = []
    probe = tiny_unet.output_blocks[6].register_forward_hook(lambda *a: ran.append("after"))
    try:
        with capture.installed():
            with torch.no_grad(), capture.capturing(req(False, False)):
                tiny_unet(x, t, context=ctx)  # a complete pass learns the last H/32 layer
            assert capture.known_layers == SD15_H32
            ran.clear()
            with torch.enable_grad(), gradient_ready(tiny_unet):
                leaf = x.clone().requires_grad_(True)
                with capture.capturing(req(True, True)):
                    tiny_unet(leaf, t, context=ctx)
                maps = capture.maps()
                (grad,) = torch.autograd.grad(maps[0].sum() - maps[1].sum(), leaf)
            assert ran == []  # nothing after output_blocks.5 ran
            assert grad.abs().sum() > 0 and torch.isfinite(grad).all()
    finally:
        probe.remove()
    # flags and requires_grad restored
    assert any(getattr(m, "checkpoint", False) is True for m in tiny_unet.modules())
    assert all(p.requires_grad for p in tiny_unet.parameters())


def test_sigma_space_update_equals_ddpm_update_mapped_across():
    gen = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.7, 3.0])
    c_in = (sigma**2 + 1) ** -0.5
    z = torch.randn(2, 4, 6, 6, generator=gen)  # DDPM-space latent x_t
    w = torch.randn(2, 4, 6, 6, generator=gen)
    def loss_of_z(z):
        return ((z * w).sum(dim=(1, 2, 3)) ** 2).sum()
    # DDPM space: z <- z - a * grad_z
    zl = z.clone().requires_grad_(True)
    (gz,) = torch.autograd.grad(loss_of_z(zl), zl)
    z_new = z.clone()
    apply_update(z_new, gz, 20.0, DDPMSpace())
    # sigma space: x = z / c_in, the model sees x * c_in
    x = (z / c_in[:, None, None, None]).clone()
    xl = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(loss_of_z(xl * c_in[:, None, None, None]), xl)
    apply_update(x, gx, 20.0, SigmaSpace(sigma))
    close(x * c_in[:, None, None, None], z_new)


def test_schedule_scales_with_step_count():
    s = Schedule()
    assert [i for i in range(50) if s.iterations_at(i, 50) > 1] == [0, 10, 20]
    assert [i for i in range(50) if s.updates_at(i, 50)] == list(range(25))
    assert s.iterations_at(0, 50) == 6 and s.iterations_at(1, 50) == 1 and s.iterations_at(25, 50) == 0
    s20 = Schedule(refine_iterations=8)
    assert [i for i in range(20) if s20.iterations_at(i, 20) > 1] == [0, 4, 8]
    assert [i for i in range(20) if s20.updates_at(i, 20)] == list(range(10))
    assert not Schedule(mask_start=0.2).masks_at(9, 50) and Schedule(mask_start=0.2).masks_at(10, 50)


def test_one_update_lowers_the_loss_on_the_tiny_model(tiny_unet):
    """Two variants whose subject maps overlap; one gradient step separates them a little."""
    specs = [TokenMapSpec(v, p, c, v == c + 1) for v in (0, 1, 2) for p, c in ((2, 0), (5, 1))]
    gen = torch.Generator().manual_seed(1)
    ctx = torch.randn(3, 77, 32, generator=gen)
    sigma = torch.tensor([2.0])
    c_in = float((sigma**2 + 1) ** -0.5)

    def row_model(x_rows, layout: RowLayout):
        return tiny_unet(x_rows * c_in, torch.full((len(layout),), 600.0), context=ctx[layout.variant])

    settings = EngineSettings(step_size=20.0, schedule=Schedule(refine_iterations=0), refine_tolerance=None)
    with CLoRAEngine(tiny_unet, [[], [], []], specs, settings) as engine:
        x = torch.randn(1, 4, 16, 16, generator=gen) * 2.0
        before, _ = engine.loss_and_gradient(x, row_model)
        engine.step(x, 0, 10, SigmaSpace(sigma), row_model)
        after, _ = engine.loss_and_gradient(x, row_model)
    assert after < before, (before, after)
    assert engine.records[0].iterations == 1


def test_momentum_carries_the_previous_updates_within_a_step(tiny_unet):
    """With momentum beta the k-th update is the gradient plus beta times the previous update
    (heavy ball), recomputed here by hand from single gradient passes; the step's first update
    is the plain gradient step, so regular (one-update) steps are the paper's."""
    specs = [TokenMapSpec(v, p, c, v == c + 1) for v in (0, 1, 2) for p, c in ((2, 0), (5, 1))]
    gen = torch.Generator().manual_seed(3)
    ctx = torch.randn(3, 77, 32, generator=gen)
    sigma = torch.tensor([2.0])
    c_in = float((sigma**2 + 1) ** -0.5)

    def row_model(x_rows, layout: RowLayout):
        return tiny_unet(x_rows * c_in, torch.full((len(layout),), 600.0), context=ctx[layout.variant])

    beta, alpha = 0.9, 20.0
    scale = float(sigma**2 + 1)
    schedule = Schedule(update_fraction=1.0, refine_at=(0.0,), refine_iterations=2)
    x0 = torch.randn(1, 4, 16, 16, generator=gen) * 2.0
    settings = EngineSettings(step_size=alpha, schedule=schedule, momentum=beta)
    with CLoRAEngine(tiny_unet, [[], [], []], specs, settings) as engine:
        x = x0.clone()
        engine.step(x, 0, 10, SigmaSpace(sigma), row_model)
        assert engine.records[0].iterations == 3
        expected, velocity = x0.clone(), torch.zeros_like(x0)
        for _ in range(3):
            _, grad = engine.loss_and_gradient(expected, row_model)
            velocity = beta * velocity + grad
            expected = expected - alpha * scale * velocity
        plain = x0.clone()
        engine.settings = EngineSettings(step_size=alpha, schedule=schedule)
        engine.step(plain, 0, 10, SigmaSpace(sigma), row_model)
    close(x, expected, 1e-4)
    assert (x - plain).abs().max() > 1e-3  # momentum changed the refinement


def test_functional_gradient_runs_on_inference_tensors_and_equals_autograd(tiny_unet):
    """The Forge family samples in inference mode with inference-tensor weights, which autograd
    refuses to save for backward; the functional gradient pass (torch.func) gives the same update
    there, without a graph on the weights and without copying them."""
    import copy

    specs = [TokenMapSpec(v, p, c, v == c + 1) for v in (0, 1, 2) for p, c in ((2, 0), (5, 1))]
    gen = torch.Generator().manual_seed(5)
    ctx = torch.randn(3, 77, 32, generator=gen)
    x0 = torch.randn(1, 4, 16, 16, generator=gen) * 2.0
    sigma = torch.tensor([2.0])
    settings = EngineSettings(schedule=Schedule(update_fraction=1.0, refine_at=(0.0,), refine_iterations=1))

    def row_model_of(unet, context):
        def row_model(x_rows, layout: RowLayout):
            return unet(x_rows * 0.45, torch.full((len(layout),), 600.0), context=context[layout.variant])
        return row_model

    with CLoRAEngine(tiny_unet, [[], [], []], specs, settings) as engine:
        expected = x0.clone()
        engine.step(expected, 0, 10, SigmaSpace(sigma), row_model_of(tiny_unet, ctx))

    with torch.inference_mode():
        twin = copy.deepcopy(tiny_unet)
        twin_ctx, x = ctx.clone(), x0.clone()
    assert next(twin.parameters()).is_inference() and x.is_inference()
    with torch.inference_mode():
        with CLoRAEngine(twin, [[], [], []], specs, settings) as engine:
            # autograd: inside inference mode nothing requires grad; outside, inference weights cannot be saved
            with pytest.raises(RuntimeError, match="does not require grad|Inference tensors"):
                engine.step(x.clone(), 0, 10, SigmaSpace(sigma), row_model_of(twin, twin_ctx))
        with CLoRAEngine(twin, [[], [], []], specs, settings, functional_gradient=True) as engine:
            engine.step(x, 0, 10, SigmaSpace(sigma), row_model_of(twin, twin_ctx))
            assert engine.records[0].iterations == 2
    assert not torch.equal(x, x0)
    close(x, expected, 1e-4)


def test_a_lazy_delta_built_in_place_acts_in_the_functional_gradient(tiny_unet):
    """A delta that only a host's merge builds (LazyDelta) may add in place, as Forge Neo's weight
    adapters do. Inside ``functionalize`` such an add of half-precision factors raises ("mutating a
    non-functional tensor with a functional tensor"), and Neo's adapters then log and return the
    weight unchanged: the LoRA silently does nothing in the gradient. The engine builds lazy deltas
    before the transform, so the gradient equals the one with the same delta given ready-made."""
    from clora_ext.routing import DenseDelta, LazyDelta

    specs = [TokenMapSpec(v, p, c, v == c + 1) for v in (0, 1, 2) for p, c in ((2, 0), (5, 1))]
    gen = torch.Generator().manual_seed(6)
    ctx = torch.randn(3, 77, 32, generator=gen)
    x0 = torch.randn(1, 4, 16, 16, generator=gen) * 2.0
    name = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    weight = tiny_unet.get_submodule(name).weight
    factor = (torch.randn(weight.shape, generator=gen) * 3 * float(weight.detach().std())).half()  # as a file keeps it

    def built_in_place() -> tuple[torch.Tensor, None]:
        delta = torch.zeros_like(weight, dtype=torch.float32)
        delta += factor.to(torch.float32)  # what a host's in-place merge does
        return delta, None

    def row_model(x_rows, layout: RowLayout):
        return tiny_unet(x_rows * 0.45, torch.full((len(layout),), 600.0), context=ctx[layout.variant])

    def gradient(delta) -> torch.Tensor:
        loras = [[], [LoRAUse("lazy", {name: delta})] if delta is not None else [], []]
        with torch.inference_mode(), CLoRAEngine(tiny_unet, loras, specs, EngineSettings(),
                                                 functional_gradient=True) as engine:
            return engine.loss_and_gradient(x0.clone(), row_model)[1].clone()

    with torch.inference_mode(), pytest.raises(RuntimeError, match="non-functional tensor"):
        torch.func.functionalize(lambda z: z + built_in_place()[0].sum())(torch.zeros(()))  # the host's failure
    lazy, ready, none = gradient(LazyDelta(built_in_place)), gradient(DenseDelta(factor.float())), gradient(None)
    close(lazy, ready)
    assert differs(lazy, none)  # the delta acted


def test_down_path_loss_takes_the_maps_of_input_blocks_only_and_stops_after_them(tiny_unet):
    specs = [TokenMapSpec(v, p, c, v == c + 1) for v in (0, 1, 2) for p, c in ((2, 0), (5, 1))]
    gen = torch.Generator().manual_seed(8)
    ctx = torch.randn(3, 77, 32, generator=gen)
    x = torch.randn(1, 4, 16, 16, generator=gen)
    seen = []

    def row_model(x_rows, layout: RowLayout):
        return tiny_unet(x_rows * 0.45, torch.full((len(layout),), 600.0), context=ctx[layout.variant])

    handles = [m.register_forward_hook(lambda m, a, o, n=n: seen.append(n))
               for n, m in tiny_unet.named_modules() if n.endswith("attn2")]
    try:
        for down in (False, True):
            settings = EngineSettings(down_path_loss=down)
            with CLoRAEngine(tiny_unet, [[], [], []], specs, settings) as engine:
                engine.step(x.clone(), 30, 40, SigmaSpace(torch.tensor([2.0])), row_model)  # a fused pass: every layer
                seen.clear()
                engine.loss_and_gradient(x, row_model)
                layers = list(engine.capture.layers)
            ran = [n for n in seen]
            if down:
                assert layers and all(n.startswith("input_blocks.") for n in layers)
                assert not any(n.startswith("output_blocks.") for n in ran)  # stopped after the down path
            else:
                assert any(n.startswith("output_blocks.") for n in layers)
    finally:
        for h in handles:
            h.remove()


def test_subject_loss_tokens_leave_the_trigger_maps_out_of_the_loss(tiny_unet):
    """Variants 1 and 2 each carry a trigger map (position 1) before their subject; with
    ``loss_tokens: subject`` the loss is the NT-Xent of the subject maps alone."""
    from clora_ext.loss import LossTokens, contrastive_loss, loss_maps

    specs = [TokenMapSpec(v, p, c, v == c + 1) for v in (0, 1, 2) for p, c in ((2, 0), (5, 1))]
    specs += [TokenMapSpec(1, 1, 0, True, trigger=True), TokenMapSpec(2, 4, 1, True, trigger=True)]
    assert loss_maps(specs, LossTokens.PAPER).all()
    assert loss_maps(specs, LossTokens.SUBJECT).tolist() == [True] * 6 + [False, False]
    gen = torch.Generator().manual_seed(3)
    ctx = torch.randn(3, 77, 32, generator=gen)
    x = torch.randn(1, 4, 16, 16, generator=gen)

    def row_model(x_rows, layout: RowLayout):
        return tiny_unet(x_rows * 0.45, torch.full((len(layout),), 600.0), context=ctx[layout.variant])

    losses = {}
    for rule in LossTokens:
        with CLoRAEngine(tiny_unet, [[], [], []], specs, EngineSettings(loss_tokens=rule)) as engine:
            losses[rule], grad = engine.loss_and_gradient(x, row_model)
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0
            out = engine.step(x.clone(), 30, 40, SigmaSpace(torch.tensor([2.0])), row_model)  # no update: maps only
            maps = out.maps[0]
    labels = torch.tensor([s.concept for s in specs])
    keep = loss_maps(specs, LossTokens.SUBJECT)
    loss = {rule: torch.tensor(value) for rule, value in losses.items()}
    close(loss[LossTokens.SUBJECT], contrastive_loss(maps[keep], labels[keep]))
    close(loss[LossTokens.PAPER], contrastive_loss(maps, labels))
    assert differs(loss[LossTokens.PAPER], loss[LossTokens.SUBJECT])


def test_agreeing_loss_tokens_keep_a_trigger_map_only_where_it_lies_with_its_subject():
    """Two concepts on the left and right halves; the first trigger map lies on its own subject's
    half, the second on the other subject's: the first is kept, the second left out, and the
    masked loss equals the NT-Xent of the kept maps."""
    from clora_ext.loss import agreeing_maps, contrastive_loss, masked_contrastive_loss

    gen = torch.Generator().manual_seed(11)
    left = torch.zeros(8, 8)
    left[:, :4] = 1.0
    right = 1.0 - left
    def noise():
        return 0.1 * torch.rand(8, 8, generator=gen)
    #         subject 0, subject 1, subject 0, subject 1, trigger 0 (on left), trigger 1 (on left: wrong)
    maps = torch.stack([left + noise(), right + noise(), left + noise(), right + noise(), left + noise(), left + noise()])
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    trigger = torch.tensor([False, False, False, False, True, True])
    keep = agreeing_maps(maps, labels, trigger)
    assert keep.tolist() == [True, True, True, True, True, False]
    close(masked_contrastive_loss(maps, labels, keep), contrastive_loss(maps[keep], labels[keep]))
    every = torch.ones(6, dtype=torch.bool)
    close(masked_contrastive_loss(maps, labels, every), contrastive_loss(maps, labels))
    # a trigger whose concept has no subject map has nothing to agree with: kept
    assert agreeing_maps(maps[[0, 1, 2, 3, 4]], torch.tensor([0, 1, 0, 1, 2]), trigger[[0, 1, 2, 3, 4]]).all()


def test_masked_loss_has_a_finite_gradient_with_a_map_left_out():
    """A map left out has no negatives: its row must not put NaN into the gradient."""
    from clora_ext.loss import masked_contrastive_loss

    maps = torch.rand(5, 4, 4, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    labels = torch.tensor([0, 1, 0, 1, 1])
    loss = masked_contrastive_loss(maps, labels, torch.tensor([True, True, True, True, False]))
    (grad,) = torch.autograd.grad(loss, maps)
    assert torch.isfinite(grad).all() and grad[:4].abs().sum() > 0
    assert grad[4].abs().sum() == 0


def test_agreeing_loss_tokens_run_in_the_engine_and_in_the_functional_gradient(tiny_unet):
    """The engine's loss under ``loss_tokens: agreeing`` is the masked NT-Xent over the maps the rule
    keeps at that latent, and the functional (torch.func) gradient pass gives the same update."""
    from clora_ext.loss import LossTokens, agreeing_maps, masked_contrastive_loss

    specs = [TokenMapSpec(v, p, c, v == c + 1) for v in (0, 1, 2) for p, c in ((2, 0), (5, 1))]
    specs += [TokenMapSpec(1, 1, 0, True, trigger=True), TokenMapSpec(2, 4, 1, True, trigger=True)]
    gen = torch.Generator().manual_seed(3)
    ctx = torch.randn(3, 77, 32, generator=gen)
    x0 = torch.randn(1, 4, 16, 16, generator=gen)
    settings = EngineSettings(loss_tokens=LossTokens.AGREEING,
                              schedule=Schedule(update_fraction=1.0, refine_at=(0.0,), refine_iterations=1))

    def row_model(x_rows, layout: RowLayout):
        return tiny_unet(x_rows * 0.45, torch.full((len(layout),), 600.0), context=ctx[layout.variant])

    with CLoRAEngine(tiny_unet, [[], [], []], specs, settings) as engine:
        loss, grad = engine.loss_and_gradient(x0, row_model)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        maps = engine.step(x0.clone(), 30, 40, SigmaSpace(torch.tensor([2.0])), row_model, allow_update=False).maps[0]
        labels = torch.tensor([s.concept for s in specs])
        trigger = torch.tensor([s.trigger for s in specs])
        close(torch.tensor(loss), masked_contrastive_loss(maps, labels, agreeing_maps(maps, labels, trigger)))
        expected = x0.clone()
        engine.step(expected, 0, 10, SigmaSpace(torch.tensor([2.0])), row_model)
    with CLoRAEngine(tiny_unet, [[], [], []], specs, settings, functional_gradient=True) as engine:
        x = x0.clone()
        engine.step(x, 0, 10, SigmaSpace(torch.tensor([2.0])), row_model)
    assert not torch.equal(x, x0)
    close(x, expected, 1e-4)


def test_shared_uncond_runs_one_base_uncond_row_per_image(tiny_unet):
    """``uncond_rows: shared``: the fused pass runs the V cond rows and one uncond row (the base
    variant's) per image; the cond prediction is the same fusion, the uncond is the base row."""
    from clora_ext.engine import UncondRows
    from clora_ext.masks import fuse

    specs = [TokenMapSpec(v, p, c, v == c + 1) for v in (0, 1, 2) for p, c in ((2, 0), (5, 1))]
    gen = torch.Generator().manual_seed(4)
    ctx = torch.randn(2, 3, 77, 32, generator=gen)  # (uncond, variant)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    seen = []

    def row_model(x_rows, layout: RowLayout):
        seen.append(RowLayout(layout.image.clone(), layout.variant.clone(), layout.uncond.clone()))
        context = ctx[layout.uncond.long(), layout.variant]
        return tiny_unet(x_rows * 0.45, torch.full((len(layout),), 600.0), context=context)

    out = {}
    for rows in UncondRows:
        seen.clear()
        with CLoRAEngine(tiny_unet, [[], [], []], specs, EngineSettings(uncond_rows=rows)) as engine:
            out[rows] = engine.step(x.clone(), 30, 40, SigmaSpace(torch.tensor([2.0, 2.0])), row_model, allow_update=False)
        (layout,) = seen
        if rows is UncondRows.SHARED:
            assert len(layout) == 2 * 3 + 2
            assert layout.uncond[6:].all() and layout.variant[6:].tolist() == [0, 0] and layout.image[6:].tolist() == [0, 1]
        else:
            assert len(layout) == 2 * 2 * 3
    shared, paper = out[UncondRows.SHARED], out[UncondRows.PER_VARIANT]
    close(shared.cond, paper.cond)
    base_uncond = tiny_unet(x * 0.45, torch.full((2,), 600.0), context=ctx[1, [0, 0]])
    close(shared.uncond, base_uncond)
    assert differs(shared.uncond, paper.uncond)
    close(paper.uncond[0], fuse(tiny_unet(x[[0, 0, 0]] * 0.45, torch.full((3,), 600.0), context=ctx[1]), paper.masks[0]))


def test_contour_masks_are_thresholded_at_the_latent_size(tiny_unet):
    """``mask_upsampling: contour``: each variant's mask is its maps grown bilinearly to the latent's
    size and thresholded there, hard (0/1) but not made of the maps' 4x4 blocks."""
    import torch.nn.functional as F

    from clora_ext.masks import MaskUpsampling, variant_masks

    specs = [TokenMapSpec(v, p, c, v == c + 1) for v in (0, 1, 2) for p, c in ((2, 0), (5, 1))]
    ramp = torch.linspace(0.0, 1.0, 8)
    one = (ramp[None, :] + ramp[:, None]) / 2  # a diagonal ramp: block edges would be a staircase of 4x4 steps
    maps = torch.stack([one, one.flip(1)] * 3)[None]  # (1, 6, 8, 8): subject 0 on the bottom right, 1 bottom left
    with CLoRAEngine(tiny_unet, [[], [], []], specs, EngineSettings(mask_upsampling=MaskUpsampling.CONTOUR)) as engine:
        masks = engine.masks(maps, (32, 32))[0]
        mask_for = torch.tensor([-1, -1, 1, -1, -1, 2])
    big = F.interpolate(maps, size=(32, 32), mode="bilinear", align_corners=False)[0]
    assert torch.equal(masks, variant_masks(big, mask_for, 3, 0.4))
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    blocks = masks[1].reshape(8, 4, 8, 4)
    assert (blocks.amax(dim=(1, 3)) != blocks.amin(dim=(1, 3))).any()  # an edge runs inside a 4x4 block
    with CLoRAEngine(tiny_unet, [[], [], []], specs, EngineSettings()) as engine:
        nearest = engine.masks(maps, (32, 32))[0].reshape(3, 8, 4, 8, 4)
    assert torch.equal(nearest.amax(dim=(2, 4)), nearest.amin(dim=(2, 4)))  # the default: whole blocks


def test_mask_memory_blends_each_step_masks_with_the_previous_steps_per_group(tiny_unet):
    """``mask_memory: m``: the masks fusing a step are m * the previous step's (of the same group of
    images) + (1 - m) * this step's own; the first step's are its own."""
    specs = [TokenMapSpec(v, p, c, v == c + 1) for v in (0, 1, 2) for p, c in ((2, 0), (5, 1))]
    gen = torch.Generator().manual_seed(8)
    ctx = torch.randn(3, 77, 32, generator=gen)
    xs = [torch.randn(1, 4, 16, 16, generator=gen) for _ in range(3)]

    def row_model(x_rows, layout: RowLayout):
        return tiny_unet(x_rows * 0.45, torch.full((len(layout),), 600.0), context=ctx[layout.variant])

    sigma = SigmaSpace(torch.tensor([2.0]))
    with CLoRAEngine(tiny_unet, [[], [], []], specs, EngineSettings()) as engine:
        own = [engine.step(x.clone(), 30 + i, 40, sigma, row_model, allow_update=False).masks for i, x in enumerate(xs)]
    with CLoRAEngine(tiny_unet, [[], [], []], specs, EngineSettings(mask_memory=0.25)) as engine:
        first = engine.step(xs[0].clone(), 30, 40, sigma, row_model, allow_update=False, group=(0,)).masks
        other = engine.step(xs[2].clone(), 30, 40, sigma, row_model, allow_update=False, group=(1,)).masks
        second = engine.step(xs[1].clone(), 31, 40, sigma, row_model, allow_update=False, group=(0,)).masks
    assert torch.equal(first, own[0]) and torch.equal(other, own[2])  # nothing held yet for either group
    close(second, 0.25 * own[0] + 0.75 * own[1])
    assert differs(own[0], own[1])


def _near_zero(value: torch.Tensor, scale: float) -> None:
    assert float(value.abs().max()) <= 1e-5 * scale, (float(value.abs().max()), scale)


def test_without_region_means_leaves_no_mean_in_any_region_and_keeps_what_varies_inside():
    gen = torch.Generator().manual_seed(11)
    grad = torch.randn(2, 4, 8, 8, generator=gen) + 3.0
    soft = torch.rand(2, 3, 8, 8, generator=gen)
    out = without_region_means(grad, soft)
    weights = soft / soft.sum(dim=1, keepdim=True)
    _near_zero(torch.einsum("bvhw,bchw->bvc", weights, out), float(grad.abs().sum(dim=(-2, -1)).max()))
    assert differs(out, torch.zeros_like(out))
    # hard regions: a field constant on each region vanishes; one with zero mean on each region stays as it is
    hard = torch.zeros(1, 2, 8, 8)
    hard[0, 0, :, :3] = 1.0
    hard[0, 1, :, 3:] = 1.0
    constant = (5.0 * hard[:, :1] - 2.0 * hard[:, 1:]).expand(1, 4, 8, 8)
    _near_zero(without_region_means(constant, hard), 5.0)
    varying = torch.randn(1, 4, 8, 8, generator=gen)
    region_means = torch.einsum("bvhw,bchw->bvc", hard, varying) / hard.sum(dim=(-2, -1))[..., None]
    varying = varying - torch.einsum("bvhw,bvc->bchw", hard, region_means)
    close(without_region_means(varying, hard), varying, rel=1e-5)
    # no masks yet: the whole picture is one region
    close(without_region_means(grad, None), grad - grad.mean(dim=(-2, -1), keepdim=True), rel=1e-6)


def test_update_keeps_means_moves_no_region_of_the_previous_steps_masks(tiny_unet):
    """``update_keeps_means``: the step's latent update has zero mean (per channel) over each region of
    the masks the previous step fused with; over the whole picture before any masks; the paper's update
    (the default) does move the regions' means."""
    specs = [TokenMapSpec(v, p, c, v == c + 1) for v in (0, 1, 2) for p, c in ((2, 0), (5, 1))]
    gen = torch.Generator().manual_seed(12)
    ctx = torch.randn(3, 77, 32, generator=gen)
    sigma = torch.tensor([2.0])

    def row_model(x_rows, layout: RowLayout):
        return tiny_unet(x_rows * 0.45, torch.full((len(layout),), 600.0), context=ctx[layout.variant])

    x0 = torch.randn(1, 4, 16, 16, generator=gen) * 2.0
    moves = {}
    for keep in (False, True):
        settings = EngineSettings(schedule=Schedule(refine_iterations=0), update_keeps_means=keep)
        with CLoRAEngine(tiny_unet, [[], [], []], specs, settings) as engine:
            x = x0.clone()
            engine.step(x, 0, 10, SigmaSpace(sigma), row_model)
            first_move = x - x0
            masks = engine.last_output.masks
            before = x.clone()
            engine.step(x, 1, 10, SigmaSpace(sigma), row_model)
            assert engine.records[1].iterations == 1
        weights = masks / masks.sum(dim=1, keepdim=True)
        moves[keep] = (torch.einsum("bvhw,bchw->bvc", weights, x - before), first_move.mean(dim=(-2, -1)),
                       (x - before).abs().max())
    region_means, whole_mean, size = moves[True]
    assert float(size) > 0
    _near_zero(region_means, 10 * 16 * 16 * float(size))
    _near_zero(whole_mean, 10 * float(size))
    paper_sums, _, paper_size = moves[False]
    assert float(paper_sums.abs().max()) > 1e-3 * 16 * 16 * float(paper_size)  # the paper's update moves them


def test_soft_edges_from_switches_the_fusing_masks_to_bilinear_edges_late(tiny_unet):
    """``soft_edges_from: f``: the masks fusing steps before round(f * total) are the settings' own (here
    nearest: whole 0/1 blocks), those from then on the same maps' masks grown with bilinear edges."""
    from clora_ext.masks import MaskUpsampling

    specs = [TokenMapSpec(v, p, c, v == c + 1) for v in (0, 1, 2) for p, c in ((2, 0), (5, 1))]
    gen = torch.Generator().manual_seed(13)
    ctx = torch.randn(3, 77, 32, generator=gen)
    x = torch.randn(1, 4, 16, 16, generator=gen)

    def row_model(x_rows, layout: RowLayout):
        return tiny_unet(x_rows * 0.45, torch.full((len(layout),), 600.0), context=ctx[layout.variant])

    sigma = SigmaSpace(torch.tensor([2.0]))
    with CLoRAEngine(tiny_unet, [[], [], []], specs, EngineSettings(soft_edges_from=0.5)) as engine:
        early = engine.step(x.clone(), 4, 10, sigma, row_model, allow_update=False)
        late = engine.step(x.clone(), 5, 10, sigma, row_model, allow_update=False)
        assert torch.equal(early.masks, engine.masks(early.maps, (16, 16)))
        assert torch.equal(late.masks, engine.masks(late.maps, (16, 16), upsampling=MaskUpsampling.BILINEAR))
    assert set(early.masks.unique().tolist()) <= {0.0, 1.0}
    assert ((late.masks > 0) & (late.masks < 1)).any()  # soft edges
    with CLoRAEngine(tiny_unet, [[], [], []], specs, EngineSettings(soft_edges_from=1.0)) as engine:
        last = engine.step(x.clone(), 9, 10, sigma, row_model, allow_update=False)
    assert set(last.masks.unique().tolist()) <= {0.0, 1.0}  # 1: hard edges to the last step


def test_own_loss_gradient_stops_the_gradient_on_every_map_outside_its_concepts_variant(tiny_unet):
    """``loss_gradient: own``: the loss is the same number, its gradient reaches the latent only through each
    concept's maps in its own variant (the base prompt's and the other LoRAs' maps are fixed anchors), and
    the functional (torch.func) gradient pass agrees with autograd."""
    from clora_ext.loss import LossGradient, contrastive_loss, with_gradient_through

    maps = torch.rand(4, 3, 3, generator=torch.Generator().manual_seed(5), requires_grad=True)
    own = torch.tensor([True, False, True, False])
    labels = torch.tensor([0, 0, 1, 1])
    (through_own,) = torch.autograd.grad(contrastive_loss(with_gradient_through(maps, own, "own"), labels), maps)
    (through_all,) = torch.autograd.grad(contrastive_loss(with_gradient_through(maps, own, "all"), labels), maps)
    assert torch.equal(through_own[~own], torch.zeros_like(through_own[~own]))
    close(through_own[own], through_all[own])  # an own map's gradient does not depend on the others' being stopped
    assert differs(through_all[~own], torch.zeros_like(through_all[~own]))

    specs = [TokenMapSpec(v, p, c, v == c + 1) for v in (0, 1, 2) for p, c in ((2, 0), (5, 1))]
    gen = torch.Generator().manual_seed(6)
    ctx = torch.randn(3, 77, 32, generator=gen)
    x0 = torch.randn(1, 4, 16, 16, generator=gen)

    def row_model(x_rows, layout: RowLayout):
        return tiny_unet(x_rows * 0.45, torch.full((len(layout),), 600.0), context=ctx[layout.variant])

    results = {}
    for rule in LossGradient:
        for functional in (False, True):
            with CLoRAEngine(tiny_unet, [[], [], []], specs, EngineSettings(loss_gradient=rule),
                             functional_gradient=functional) as engine:
                results[rule, functional] = engine.loss_and_gradient(x0, row_model)
    (loss_all, grad_all), (loss_own, grad_own) = results[LossGradient.ALL, False], results[LossGradient.OWN, False]
    close(torch.tensor(loss_own), torch.tensor(loss_all))
    assert torch.isfinite(grad_own).all() and grad_own.abs().sum() > 0
    assert differs(grad_own, grad_all)
    close(results[LossGradient.OWN, True][1], grad_own, 1e-4)


def test_a_mask_method_given_to_the_engine_makes_the_masks_it_fuses_with(tiny_unet):
    """``mask_method`` (masks.MaskMethod) replaces how the maps become masks: here every pixel goes to
    variant 2, so the fused cond prediction is that variant's own; the shipped method (``step_masks``)
    is the default and gives the engine's ``masks`` at a masked step."""
    from clora_ext.masks import step_masks

    specs = [TokenMapSpec(v, p, c, v == c + 1) for v in (0, 1, 2) for p, c in ((2, 0), (5, 1))]
    gen = torch.Generator().manual_seed(14)
    ctx = torch.randn(3, 77, 32, generator=gen)
    x = torch.randn(1, 4, 16, 16, generator=gen)

    def row_model(x_rows, layout: RowLayout):
        return tiny_unet(x_rows * 0.45, torch.full((len(layout),), 600.0), context=ctx[layout.variant])

    calls = []

    def all_to_variant_2(maps, token_maps, variants, latent_hw, step, total_steps, settings):
        calls.append((tuple(maps.shape), variants, tuple(latent_hw), step, total_steps))
        masks = torch.zeros(maps.shape[0], variants, *latent_hw)
        masks[:, 2] = 1.0
        return masks

    sigma = SigmaSpace(torch.tensor([2.0]))
    with CLoRAEngine(tiny_unet, [[], [], []], specs, EngineSettings(), mask_method=all_to_variant_2) as engine:
        out = engine.step(x.clone(), 3, 10, sigma, row_model, allow_update=False)
    assert calls == [((1, len(specs), *out.maps.shape[-2:]), 3, (16, 16), 3, 10)]
    with torch.no_grad():
        own = tiny_unet(x * 0.45, torch.full((1,), 600.0), context=ctx[2:3])
    close(out.cond, own, 1e-5)
    with CLoRAEngine(tiny_unet, [[], [], []], specs, EngineSettings()) as engine:
        assert engine.mask_method is step_masks
        shipped = engine.step(x.clone(), 3, 10, sigma, row_model, allow_update=False)
        assert torch.equal(shipped.masks, engine.masks(shipped.maps, (16, 16)))
    assert differs(shipped.cond, own)


def test_keeps_means_others_only_removes_the_means_of_the_other_variants_path_alone(tiny_unet):
    """``update_keeps_means`` with ``keeps_means_others_only``: the update is the gradient through the
    own-variant maps, whole, plus the gradient through the other maps less its mean (over the whole
    picture before any masks), each computed here on its own; the functional pass agrees."""
    from clora_ext.loss import LossGradient

    specs = [TokenMapSpec(v, p, c, v == c + 1) for v in (0, 1, 2) for p, c in ((2, 0), (5, 1))]
    gen = torch.Generator().manual_seed(15)
    ctx = torch.randn(3, 77, 32, generator=gen)
    sigma = torch.tensor([2.0])

    def row_model(x_rows, layout: RowLayout):
        return tiny_unet(x_rows * 0.45, torch.full((len(layout),), 600.0), context=ctx[layout.variant])

    x0 = torch.randn(1, 4, 16, 16, generator=gen) * 2.0
    schedule = Schedule(refine_iterations=0)
    with CLoRAEngine(tiny_unet, [[], [], []], specs, EngineSettings(schedule=schedule)) as engine:
        _, whole = engine.loss_and_gradient(x0, row_model)
    with CLoRAEngine(tiny_unet, [[], [], []], specs, EngineSettings(loss_gradient=LossGradient.OWN)) as engine:
        _, own = engine.loss_and_gradient(x0, row_model)
    others = whole - own
    expected = x0.clone()
    apply_update(expected, own + others - others.mean(dim=(-2, -1), keepdim=True), 20.0, SigmaSpace(sigma))
    settings = EngineSettings(schedule=schedule, update_keeps_means=True, keeps_means_others_only=True)
    for functional in (False, True):
        with CLoRAEngine(tiny_unet, [[], [], []], specs, settings, functional_gradient=functional) as engine:
            x = x0.clone()
            engine.step(x, 0, 10, SigmaSpace(sigma), row_model)
            assert engine.records[0].iterations == 1
        close(x, expected, 1e-4)
    whole_kept = x0.clone()
    apply_update(whole_kept, whole - whole.mean(dim=(-2, -1), keepdim=True), 20.0, SigmaSpace(sigma))
    assert differs(x, whole_kept, 1e-4)  # not the plain keeps_means (the own path keeps its small mean)


def test_keeps_means_from_three_subjects_turns_on_keeps_means_others_only(tiny_unet):
    """``keeps_means_from`` (3 by default): with three content subjects the update is the one of
    ``update_keeps_means`` with ``keeps_means_others_only``; 0 keeps the paper's update; two subjects keep it
    too; an explicit ``update_keeps_means`` is left as set."""
    gen = torch.Generator().manual_seed(16)
    ctx = torch.randn(4, 77, 32, generator=gen)
    sigma = SigmaSpace(torch.tensor([2.0]))
    schedule = Schedule(refine_iterations=1)

    def row_model(x_rows, layout: RowLayout):
        return tiny_unet(x_rows * 0.45, torch.full((len(layout),), 600.0), context=ctx[layout.variant])

    def stepped(subjects: int, **settings) -> torch.Tensor:
        specs = [TokenMapSpec(v, p, c, v == c + 1) for v in range(subjects + 1)
                 for p, c in zip((2, 5, 8)[:subjects], range(subjects))]
        x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3)) * 2.0
        with CLoRAEngine(tiny_unet, [[]] * (subjects + 1), specs, EngineSettings(schedule=schedule, **settings)) as engine:
            engine.step(x, 0, 10, sigma, row_model)
            engine.step(x, 1, 10, sigma, row_model)  # the second step has the first one's masks as regions
            assert engine.records[0].iterations == 2
        return x

    three_default = stepped(3)
    close(three_default, stepped(3, update_keeps_means=True, keeps_means_others_only=True), 1e-6)
    paper = stepped(3, keeps_means_from=0)
    assert differs(three_default, paper, 1e-4)
    close(stepped(3, keeps_means_from=4), paper, 1e-6)
    close(stepped(3, update_keeps_means=True), stepped(3, update_keeps_means=True, keeps_means_from=0), 1e-6)
    close(stepped(2), stepped(2, keeps_means_from=0), 1e-6)
