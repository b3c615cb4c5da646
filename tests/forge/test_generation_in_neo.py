"""The Neo glue in a generation as Forge Neo runs it (fake host): off, on, the row order it serves,
the gradient inside inference mode, refusals, interrupt, hires, img2img, row cap, LoRA kinds."""

from __future__ import annotations

import contextlib

import pytest
import torch
from modules import processing, shared

from clora_ext.webui.infotext import KEY
from clora_ext.webui import passes
from clora_ext.webui.pipeline import RequestRefused
from clora_ext.forge import runtime

from driver import clora, generate
from tolerance import LAYER, close, differs

PROMPT = "a cat and a dog"
PAIR = (("cat", "cat_lora"), ("dog", "dog_lora"))


def txt2img(**kw) -> processing.StableDiffusionProcessingTxt2Img:
    return processing.StableDiffusionProcessingTxt2Img(**{"prompt": PROMPT, "steps": 4, "seed": 3, **kw})


def img2img(**kw) -> processing.StableDiffusionProcessingImg2Img:
    init = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    return processing.StableDiffusionProcessingImg2Img(**{"prompt": PROMPT, "steps": 8, "seed": 3,
                                                          "init_latent": init, **kw})


def test_off_is_the_host_unchanged(fake_host, fake_model):
    plain = generate(txt2img(), with_script=False).images
    host_clip = fake_model.forge_objects_after_applying_lora.clip
    for args in [(), ({"enabled": False},), (False,), (clora(*PAIR, enabled=False),)]:
        fake_model.clip_encodes.clear()
        p = txt2img(script_args=args)
        images = generate(p).images
        assert all(torch.equal(a, b) for a, b in zip(plain, images))
        assert KEY not in p.extra_generation_params
        assert all(clip is host_clip for clip in fake_model.clip_encodes)  # nothing encoded with patches


def _spy_fused_step(monkeypatch) -> list:
    """Record, per model call, what the conditioning modifier saw and did to the sampler's x."""
    seen = []
    step = passes.fused_step

    def spy(engine, inner, rows, x, *args, **kwargs):
        before = x.clone()
        out = step(engine, inner, rows, x, *args, **kwargs)
        seen.append({"inference_mode": torch.is_inference_mode_enabled(), "x_is_inference": x.is_inference(),
                     "moved": float((x - before).abs().max())})
        return out

    monkeypatch.setattr(passes, "fused_step", spy)
    return seen


def test_on_composes_and_cleans_up(fake_host, fake_model, monkeypatch, capsys):
    plain = generate(txt2img(), with_script=False).images[0]
    seen = _spy_fused_step(monkeypatch)
    p = txt2img(script_args=(clora(*PAIR),))
    out = generate(p).images[0]
    assert p.closed and runtime.generations.serving(p) is None
    assert p.scripts.calls["process_before_every_sampling"] == 1
    assert not torch.allclose(out, plain, atol=1e-3)
    assert KEY in p.extra_generation_params and '"lora":"cat_lora"' in p.extra_generation_params[KEY]
    assert "CLoRA: 4 model steps, 6 latent updates in 2 steps" in capsys.readouterr().out
    # the latent was updated in place at the update steps (the first half), not after
    assert [s["moved"] > 0 for s in seen] == [True, True, False, False]
    # the variant rows went through KModel.apply_model: 3 variants x (cond + uncond) per fused call
    assert max(fake_model.kmodel.calls) == 6
    # the variant encodings had their LoRA's CLIP patches, on clones of the host's CLIP patcher
    patched = [clip for clip in fake_model.clip_encodes if clip.patcher.patches]
    assert patched and all(clip is not fake_model.forge_objects_after_applying_lora.clip for clip in patched)


@contextlib.contextmanager
def _ldm_checkpointing_off(unet):
    flags = [(m, a) for m in unet.modules() for a in ("checkpoint", "use_checkpoint") if m.__dict__.get(a) is True]
    for m, a in flags:
        setattr(m, a, False)
    try:
        yield
    finally:
        for m, a in flags:
            setattr(m, a, True)


def test_the_gradient_runs_inside_inference_mode(fake_host, fake_model, monkeypatch):
    unet = fake_model.diffusion_model
    x = torch.randn((1, 4, 8, 8))
    t = torch.tensor([500.0])
    context = torch.randn((1, 77, 32))
    if fake_model.flavour in ("reforge", "classic"):
        # reForge's and Classic's weights are ordinary tensors that require grad; the sampler's x is
        # an inference tensor, and the functional gradient on it works inside inference mode
        assert all(not w.is_inference() and w.requires_grad for w in unet.parameters())
        with _ldm_checkpointing_off(unet), torch.inference_mode():
            x_in = x.clone()
            assert x_in.is_inference()
            out, vjp = torch.func.vjp(torch.func.functionalize(lambda z: unet(z, t, context=context).square().mean()),
                                      x_in)
            assert vjp(torch.ones_like(out))[0].abs().sum() > 0
    else:
        _inference_weights_refuse_autograd(unet, fake_model.flavour == "forge2", x, t, context)
    # the glue's update runs there, on the sampler's own x (an inference tensor), and moves it
    seen = _spy_fused_step(monkeypatch)
    generate(txt2img(script_args=(clora(*PAIR),)))
    assert all(s["inference_mode"] and s["x_is_inference"] for s in seen)
    assert seen[0]["moved"] > 0


def _inference_weights_refuse_autograd(unet, forge2: bool, x, t, context) -> None:
    assert all(w.is_inference() and w.requires_grad == forge2 for w in unet.parameters())
    if forge2:
        # measured on Forge 2.x's kind of weights (requires_grad=True inference tensors): the
        # functional gradient fails outside inference mode and works inside it, which is why the
        # glue's step runs there (forge.host.gradient_mode)
        def loss(z):
            return unet(z, t, context=context).square().mean()

        with _ldm_checkpointing_off(unet):  # as in the engine's gradient pass
            with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
                torch.func.vjp(torch.func.functionalize(loss), x.clone())
            with torch.inference_mode():
                out, vjp = torch.func.vjp(torch.func.functionalize(loss), x.clone())
                assert vjp(torch.ones_like(out))[0].abs().sum() > 0
        assert all(w.requires_grad for w in unet.parameters())
    # plain autograd cannot run on this model: not outside inference mode (inference weights are
    # saved for backward) ...
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        unet(x.clone().requires_grad_(True), t, context=context).sum().backward()
    # ... nor inside it (nothing made there requires grad)
    with torch.inference_mode(), torch.enable_grad():
        x_in = x.clone().requires_grad_(True)
        with pytest.raises(RuntimeError):
            torch.autograd.grad(unet(x_in, t, context=context).sum(), x_in)


def test_fused_rows_are_served_in_the_hosts_row_order(fake_host, monkeypatch):
    """With LoRAs at weight 0, no trigger words and no updates every variant is the base prompt, so
    the fused rows are the host's own predictions: the image must be the host's. Served in the
    wrong order (cond rows where the host expects uncond), the CFG inverts and it is not."""
    plain = generate(txt2img(), with_script=False).images[0]
    neutral = {"enabled": True, "update_fraction": 0.0,
               "concepts": [{"subject": s, "lora": lora, "weight": 0, "te_weight": 0} for s, lora in PAIR]}
    orders = []
    wrapper = runtime.Pass.wrapper

    def recording(self, apply_model, args):
        orders.append(list(args["cond_or_uncond"]))
        return wrapper(self, apply_model, args)

    monkeypatch.setattr(runtime.Pass, "wrapper", recording)
    same = generate(txt2img(script_args=(neutral,))).images[0]
    assert orders == [[1, 0]] * 4  # Neo batches uncond first
    close(same, plain)

    def swapped(self, apply_model, args):
        return wrapper(self, apply_model, {**args, "cond_or_uncond": args["cond_or_uncond"][::-1]})

    monkeypatch.setattr(runtime.Pass, "wrapper", swapped)
    wrong = generate(txt2img(script_args=(neutral,))).images[0]
    assert not torch.allclose(wrong, plain, atol=1e-2)


def test_cfg_scale_1_serves_the_cond_rows_alone(fake_host, monkeypatch):
    orders = []
    wrapper = runtime.Pass.wrapper
    monkeypatch.setattr(runtime.Pass, "wrapper",
                        lambda self, a, args: orders.append(list(args["cond_or_uncond"])) or wrapper(self, a, args))
    out = generate(txt2img(script_args=(clora(*PAIR),), cfg_scale=1.0)).images[0]
    assert torch.isfinite(out).all() and orders == [[0]] * 4


@pytest.mark.parametrize("args, message", [
    (clora(("cat", "nope"), ("dog", "dog_lora")), "LoRA 'nope' is not installed"),
    ({"concepts": [{"subject": "cat", "lora": "cat_lora", "weight": 9}]}, "concepts[0].weight"),
    (clora(("cat", "cat_lora"), ("bird", "dog_lora")), "bird"),
])
def test_a_refused_request_fails_with_422_and_leaves_nothing(fake_host, fake_model, args, message):
    p = txt2img(script_args=(args,))
    with pytest.raises(RequestRefused) as refused:
        generate(p)
    assert refused.value.status_code == 422 and message in refused.value.detail
    assert fake_model.kmodel.calls == []  # failed at the first model call: nothing sampled without CLoRA
    assert p.closed and runtime.generations.serving(p) is None


def test_an_and_prompt_is_refused_with_422(fake_host, fake_model):
    """The host hands an AND prompt's sub-prompts to the conditioning modifier as separate conds;
    CLoRA composes one prompt per image and refuses them, as on A1111."""
    prompt = "a cat AND a dog"
    assert generate(txt2img(prompt=prompt), with_script=False).images[0].isfinite().all()  # the host runs it
    fake_model.kmodel.calls.clear()
    p = txt2img(prompt=prompt, script_args=(clora(*PAIR),))
    with pytest.raises(RequestRefused) as refused:
        generate(p)
    assert refused.value.status_code == 422 and "does not support AND-composed prompts" in refused.value.detail
    assert fake_model.kmodel.calls == [] and p.closed


def test_interrupt_during_refinement_stops_promptly(fake_host, fake_model):
    calls = []

    def count(module, args):
        calls.append(1)
        if len(calls) == 3:  # inside the first step's refinement
            shared.state.interrupted = True

    handle = fake_model.diffusion_model.register_forward_pre_hook(count)
    try:
        p = txt2img(script_args=(clora(*PAIR, refine_iterations=20),), steps=8)
        out = generate(p).images[0]  # the host catches the interrupt and returns its last latent
    finally:
        handle.remove()
    assert len(calls) == 3  # the gradient pass stopped at its next block, nothing ran after
    assert torch.isfinite(out).all()
    assert runtime.generations.serving(p) is None


def test_hires_runs_pbes_twice_and_serves_masks_only(fake_host, fake_model, capsys):
    p = txt2img(script_args=(clora(*PAIR),), enable_hr=True, hr_second_pass_steps=2, denoising_strength=0.6)
    out = generate(p).images[0]
    assert out.shape == (4, 16, 16) and torch.isfinite(out).all()
    assert p.scripts.calls["process_before_every_sampling"] == 3  # first pass once, hires twice
    assert "hires pass: masks and routing only" in p.extra_generation_params[KEY]
    console = capsys.readouterr().out
    assert console.count("latent updates in") == 1  # only the first pass updates
    assert fake_model.kmodel.calls[-1] == 6  # the hires steps ran every variant row too


def test_batches_and_iterations(fake_host, capsys):
    images = generate(txt2img(script_args=(clora(*PAIR),), batch_size=2, n_iter=2)).images
    assert len(images) == 4 and all(torch.isfinite(i).all() for i in images)
    assert capsys.readouterr().out.count("model steps") == 2  # one pass per batch


def test_a_row_cap_splits_calls_and_gives_the_same_result(fake_host, fake_model):
    full = generate(txt2img(script_args=(clora(*PAIR),))).images[0]
    assert max(fake_model.kmodel.calls) == 6
    fake_model.kmodel.calls.clear()
    shared.opts.clora_max_rows = 2
    capped = generate(txt2img(script_args=(clora(*PAIR),))).images[0]
    assert max(fake_model.kmodel.calls) == 2
    close(capped, full, 1e-4)  # float rounding


def test_img2img_counts_the_steps_that_run(fake_host, capsys):
    p = img2img(script_args=(clora(*PAIR),), denoising_strength=0.5)  # 4 of 8 steps, 5 model calls
    generate(p)
    assert "CLoRA: 5 model steps, 6 latent updates in 2 steps" in capsys.readouterr().out


def test_a_loha_goes_through_the_adapters_own_weight(fake_host):
    kohya = generate(txt2img(script_args=(clora(("cat", "cat_lora"), ("dog", "dog_lora")),))).images[0]
    loha = generate(txt2img(script_args=(clora(("cat", "cat_loha"), ("dog", "dog_lora")),))).images[0]
    assert torch.isfinite(loha).all() and not torch.allclose(loha, kohya, atol=1e-3)


def test_inpainting_updates_the_samplers_latent_inside_the_mask_only(fake_host, monkeypatch):
    """Neo blends x with the noised original before the conditioning modifier, which so gets a copy:
    the update must reach the sampler's own x, and only where the host repaints."""
    from modules.sd_samplers_cfg_denoiser import CFGDenoiser

    keep = torch.zeros((4, 8, 8))
    keep[:, :, :4] = 1  # left half kept, right half repainted
    moves = []
    forward = CFGDenoiser.forward

    def spy(self, x, *args, **kwargs):  # the sampler's own x, before and after the model call
        before = x.clone()
        out = forward(self, x, *args, **kwargs)
        moves.append((x - before).abs())
        return out

    monkeypatch.setattr(CFGDenoiser, "forward", spy)
    p = img2img(script_args=(clora(*PAIR),), steps=4, denoising_strength=1.0, mask=keep, nmask=1 - keep)
    out = generate(p).images[0]
    assert torch.isfinite(out).all()
    assert moves[0][..., 4:].sum() > 0  # the update moved the repainted half of the sampler's x
    assert all(float(m[..., :4].max()) == 0 for m in moves)  # and never the kept half
    assert all(float(m.max()) == 0 for m in moves[2:])  # nor anything after the update steps


class FakeControlNet:
    """Neo's built-in ControlNet script as far as CLoRA sees it: its units in ``p.script_args``, and
    in its pbes (after CLoRA's) the unit attached to a clone of the pass's UNet patcher."""

    args_from, args_to = 1, 3

    def title(self):
        return "ControlNet"

    def process(self, p, *units):
        pass

    def process_before_every_sampling(self, p, *units, **kwargs):
        if any(u.get("enabled") for u in units):
            unet = p.sd_model.forge_objects.unet.clone()
            unet.controlnet_linked_list = object()
            p.sd_model.forge_objects.unet = unet

    def postprocess(self, p, processed, *units):
        pass


def test_an_enabled_controlnet_unit_is_refused(fake_host, fake_model):
    p = txt2img(script_args=(clora(*PAIR), {"enabled": False}, {"enabled": True}))
    with pytest.raises(RequestRefused, match="ControlNet unit 1 is enabled"):
        generate(p, others=[FakeControlNet()])
    assert fake_model.kmodel.calls == []


def test_a_controlnet_attached_to_the_patcher_is_refused(fake_host, fake_model, monkeypatch):
    """A ControlNet that CLoRA's argument check does not see (no unit enabled in its args) but that is
    attached to the UNet patcher when sampling starts."""
    from clora_ext.webui import host as webui

    monkeypatch.setattr(webui, "controlnet_units_enabled", lambda p: [])
    p = txt2img(script_args=(clora(*PAIR), {"enabled": True}, {"enabled": False}))
    with pytest.raises(RequestRefused, match="ControlNet is active"):
        generate(p, others=[FakeControlNet()])
    assert fake_model.kmodel.calls == []


LYCORIS = ("cat_loha", "dog_lokr", "dog_locon")


def test_the_lora_readers_give_the_same_deltas(fake_host, fake_model, monkeypatch):
    """Neo's reader (adapter objects), Forge 2.x's (tuples: ("lora", (up, down, alpha, mid, dora)),
    ("loha", ...), ("lokr", ...)), reForge's (``ldm_patched``: adapter objects, only the matched
    patches) and Classic's (``ldm_patched``: tuples without the DoRA scale) must give the glue the
    same per-layer deltas, each routed from its factors (low-rank LoRA and LoCon, LoHa as an exact
    low-rank delta, LoKr through its Kronecker factors) and equal to the host's own merge."""
    import modules_forge.forge_version as forge_version
    from backend.patcher import lora as host_lora

    from clora_ext.forge import host, lora_bridge
    from clora_ext.routing import HadamardDelta, KroneckerDelta, LazyDelta, LowRankDelta
    from conftest import VERSIONS

    p = txt2img()
    names = ("cat_lora", *LYCORIS)
    read, dense = {}, {}
    for form in VERSIONS:  # each read and built while its host runs
        monkeypatch.setattr(host_lora, "FLAVOUR", form)
        monkeypatch.setattr(forge_version, "version", VERSIONS[form])
        lora_bridge.clear_cache()
        with torch.inference_mode():
            read[form] = {name: lora_bridge.load(name, p) for name in names}
            dense[form] = {(name, module): delta.dense(host.model_parameter(p, f"diffusion_model.{module}.weight").shape)
                           for name, lora in read[form].items() for module, delta in lora.unet.items()}
    kinds = {"cat_lora": LowRankDelta, "cat_loha": HadamardDelta, "dog_lokr": KroneckerDelta, "dog_locon": LowRankDelta}
    for name, kind in kinds.items():  # nothing of these formats is left to a dense per-pass build
        assert read["neo"][name].unet and all(type(d) is kind for d in read["neo"][name].unet.values()), name
    assert any(d.down.dim() == 4 for d in read["neo"]["dog_locon"].unet.values())  # the 3x3 convs, low-rank
    for other in ("forge2", "reforge", "classic"):
        for name in names:
            neo, theirs = read["neo"][name].unet, read[other][name].unet
            assert neo.keys() == theirs.keys() and neo
            assert set(read["neo"][name].clip) == set(read[other][name].clip)
            assert all(type(neo[m]) is type(theirs[m]) for m in neo)
        assert dense["neo"].keys() == dense[other].keys()
        for key, delta in dense["neo"].items():
            assert delta.abs().sum() > 0
            close(dense[other][key], delta, 1e-5)
    # each routed delta is the host's own merge of the layer (Neo's adapters, outside any transform)
    monkeypatch.setattr(host_lora, "FLAVOUR", "neo")
    monkeypatch.setattr(forge_version, "version", VERSIONS["neo"])
    unet_patches, _, _ = host.lora_patches(host.load_lora_file(lora_bridge.webui.lora_path(
        lora_bridge.on_disk("dog_lokr"))), p)
    for key, adapter in unet_patches.items():
        module = key[len("diffusion_model."):-len(".weight")]
        weight = host.model_parameter(p, key)
        expected = host.read_adapter(key, adapter, p).delta(weight)
        close(dense["neo"][("dog_lokr", module)], expected, 1e-3)  # half-precision factors, multiplied apart
    assert not any(isinstance(d, LazyDelta) for f in read.values() for lora in f.values() for d in lora.unet.values())
    for tuples in ("forge2", "classic"):
        clip_patch = next(iter(read[tuples]["cat_lora"].clip.values()))
        assert isinstance(clip_patch, tuple) and clip_patch[0] == "lora"  # handed to the CLIP patcher as read
        assert any(isinstance(d, LowRankDelta) for d in read[tuples]["cat_lora"].unet.values())


def _first_gradient(monkeypatch, p) -> torch.Tensor:
    """The first latent gradient of the generation ``p`` (CLoRA's first gradient pass)."""
    from clora_ext.optimiser import LatentOptimiser

    grads = []
    gradient = LatentOptimiser._gradient

    def recording(self, *args, **kwargs):
        grads.append(gradient(self, *args, **kwargs).clone())
        return grads[-1]

    monkeypatch.setattr(LatentOptimiser, "_gradient", recording)
    generate(p)
    monkeypatch.setattr(LatentOptimiser, "_gradient", gradient)
    return grads[0]


def test_lycoris_concepts_act_in_the_gradient_pass(fake_host, monkeypatch, caplog):
    """LoHa, LoKr and LoCon concepts whose host adapters add in place on half-precision factors (as
    Neo's do, which fails inside the functional gradient pass) change the latent gradient as their
    merged weights do; before, those layers got no delta there and the host logged an ERROR per layer."""
    import logging

    concepts = lambda weight: {"enabled": True, "concepts": [  # noqa: E731
        {"subject": "cat", "lora": "cat_loha", "weight": weight, "te_weight": 0},
        {"subject": "dog", "lora": "dog_lokr", "weight": weight, "te_weight": 0}]}
    with caplog.at_level(logging.ERROR):
        acting = _first_gradient(monkeypatch, txt2img(script_args=(concepts(1.0),)))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    idle = _first_gradient(monkeypatch, txt2img(script_args=(concepts(0.0),)))
    assert differs(acting, idle, 0.01)


def test_reforge_reads_full_difference_layers_and_counts_unread_keys(fake_host, fake_model, tmp_path, capsys):
    """reForge's reader returns ("diff", (tensor,)) for a layer stored whole, and nothing about the
    keys it could not place: the glue builds the diff's delta through the host's calculate_weight
    and counts the unplaced keys itself."""
    if fake_model.flavour != "reforge":
        pytest.skip("reForge's reader")
    from safetensors.torch import save_file

    import networks
    from clora_ext.devtools.loras import kohya_unet_key
    from clora_ext.forge import lora_bridge
    from clora_ext.routing import LazyDelta

    module = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    weight = fake_model.diffusion_model.get_submodule(module).weight
    diff = torch.randn(weight.shape, generator=torch.Generator().manual_seed(4))
    save_file({f"{kohya_unet_key(module)}.diff": diff, "lora_unet_no_such_layer.lora_up.weight": torch.ones(2, 2),
               "lora_unet_no_such_layer.alpha": torch.tensor(1.0)}, str(tmp_path / "whole_diff.safetensors"))
    networks.available_networks["whole_diff"] = networks.NetworkOnDisk("whole_diff", str(tmp_path / "whole_diff.safetensors"))
    lora = lora_bridge.load("whole_diff", txt2img())
    assert list(lora.unet) == [module] and isinstance(lora.unet[module], LazyDelta)
    close(lora.unet[module].build()[0], diff, LAYER)
    assert "LoRA 'whole_diff': 2 key(s) match no layer of the loaded model" in capsys.readouterr().out


def test_a_dora_adapter_gives_its_delta_against_the_real_weight():
    """DoRA renormalises the merged weight per output row, so its delta depends on the weight:
    taken against zeros it would be wrong. The glue takes it against the layer's real weight."""
    from clora_ext.forge import host

    class LoRAAdapter:  # the host's class name; a DoRA scale in .weights[4]
        def __init__(self, up, down, scale):
            self.weights = (up, down, None, None, scale, None)

        def calculate_weight(self, weight, key, strength, strength_model, offset, function, *args):
            up, down, _, _, scale, _ = self.weights
            merged = weight + strength * (up @ down)
            return merged * (scale / merged.norm(dim=1, keepdim=True))

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=g)
    adapter = LoRAAdapter(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g), torch.rand(6, 1, generator=g) + 0.5)
    read = host.read_adapter("diffusion_model.x.weight", adapter, None)
    assert read.factors is not None and not read.factors.plain  # never routed as a plain low-rank product
    expected = adapter.calculate_weight(weight.clone(), "k", 1.0, 1.0, None, None) - weight
    close(read.delta(weight), expected, LAYER)
    assert not torch.allclose(read.delta(weight), adapter.calculate_weight(torch.zeros_like(weight), "k", 1.0, 1.0, None, None))


def test_a_host_error_inside_a_pass_answers_one_line_and_the_next_request_runs(fake_host, fake_model, monkeypatch,
                                                                                 capsys):
    """An unexpected error of the host inside a CLoRA pass (here: KModel.apply_model failing once, as
    a changed host signature would) answers 500 with one line naming CLoRA, the host and its version;
    the traceback goes to the console; nothing stays on the model, and the next request runs."""
    from clora_ext.webui.pipeline import HostError
    from clora_ext.forge import host

    expected = generate(txt2img(script_args=(clora(*PAIR),))).images[0]
    apply_model = host.apply_model
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise TypeError("apply_model() got an unexpected keyword argument 'c_crossattn'")
        return apply_model(*args, **kwargs)

    monkeypatch.setattr(host, "apply_model", failing)
    capsys.readouterr()
    with pytest.raises(HostError) as failed:
        generate(txt2img(script_args=(clora(*PAIR),)))
    label = {"neo": "Forge Neo", "forge2": "Forge 2.x 2.0.1v1.10.1", "reforge": "reForge 1.0.0v2-v1.10.1RC",
             "classic": "Forge Classic"}[fake_model.flavour]
    if getattr(fake_model, "release", None):
        label = f"Forge Neo {fake_model.release}"
    assert failed.value.status_code == 500 and "\n" not in failed.value.detail
    assert failed.value.detail.startswith(f"CLoRA on {label} failed: TypeError: apply_model() got an unexpected")
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    again = generate(txt2img(script_args=(clora(*PAIR),))).images[0]
    assert torch.equal(again, expected)


def test_a_lora_the_hosts_merge_fails_on_is_refused_naming_it(fake_host, monkeypatch):
    """A layer left to the host's own merge (a format without a factored form) whose merge fails:
    Neo's adapters log the error and return the weight unchanged, so the concept would silently do
    nothing there. The request is refused with 422 naming the LoRA, the layer and the host's error."""
    from backend.patcher import lora as host_lora

    from clora_ext import formats
    from clora_ext.forge import lora_bridge

    monkeypatch.setattr(formats, "routed_delta", lambda *args, **kwargs: None)  # every layer to the dense build
    monkeypatch.setattr(host_lora.LoKrAdapter, "diff", lambda self, shape, dtype=None: 1 / 0)
    lora_bridge.clear_cache()
    with pytest.raises(RequestRefused) as refused:
        generate(txt2img(script_args=(clora(("cat", "cat_lora"), ("dog", "dog_lokr")),)))
    assert refused.value.status_code == 422
    assert refused.value.detail.startswith("CLoRA: LoRA 'dog_lokr' cannot act on layer ")
    # adapter objects (Neo, reForge) only log the error; the tuple merges (Forge 2.x, Classic) raise it
    assert "the host's merge failed" in refused.value.detail and "division by zero" in refused.value.detail
