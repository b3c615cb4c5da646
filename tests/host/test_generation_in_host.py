"""The glue in a generation as the host runs it (fake host, 1.8.0 and 1.10.1): on, off, refused,
interrupted, samplers, img2img and inpainting, low-VRAM batching."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from modules import processing, prompt_parser, shared

from clora_ext.a1111 import runtime
from clora_ext.webui import passes, pipeline
from clora_ext.webui.infotext import KEY

from driver import clora, generate

PROMPT = "a cat and a dog"
PAIR = (("cat", "cat_lora"), ("dog", "dog_lora"))


def txt2img(**kw) -> processing.StableDiffusionProcessingTxt2Img:
    return processing.StableDiffusionProcessingTxt2Img(**{"prompt": PROMPT, "steps": 4, "seed": 3, **kw})


def test_off_is_the_host_unchanged(fake_host):
    plain = generate(txt2img(), with_script=False).images
    for args in [(), ({"enabled": False},), (False,), (clora(*PAIR, enabled=False),)]:
        p = txt2img(script_args=args)
        images = generate(p).images
        assert all(torch.equal(a, b) for a, b in zip(plain, images))
        assert KEY not in p.extra_generation_params


def test_on_composes_and_cleans_up(fake_host, capsys):
    plain = generate(txt2img(), with_script=False).images[0]
    p = txt2img(script_args=(clora(*PAIR),))
    out = generate(p).images[0]
    assert p.closed
    assert not torch.allclose(out, plain, atol=1e-3)
    assert KEY in p.extra_generation_params
    console = capsys.readouterr().out
    assert "CLoRA: 4 model steps" in console  # the summary of the pass: updates ran
    assert runtime.generations.serving(p) is None  # closed when the host closed p


def test_a_host_error_inside_a_pass_answers_one_line_and_the_next_request_runs(fake_host, monkeypatch, capsys):
    """An unexpected error inside a CLoRA pass (here the variant encoding failing once, as a changed
    host function would) answers 500 with one line naming CLoRA and the host; the traceback goes to
    the console; the pass is closed and the next request runs as before."""
    from clora_ext.a1111 import encoding

    expected = generate(txt2img(script_args=(clora(*PAIR),))).images[0]
    encode = encoding.encode
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise TypeError("get_learned_conditioning() takes from 3 to 4 positional arguments but 5 were given")
        return encode(*args, **kwargs)

    monkeypatch.setattr(encoding, "encode", failing)
    capsys.readouterr()
    p = txt2img(script_args=(clora(*PAIR),))
    with pytest.raises(pipeline.HostError) as failed:
        generate(p)
    assert failed.value.status_code == 500 and "\n" not in failed.value.detail
    assert failed.value.detail.startswith("CLoRA on AUTOMATIC1111")
    assert "failed: TypeError: get_learned_conditioning() takes from 3 to 4" in failed.value.detail
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    assert runtime.generations.serving(p) is None
    again = generate(txt2img(script_args=(clora(*PAIR),))).images[0]
    assert torch.equal(again, expected)


def test_batch_and_iterations(fake_host, capsys):
    p = txt2img(script_args=(clora(*PAIR),), batch_size=2, n_iter=2)
    images = generate(p).images
    assert len(images) == 4 and all(torch.isfinite(i).all() for i in images)
    assert capsys.readouterr().out.count("model steps") == 2  # one pass per batch


def test_a_refused_request_fails_with_422_and_leaves_nothing(fake_host):
    p = txt2img(script_args=(clora(("cat", "nope"), ("dog", "dog_lora")),))
    with pytest.raises(pipeline.RequestRefused) as refused:
        generate(p)
    assert refused.value.status_code == 422 and "'nope' is not installed" in refused.value.detail
    assert p.closed and runtime.generations.serving(p) is None


def test_a_subject_missing_from_the_prompt_is_refused(fake_host):
    p = txt2img(prompt="a cat and a bird", script_args=(clora(*PAIR),))
    with pytest.raises(pipeline.RequestRefused, match="dog"):
        generate(p)


def test_interrupt_ends_sampling_and_the_generation(fake_host, fake_model):
    calls = []

    def count(module, args):
        calls.append(1)
        if len(calls) == 3:  # inside the first step's refinement
            shared.state.interrupted = True

    handle = fake_model.model.diffusion_model.register_forward_pre_hook(count)
    try:
        p = txt2img(script_args=(clora(*PAIR),), steps=8)
        generate(p)  # the host catches the interrupt and returns its last latent
    finally:
        handle.remove()
    assert len(calls) == 3  # the gradient pass stopped at its next block, nothing ran after
    assert runtime.generations.serving(p) is None


@pytest.mark.parametrize("sampler, note", [
    ("Heun", "calls the model twice per step"),
    ("UniPC", "rebuilds each latent"),
    ("DDIM", "the sampler runs 3 model steps for 4 steps"),
])
def test_sampler_notes_say_why(fake_host, sampler, note):
    p = txt2img(script_args=(clora(*PAIR),), sampler_name=sampler)
    generate(p)
    assert note in p.extra_generation_params[KEY]


def test_ddim_cfgpp_takes_updates_where_the_host_has_it(fake_host, host_version, capsys):
    if host_version == "1.8.0":
        pytest.skip("DDIM CFG++ is new in 1.10")
    generate(txt2img(script_args=(clora(*PAIR),), sampler_name="DDIM CFG++"))
    assert "latent updates in" in capsys.readouterr().out


def _unet_rows(model):
    sizes = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    return sizes, handle


def test_low_vram_batching_and_long_negative_prompt(fake_host, fake_model):
    shared.opts.batch_cond_uncond = False
    negative = ", ".join(["blurry"] * 60)  # 2 chunks against the prompt's 1
    p = txt2img(script_args=(clora(*PAIR),), negative_prompt=negative, batch_size=2)
    sizes, handle = _unet_rows(fake_model)
    try:
        out = generate(p).images[0]
    finally:
        handle.remove()
    assert torch.isfinite(out).all()
    assert p.sampler.model_wrap_cfg.calls[:2] == [2, 2]  # the host asked for cond and uncond apart
    assert max(sizes) == 2 * 3  # and CLoRA, too, never ran more than one half (2 images x 3 variants)


def test_a_row_cap_in_settings_limits_every_unet_call(fake_host, fake_model):
    shared.opts.clora_max_rows = 2
    sizes, handle = _unet_rows(fake_model)
    try:
        generate(txt2img(script_args=(clora(*PAIR),)))
    finally:
        handle.remove()
    assert max(sizes) == 2


def img2img(**kw) -> processing.StableDiffusionProcessingImg2Img:
    init = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    return processing.StableDiffusionProcessingImg2Img(**{"prompt": PROMPT, "steps": 8, "seed": 3,
                                                          "init_latent": init, **kw})


def test_img2img_counts_the_steps_that_run(fake_host, capsys):
    p = img2img(script_args=(clora(*PAIR),), denoising_strength=0.5)  # 4 of 8 steps, 5 model calls
    generate(p)
    console = capsys.readouterr().out
    # counted over the 5 steps that run, not the 8 asked for: updates in round(0.5 * 5) = 2 steps,
    # both refined (0 and round(0.2 * 5) = 1; 2 iterations each), and 0.4 * 5 = 2 is past them
    assert "CLoRA: 5 model steps, 6 latent updates in 2 steps" in console
    assert "refine at 0.4: at or past the update fraction" in p.extra_generation_params[KEY]
    assert KEY in p.extra_generation_params


def test_inpainting_updates_only_inside_the_mask(fake_host, monkeypatch):
    keep = torch.zeros((4, 8, 8))
    keep[:, :, :4] = 1  # left half kept, right half repainted
    p = img2img(script_args=(clora(*PAIR),), steps=4, denoising_strength=1.0, mask=keep, nmask=1 - keep)
    moves = []
    step = passes.fused_step

    def spy(engine, inner, rows, x, *args, **kwargs):
        before = x.clone()
        out = step(engine, inner, rows, x, *args, **kwargs)
        moves.append((x - before).abs())
        return out

    monkeypatch.setattr(passes, "fused_step", spy)
    generate(p)
    assert moves[0][..., 4:].sum() > 0  # the update moved the repainted half
    assert all(float(m[..., :4].max()) == 0 for m in moves)  # and never the kept half


def test_instruct_pix2pix_is_refused(fake_host, fake_model, monkeypatch):
    monkeypatch.setattr(type(fake_model), "cond_stage_key", "edit")
    with pytest.raises(pipeline.RequestRefused, match="instruct-pix2pix"):
        generate(txt2img(script_args=(clora(*PAIR),)))


def test_an_enabled_controlnet_unit_is_refused(fake_host):
    controlnet = SimpleNamespace(title=lambda: "ControlNet", args_from=1, args_to=3)
    p = txt2img(script_args=(clora(*PAIR), {"enabled": False}, {"enabled": True}))
    p.scripts = SimpleNamespace(alwayson_scripts=[controlnet])
    with pytest.raises(pipeline.RequestRefused, match="ControlNet unit 1 is enabled"):
        generate(p)


def test_conds_marked_by_controlnet_are_refused_and_the_hosts_cache_forgotten(fake_host, monkeypatch):
    encode = prompt_parser.get_learned_conditioning

    def marked(*args, **kwargs):  # what ControlNet does to the host's conds before sampling
        out = encode(*args, **kwargs)
        return [[c._replace(cond=torch.cat([torch.full_like(c.cond[:1], 1024.0), c.cond])) for c in s] for s in out]

    monkeypatch.setattr(prompt_parser, "get_learned_conditioning", marked)
    processing.StableDiffusionProcessing.cached_c = ["marked", "conds"]
    with pytest.raises(pipeline.RequestRefused, match="ControlNet is active"):
        generate(txt2img(script_args=(clora(*PAIR),)))
    assert processing.StableDiffusionProcessing.cached_c == [None, None]


def test_the_refiner_switch_is_refused(fake_host):
    p = txt2img(script_args=(clora(*PAIR),))
    p.refiner_checkpoint = "sd_xl_refiner_1.0"
    with pytest.raises(pipeline.RequestRefused, match="refiner switch is not supported"):
        generate(p)
