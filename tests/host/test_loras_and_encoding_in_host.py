"""The Lora bridge and the variant encoder against the host's Lora extension (fake host, 1.8.0 and 1.10.1)."""

from __future__ import annotations

import pytest
import torch

import networks
from clora_ext.a1111 import encoding, lora_bridge
from clora_ext.webui import loras
from clora_ext.webui.plan import CLoRARuntimeError, plan_variants
from clora_ext.concepts import Composition, Concept
from clora_ext.routing import HadamardDelta, KroneckerDelta, LowRankDelta
from tolerance import close


@pytest.mark.parametrize("name, kind", [("cat_lora", LowRankDelta), ("cat_loha", HadamardDelta), ("dog_lokr", KroneckerDelta)])
def test_each_format_keeps_its_factored_form_and_equals_the_hosts_delta(fake_host, fake_model, name, kind):
    lora = lora_bridge.load(name)
    assert lora.unet and all(isinstance(d, kind) for d in lora.unet.values())
    net = networks.load_network(name, networks.available_networks[name])
    unet = dict(fake_model.model.diffusion_model.named_modules())
    by_module = {id(m.sd_module): m for m in net.modules.values()}
    for layer, delta in lora.unet.items():
        weight = unet[layer].weight
        expected, _ = by_module[id(unet[layer])].calc_updown(weight)
        close(delta.dense(weight.shape), expected, 1e-5)


def test_text_encoder_part_stays_the_hosts_and_only_its_modules(fake_host):
    lora = lora_bridge.load("cat_lora")
    assert lora.te_network is not None
    te = set(fake_host.sd_model.cond_stage_model.transformer.modules())
    assert lora.te_network.modules and all(m.sd_module in te for m in lora.te_network.modules.values())


def test_cache_is_bounded_least_recently_used_and_dropped_with_the_model(fake_host, monkeypatch):
    from world import FakeSDModel

    monkeypatch.setattr(loras, "CACHE_SIZE", 2)
    first = lora_bridge.load("cat_lora")
    lora_bridge.load("dog_lora")
    assert lora_bridge.load("cat_lora") is first  # a hit
    lora_bridge.load("fox_lora")  # evicts dog_lora, the least recently used
    assert [key[0] for key in lora_bridge._cache] == ["cat_lora", "fox_lora"]
    fake_host.sd_model = FakeSDModel(unet_seed=1, te_seed=1)  # another checkpoint is loaded
    again = lora_bridge.load("cat_lora")
    assert again is not first and list(lora_bridge._cache.values()) == [again]


def test_missing_and_wrong_family_loras_are_refused_with_a_message(fake_host, monkeypatch):
    with pytest.raises(CLoRARuntimeError, match="'cat_lora_' is not installed; did you mean 'cat_lora'"):
        lora_bridge.on_disk("cat_lora_")
    entry = networks.available_networks["dog_lora"]
    monkeypatch.setattr(entry, "sd_version", networks.SdVersion.SDXL)
    with pytest.raises(CLoRARuntimeError, match="made for SDXL, but the loaded model is SD1"):
        lora_bridge.load("dog_lora")


def test_a_layer_the_hosts_own_code_cannot_apply_is_left_out_as_the_host_does(fake_host, monkeypatch, capsys):
    """A layer whose size the factors do not tell (IA3, OFT, ...) is tried with the host's own merge; where
    that fails (LyCORIS' IA3 on a 3x3 conv in real A1111 1.10.1) the host leaves the layer out, and so does
    CLoRA, with a console note, instead of calling the file one of another model family. A file whose
    every layer fails so is refused with the host's reason."""
    import dataclasses

    from clora_ext.a1111 import host

    real = host.network_modules

    def failing(module):
        def updown(weight):
            raise RuntimeError("The size of tensor a (3) must match the size of tensor b (320)")
        return dataclasses.replace(module, kind="NetworkModuleIa3", factors={}, plain=False, updown=updown)

    unet_keys = set(lora_bridge.load("dog_lora").unet)
    lora_bridge._cache.clear()
    first_unet = {}

    def one_failing(net):
        modules = real(net)
        index = next(i for i, m in enumerate(modules) if "unet" in m.key)
        first_unet["key"] = modules[index].key
        return [failing(m) if i == index else m for i, m in enumerate(modules)]

    monkeypatch.setattr(host, "network_modules", one_failing)
    lora = lora_bridge.load("dog_lora")
    assert len(lora.unet) == len(unet_keys) - 1  # that layer only is left out
    out = capsys.readouterr().out
    assert "1 layer(s) the host's Lora code cannot apply are left out" in out and first_unet["key"] in out
    lora_bridge._cache.clear()
    monkeypatch.setattr(host, "network_modules", lambda net: [failing(m) for m in real(net)])
    with pytest.raises(CLoRARuntimeError, match="the host's Lora code cannot apply any of its layers .*must match"):
        lora_bridge.load("dog_lora")


def test_variants_are_encoded_with_their_text_encoder_lora_and_cached(fake_host, monkeypatch):
    composition = Composition.from_concepts([Concept("cat", "cat_lora"), Concept("dog", "dog_lora")])
    plan = plan_variants(composition, ["a cat and a dog"], [""])
    loras = {name: lora_bridge.load(name) for name in ("cat_lora", "dog_lora")}
    schedule = encoding.Schedule(4, None, 64, 64)
    conds = encoding.encode(plan, loras, schedule)
    base, cat = plan.cond_job[0][0], plan.cond_job[0][1]
    plain = fake_host.sd_model.get_learned_conditioning([plan.jobs[cat].text])[0]
    assert torch.equal(conds[base][0][1], fake_host.sd_model.get_learned_conditioning([plan.jobs[base].text])[0])
    assert not torch.allclose(conds[cat][0][1], plain)  # the cat variant went through the cat LoRA's encoder
    assert networks.loaded_networks == []  # the prompt's own list is given back
    calls = []
    monkeypatch.setattr(fake_host.sd_model, "get_learned_conditioning", lambda texts: calls.append(texts))
    again = encoding.encode(plan, loras, schedule)
    assert calls == [] and all(a is b for a, b in zip(again, conds))  # every encoding came from the cache


def test_prompt_editing_gives_one_token_map_segment_per_schedule_entry(fake_host):
    from driver import clora, generate
    from modules import processing

    p = processing.StableDiffusionProcessingTxt2Img(prompt="a [cat:cat:2] and a dog", steps=4,
                                                    script_args=(clora(("cat", "cat_lora"), ("dog", "dog_lora")),))
    generate(p)
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a [cat:bird:2] and a dog", steps=4,
                                                    script_args=(clora(("cat", "cat_lora"), ("dog", "dog_lora")),))
    with pytest.raises(Exception, match="not in the prompt during steps 3-4"):
        generate(p)


def test_loading_a_lora_leaves_torchs_generator_where_it_was(fake_host):
    """CLoRA loads LoRAs inside sampling, after the host has seeded; the host's loader builds
    throwaway layers whose initialisation would otherwise move the global generator."""
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    lora_bridge.load("fox_lora")
    assert torch.equal(torch.rand(4), expected)
