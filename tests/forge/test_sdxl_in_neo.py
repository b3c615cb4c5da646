"""The Forge glue on an SDXL checkpoint (fake host, as each of the four hosts: Neo's and Forge 2.x's
SDXL model, and A1111's as reForge and Classic keep it): off is the host unchanged; on, every
variant row reaches the UNet with its own context, its own SDXL vector (``y``: pooled clip_g output
and the size embeddings) and its own LoRA; the families, checkpoints and switches CLoRA does not run
are refused with a message."""

from __future__ import annotations

import networks
import pytest
import torch
from modules import processing, prompt_parser

from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet
from backend.utils import load_torch_file
from clora_ext.webui.infotext import KEY
from clora_ext.webui.pipeline import RequestRefused

from driver import clora, generate
from tolerance import close, scaled

PROMPT = "a cat and a dog"
PAIR = (("cat", "cat_xl"), ("dog", "dog_xl"))


HOST_NAMES = {"neo": "Forge Neo", "forge2": "Forge 2.x", "reforge": "reForge", "classic": "Forge Classic"}


def txt2img(**kw) -> processing.StableDiffusionProcessingTxt2Img:
    return processing.StableDiffusionProcessingTxt2Img(**{"prompt": PROMPT, "steps": 4, "seed": 3, **kw})


@pytest.fixture
def sdxl_host(fake_sdxl_host):
    return fake_sdxl_host


def _record_full_calls(model, monkeypatch) -> dict:
    """The inputs and output of the last KModel call that ran every row of the batch (cond and uncond:
    the plain forward of a step, not the gradient pass over the cond rows)."""
    last = {}
    apply_model = model.kmodel.apply_model

    def recording(x, t, c_crossattn=None, **kwargs):
        out = apply_model(x, t, c_crossattn=c_crossattn, **kwargs)
        if x.shape[0] == 6:
            last.update(x=x.clone(), sigma=t.clone(), context=c_crossattn.clone(), y=kwargs["y"].clone(), out=out.clone())
        return out

    monkeypatch.setattr(model.kmodel, "apply_model", recording)
    return last


def _host_patches(model, lora: str) -> tuple[dict, dict]:
    """(UNet patches, CLIP patches) of a LoRA file, read by the host's own loader and key maps."""
    state = load_torch_file(networks.available_networks[lora].filename)
    objects = model.forge_objects_after_applying_lora
    unet, rest = load_lora(state, model_lora_keys_unet(objects.unet.model, {}))
    clip, _ = load_lora(rest, model_lora_keys_clip(objects.clip.cond_stage_model, {}))
    return unet, clip


def _host_encoding(model, clip_patches: dict | None, text: str, negative: bool, size: int) -> dict:
    """The host's own SDXL cond of ``text`` with a LoRA's CLIP patches on a clone of its CLIP patcher."""
    clip = model.forge_objects_after_applying_lora.clip
    if clip_patches:
        clip = clip.clone()
        clip.add_patches(clip_patches, 1.0)
    saved, model.forge_objects.clip = model.forge_objects.clip, clip
    try:
        with torch.inference_mode():
            cond = model.get_learned_conditioning(
                prompt_parser.SdConditioning([text], is_negative_prompt=negative, width=size, height=size))
    finally:
        model.forge_objects.clip = saved
    return {key: value[0] for key, value in cond.items()}


def test_off_is_the_host_unchanged(sdxl_host, fake_sdxl_model):
    plain = generate(txt2img(), with_script=False).images
    for args in [(), (clora(*PAIR, enabled=False),)]:
        p = txt2img(script_args=args)
        images = generate(p).images
        assert all(torch.equal(a, b) for a, b in zip(plain, images))
        assert KEY not in p.extra_generation_params


def test_each_variant_row_gets_its_own_context_vector_and_lora(sdxl_host, fake_sdxl_model, monkeypatch, capsys):
    """Each row of the last step's batched UNet call is checked against the host computing that row on
    its own: the variant's encoding (its LoRA's CLIP patches on the host's CLIP patcher; cond: the
    prompt, uncond: the negative prompt) as context and as ``y``, and the UNet with that LoRA merged by
    the host's own patcher. The 6 rows must be the 3 variants (no LoRA, cat_xl, dog_xl) x cond/uncond."""
    model = fake_sdxl_model
    plain = generate(txt2img(), with_script=False).images[0]
    last = _record_full_calls(model, monkeypatch)
    p = txt2img(script_args=(clora(*PAIR),))
    out = generate(p).images[0]
    assert torch.isfinite(out).all() and not torch.allclose(out, plain, atol=1e-3)
    assert '"lora":"cat_xl"' in p.extra_generation_params[KEY]
    assert "CLoRA: 4 model steps, 6 latent updates in 2 steps" in capsys.readouterr().out

    patches = {None: ({}, {}), **{lora: _host_patches(model, lora) for lora in ("cat_xl", "dog_xl")}}
    expected = {(lora, negative): _host_encoding(model, patches[lora][1], "" if negative else PROMPT, negative, p.width)
                for lora in patches for negative in (False, True)}
    # each LoRA's text-encoder patches change the pooled vector: the check below can tell the rows apart
    assert len({tuple(e["vector"].tolist()) for e in expected.values()}) == len(expected)
    apply_model = type(model.kmodel).apply_model
    seen = set()
    for row in range(6):
        matches = [key for key, e in expected.items() if torch.allclose(last["context"][row], e["crossattn"], **scaled(e["crossattn"]))]
        assert len(matches) == 1, f"row {row}: its context is no single variant's encoding"
        lora, negative = matches[0]
        seen.add(matches[0])
        vector = last["y"][row]
        close(vector, expected[matches[0]]["vector"]), f"row {row}: another row's vector"
        assert torch.allclose(vector[-6 * model.SIZE_WIDTH:], model.size_embedding(p.width, p.height))
        patcher = model.forge_objects_after_applying_lora.unet.clone()
        patcher.add_patches(patches[lora][0], 1.0)
        with torch.inference_mode(), patcher.patched():
            alone = apply_model(model.kmodel, last["x"][row:row + 1], last["sigma"][row:row + 1],
                                c_crossattn=last["context"][row:row + 1], y=last["y"][row:row + 1])
        close(last["out"][row], alone[0])  # its own LoRA's prediction
    assert seen == set(expected)


def test_the_hires_pass_carries_its_own_size_in_the_vector(sdxl_host, fake_sdxl_model, monkeypatch):
    last = _record_full_calls(fake_sdxl_model, monkeypatch)
    p = txt2img(script_args=(clora(*PAIR),), enable_hr=True, hr_second_pass_steps=2, denoising_strength=0.6)
    out = generate(p).images[0]
    assert out.shape == (4, 16, 16) and torch.isfinite(out).all()
    assert "hires pass: masks and routing only" in p.extra_generation_params[KEY]
    size = fake_sdxl_model.size_embedding(p.hr_upscale_to_x, p.hr_upscale_to_y)
    assert last["x"].shape[-1] == 16
    assert all(torch.allclose(y[-size.numel():], size) for y in last["y"])


def _refused(p) -> str:
    with pytest.raises(RequestRefused) as refused:
        generate(p)
    assert refused.value.status_code == 422
    return refused.value.detail


def test_an_sd1_lora_on_sdxl_is_refused(sdxl_host, fake_sdxl_model):
    detail = _refused(txt2img(script_args=(clora(("cat", "cat_lora"), ("dog", "dog_xl")),)))
    assert detail.startswith("CLoRA: LoRA 'cat_lora' does not fit the loaded SDXL model (layer ")
    assert detail.endswith("; it is made for another model family")
    assert fake_sdxl_model.kmodel.calls == []


def test_the_refiner_switch_is_refused(fake_sdxl_host, fake_sdxl_model):
    detail = _refused(txt2img(script_args=(clora(*PAIR),), refiner_checkpoint="refiner.safetensors"))
    assert detail == "CLoRA: the refiner switch is not supported; turn the refiner off to use CLoRA"
    assert fake_sdxl_model.kmodel.calls == []


@pytest.mark.parametrize("marks, family", [
    ({"is_sdxl": False, "is_sd2": True}, "SD2"),
    ({"is_sdxl": False}, "FakeNeoSDXLModel"),  # what the host's engine class is called: Flux, Chroma, ...
    ({"in_channels": 9}, "SDXL inpainting"),  # the UNet takes the masked image and the mask too
    ({"refiner": True}, "SDXL refiner"),  # only clip_g's engine
])
def test_other_checkpoints_are_refused_naming_what_runs(sdxl_host, fake_sdxl_model, monkeypatch, marks, family):
    for name, value in marks.items():
        if name == "in_channels":
            monkeypatch.setattr(fake_sdxl_model.diffusion_model, name, value)
        elif name == "refiner" and fake_sdxl_model.ldm_patched:  # its one text embedder is the cond_stage_model
            monkeypatch.setattr(fake_sdxl_model, "cond_stage_model", fake_sdxl_model.conditioner.embedders[1])
        elif name == "refiner":  # Neo and Forge 2.x: no clip_l engine
            monkeypatch.delattr(fake_sdxl_model, "text_processing_engine_l")
        else:
            monkeypatch.setattr(fake_sdxl_model, name, value, raising=False)
    detail = _refused(txt2img(script_args=(clora(*PAIR),)))
    host = HOST_NAMES[fake_sdxl_model.flavour]
    assert detail == (f"CLoRA on {host} runs SD1.x and SDXL checkpoints (not inpainting or refiner ones); this "
                      f"checkpoint is {family}. Load an SD1.x or SDXL checkpoint or turn CLoRA off")
    assert fake_sdxl_model.kmodel.calls == []
