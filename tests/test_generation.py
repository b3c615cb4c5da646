"""Whole CLoRA generations on the tiny model with a first-order sampler loop."""

from __future__ import annotations

import pytest
import torch

from clora_ext.concepts import Concept
from clora_ext.devtools.loras import write_kohya_lora, write_peft_lora
from clora_ext.devtools.pipeline import ConceptLoRA, TinySD, generate
from clora_ext.engine import EngineHooks, EngineSettings
from clora_ext.lora_file import map_lora, read_lora_file
from clora_ext.update import Schedule
from tolerance import close

SETTINGS = EngineSettings(schedule=Schedule(refine_iterations=3))


@pytest.fixture(scope="module")
def tiny(tiny_unet, tiny_text_encoder):
    return TinySD(tiny_unet, tiny_text_encoder)


@pytest.fixture(scope="module")
def concepts(tmp_path_factory, tiny_unet, tiny_text_encoder):
    d = tmp_path_factory.mktemp("gen")
    a = write_kohya_lora(d / "cat_lora.safetensors", tiny_unet, tiny_text_encoder, seed=11)
    b = write_peft_lora(d / "dog_lora.safetensors", tiny_unet, tiny_text_encoder, seed=12)
    return [
        ConceptLoRA(Concept("cat", "cat_lora", trigger="sks"), map_lora(read_lora_file(a), tiny_unet, tiny_text_encoder)),
        ConceptLoRA(Concept("dog", "dog_lora", te_weight=0.5), map_lora(read_lora_file(b), tiny_unet, tiny_text_encoder)),
    ]


def snapshot(*models):
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]


def no_hooks_left(*models) -> bool:
    return all(
        not (m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__) for model in models for m in model.modules()
    )


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_generation_is_finite_deterministic_and_leaves_the_model_untouched(tiny, concepts, sampler):
    before = snapshot(tiny.unet, tiny.text_encoder)
    kwargs = dict(seed=3, steps=6, sampler=sampler, latent_hw=(16, 24), batch_size=2, concepts=concepts, settings=SETTINGS)
    first, engine = generate(tiny, "a cat and a dog in a garden", "blurry", **kwargs)
    second, _ = generate(tiny, "a cat and a dog in a garden", "blurry", **kwargs)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    assert no_hooks_left(tiny.unet, tiny.text_encoder)
    after = snapshot(tiny.unet, tiny.text_encoder)
    for b, a in zip(before, after):
        assert all(torch.equal(v, a[k]) for k, v in b.items())
    # updates ran in the first half, with refinement at step 0
    assert engine.records[0].iterations >= 1 and engine.records[-1].iterations == 0
    plain, _ = generate(tiny, "a cat and a dog in a garden", "blurry", seed=3, steps=6, sampler=sampler, latent_hw=(16, 24), batch_size=2)
    assert not torch.allclose(plain, first)  # CLoRA did change the image


def test_refinement_lowers_the_loss_and_reports_progress(tiny, concepts):
    progress: list[tuple[int, int]] = []
    hooks = EngineHooks(on_refine=lambda i, n: progress.append((i, n)))
    settings = EngineSettings(schedule=Schedule(refine_iterations=4), refine_tolerance=None)
    _, engine = generate(tiny, "a cat and a dog", seed=5, steps=4, concepts=concepts, settings=settings, hooks=hooks)
    first = engine.records[0]
    assert first.iterations == 5 and progress[:4] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert first.loss_after < first.losses[0]


def test_interrupt_stops_refinement_at_once(tiny, concepts):
    calls = []
    hooks = EngineHooks(on_refine=lambda i, n: calls.append(i), interrupted=lambda: len(calls) >= 2)
    settings = EngineSettings(schedule=Schedule(refine_iterations=10), refine_tolerance=None)
    _, engine = generate(tiny, "a cat and a dog", seed=5, steps=2, concepts=concepts, settings=settings, hooks=hooks)
    assert engine.records[0].iterations == 2


def test_without_updates_masks_and_fusion_still_apply(tiny, concepts):
    x, engine = generate(tiny, "a cat and a dog", seed=1, steps=4, concepts=concepts, allow_update=False)
    assert all(r.iterations == 0 for r in engine.records)
    assert torch.isfinite(x).all()


def test_long_prompt_spanning_two_chunks(tiny, concepts):
    prompt = ", ".join(["a very detailed painting of a quiet harbour at dawn"] * 8) + ", a cat and a dog"
    x, engine = generate(tiny, prompt, seed=2, steps=2, concepts=concepts, settings=SETTINGS)
    assert torch.isfinite(x).all()
    assert max(s.position for s in engine.token_maps) > 77


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_refinement_decisions_are_made_per_image(tiny, concepts, sampler):
    """Image 0 of a batch ends where it ends alone: its stops and take-backs depend on its own loss only."""
    settings = EngineSettings(schedule=Schedule(refine_iterations=8), refine_tolerance=1e-2)
    kwargs = dict(seed=4, steps=4, sampler=sampler, latent_hw=(16, 16), concepts=concepts, settings=settings)
    batch, engine = generate(tiny, "a cat and a dog", batch_size=3, **kwargs)
    alone, alone_engine = generate(tiny, "a cat and a dog", batch_size=1, **kwargs)
    close(batch[:1], alone, 1e-4)
    first = engine.records[0]
    assert len({len(v) for v in first.image_losses.values()}) > 1  # the images stopped at different passes
    assert first.image_losses[0] == pytest.approx(alone_engine.records[0].image_losses[0], rel=1e-4)


def test_a_long_negative_prompt_leaves_the_variants_at_their_own_length(tiny, concepts):
    """With LoRAs at weight 0 and no triggers every variant predicts what the plain prompt does, so
    CLoRA without updates must give the plain picture, also beside a 2-chunk negative prompt (the
    host runs the two lengths apart; padding the prompt with empty chunks would change it)."""
    silent = [ConceptLoRA(Concept(c.concept.subject, c.concept.lora, weight=0.0, te_weight=0.0), c.lora) for c in concepts]
    negative = ", ".join(["blurry, low quality, jpeg artefacts, watermark"] * 8)
    assert len(tiny.tokenizer.chunks(negative)) == 2
    kwargs = dict(seed=4, steps=3, latent_hw=(16, 16))
    plain, _ = generate(tiny, "a cat and a dog", negative, **kwargs)
    fused, _ = generate(tiny, "a cat and a dog", negative, concepts=silent, allow_update=False, **kwargs)
    close(plain, fused, 1e-4)  # latents reach ~100: float noise of batching
