"""The core leaves the model exactly as it found it: success, faults, interrupts, NaNs, OOM."""

from __future__ import annotations

import contextlib

import pytest
import torch

from clora_ext.concepts import Concept
from clora_ext.devtools.loras import write_kohya_lora
from clora_ext.devtools.pipeline import ConceptLoRA, TinySD, generate
from clora_ext.devtools.tiny_sd import build_tiny_text_encoder, build_tiny_unet
from clora_ext.engine import CLoRAEngine, EngineHooks, EngineSettings, RowLayout
from clora_ext.optimiser import LOSS_SCALE_FACTOR
from clora_ext.records import StepRecord
from clora_ext.lora_file import map_lora, read_lora_file
from clora_ext.tokens import TokenMapSpec
from clora_ext.update import DDPMSpace, Schedule

SETTINGS = EngineSettings(schedule=Schedule(refine_iterations=2))
PLAIN = dict(seed=9, steps=4, latent_hw=(16, 16))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # a private model: these tests inject faults into it
    unet, te = build_tiny_unet(seed=5), build_tiny_text_encoder(seed=5)
    d = tmp_path_factory.mktemp("faults")
    concepts = [
        ConceptLoRA(
            Concept(subject, f"lora_{subject}"),
            map_lora(read_lora_file(write_kohya_lora(d / f"{subject}.safetensors", unet, te, seed=i)), unet, te),
        )
        for i, subject in enumerate(("cat", "dog"))
    ]
    model = TinySD(unet, te)
    reference, _ = generate(model, "a cat and a dog", **PLAIN)
    return model, concepts, reference


def fingerprint(model: TinySD) -> dict:
    modules = [*model.unet.modules(), *model.text_encoder.modules()]
    return {
        "weights": [hash(t.detach().numpy().tobytes()) for m in (model.unet, model.text_encoder) for t in m.state_dict().values()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules),
        "overrides": sum("forward" in m.__dict__ for m in modules),
        "checkpoint_flags": [getattr(m, "checkpoint", None) for m in modules],
        "requires_grad": [p.requires_grad for p in model.unet.parameters()],
    }


@contextlib.contextmanager
def fault(model: TinySD, when, action):
    """Inject ``action(x)`` into the UNet's first block on calls where ``when(call_index)`` holds."""
    calls = [0]

    def pre_hook(module, args):
        calls[0] += 1
        if when(calls[0], torch.is_grad_enabled()):
            return action(*args)
        return None

    handle = model.unet.input_blocks[0].register_forward_pre_hook(pre_hook)
    try:
        yield calls
    finally:
        handle.remove()


def boom(*args):
    raise RuntimeError("injected fault")


def check_clean(model, before, reference):
    assert fingerprint(model) == before
    again, _ = generate(model, "a cat and a dog", **PLAIN)
    assert torch.equal(again, reference)  # the next plain generation is byte-identical


def test_success_leaves_no_trace(setup):
    model, concepts, reference = setup
    before = fingerprint(model)
    x, _ = generate(model, "a cat and a dog", concepts=concepts, settings=SETTINGS, **PLAIN)
    assert torch.isfinite(x).all()
    check_clean(model, before, reference)


@pytest.mark.parametrize("in_gradient_pass", [True, False])
def test_fault_mid_sampling_leaves_no_trace(setup, in_gradient_pass):
    model, concepts, reference = setup
    before = fingerprint(model)
    with fault(model, lambda n, grad: n > 3 and grad == in_gradient_pass, boom):
        with pytest.raises(RuntimeError, match="injected fault"):
            generate(model, "a cat and a dog", concepts=concepts, settings=SETTINGS, **PLAIN)
    check_clean(model, before, reference)


def test_interrupt_leaves_no_trace(setup):
    model, concepts, reference = setup
    before = fingerprint(model)
    hooks = EngineHooks(interrupted=lambda: True)
    x, engine = generate(model, "a cat and a dog", concepts=concepts, settings=SETTINGS, hooks=hooks, **PLAIN)
    assert all(r.iterations == 0 for r in engine.records) and torch.isfinite(x).all()
    check_clean(model, before, reference)


def test_non_finite_gradient_skips_the_update_and_warns_once(setup):
    model, concepts, reference = setup
    before = fingerprint(model)
    warnings: list[str] = []
    hooks = EngineHooks(warn=warnings.append)
    with fault(model, lambda n, grad: grad, lambda x, *rest: (x * float("nan"), *rest)):
        x, engine = generate(model, "a cat and a dog", concepts=concepts, settings=SETTINGS, hooks=hooks, **PLAIN)
    assert torch.isfinite(x).all()  # never a NaN image
    assert all(r.iterations == 0 for r in engine.records)
    assert len(warnings) == 1 and "non-finite" in warnings[0]
    check_clean(model, before, reference)


def test_out_of_memory_in_gradient_pass_skips_updates_and_warns(setup):
    model, concepts, reference = setup
    before = fingerprint(model)
    warnings: list[str] = []

    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    with fault(model, lambda n, grad: grad, oom):
        x, engine = generate(
            model, "a cat and a dog", concepts=concepts, settings=SETTINGS, hooks=EngineHooks(warn=warnings.append), **PLAIN
        )
    assert torch.isfinite(x).all()
    assert not engine.optimiser.enabled
    # the forward was retried in halves down to one row, then the updates were given up
    assert len(warnings) == 2 and "smaller chunks" in warnings[0] and "gradient pass" in warnings[1]
    assert engine.max_rows == 1
    check_clean(model, before, reference)


def test_a_fused_pass_out_of_memory_is_run_again_in_halves_with_the_same_result(setup):
    model, concepts, reference = setup
    before = fingerprint(model)
    plain, _ = generate(model, "a cat and a dog", concepts=concepts, settings=SETTINGS, allow_update=False, **PLAIN)
    warnings: list[str] = []
    sizes: list[int] = []

    def pre_hook(module, args):
        sizes.append(args[0].shape[0])
        if args[0].shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    handle = model.unet.input_blocks[0].register_forward_pre_hook(pre_hook)
    try:
        x, engine = generate(model, "a cat and a dog", concepts=concepts, settings=SETTINGS, allow_update=False,
                             hooks=EngineHooks(warn=warnings.append), **PLAIN)
    finally:
        handle.remove()
    assert sizes[:3] == [6, 3, 2]  # 2 x 3 rows; then halves until they fit
    assert engine.max_rows == 2 and max(sizes[3:]) == 2  # the cap stays for the later steps
    assert len(warnings) == 1 and "smaller chunks" in warnings[0]
    # the same computation; convolutions over other batch sizes round differently (1e-4 after 4 steps)
    torch.testing.assert_close(x, plain, rtol=1e-3, atol=1e-3)
    check_clean(model, before, reference)


def test_a_gradient_that_vanishes_is_reported_instead_of_a_silent_non_update(setup):
    model, concepts, reference = setup
    before = fingerprint(model)
    warnings: list[str] = []
    # the gradient pass keeps its graph, but every gradient reaching the latent is exactly zero
    with fault(model, lambda n, grad: grad, lambda x, *rest: (x * 0 + x.detach(), *rest)):
        x, engine = generate(model, "a cat and a dog", concepts=concepts, settings=SETTINGS,
                             hooks=EngineHooks(warn=warnings.append), **PLAIN)
    assert all(r.iterations == 0 for r in engine.records)
    assert len(warnings) == 1 and "gradient is zero" in warnings[0]
    check_clean(model, before, reference)


class _Shrink(torch.autograd.Function):
    """Identity forward; the backward scales the (fp16) gradient by 2^-20, so it flushes to zero."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 2.0**-20


def test_a_half_precision_gradient_that_flushes_to_zero_is_recovered_by_loss_scaling():
    """fp16 (under autocast, as the host runs it) with a gradient too small for fp16: the loss is
    scaled up until it survives, and the update takes the fp32 model's direction."""
    specs = [TokenMapSpec(v, p, c, v == c + 1) for v in (0, 1, 2) for p, c in ((2, 0), (5, 1))]
    ctx = torch.randn(3, 77, 32, generator=torch.Generator().manual_seed(1))
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    moves, scales = {}, {}
    for dtype in (torch.float32, torch.float16):
        unet = build_tiny_unet(seed=3).to(dtype)
        for module in unet.modules():  # CPU autocast runs norms in fp32 (as A1111's fp16 models keep them)
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                module.float()
        half = dtype == torch.float16

        def row_model(x_rows, layout: RowLayout, unet=unet, half=half):
            with torch.autocast("cpu", dtype=torch.float16, enabled=half):
                x_in = _Shrink.apply(x_rows.half()) if half else x_rows
                return unet(x_in, torch.full((len(layout),), 600.0), context=ctx[layout.variant])

        with CLoRAEngine(unet, [[], [], []], specs, EngineSettings()) as engine:
            moved = x.clone()
            engine.optimiser.run(moved, DDPMSpace(), lambda z, images: engine.differentiable_loss(z, row_model, images), 1, StepRecord(0),
                                 engine.settings)
            moves[dtype], scales[dtype] = (moved - x).flatten(), engine.optimiser.loss_scale
    assert scales == {torch.float32: 1.0, torch.float16: LOSS_SCALE_FACTOR}  # one retry, scaled up
    cosine = torch.nn.functional.cosine_similarity(moves[torch.float32], moves[torch.float16], dim=0)
    assert moves[torch.float16].abs().sum() > 0 and cosine > 0.9
