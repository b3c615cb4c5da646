"""The fake Forge Neo host (fake_neo/) in place of Neo's ``modules``, ``modules_forge``, ``backend``
and ``networks``, and the Forge glue on top. Every test runs on each host the ``flavour`` fixture
names: "neo" (Forge Neo's February 2026 tree: no release number, A1111's prompt parser
signatures), "neo226" (Forge Neo 2.26: ``forge_version.release`` "2.26", the prompt parser
without ``use_old_scheduling``; ``fake_model.flavour`` is "neo" for both), "forge2" (lllyasviel Forge 2.x: version
"2.0.1v1.10.1", its tuple LoRA reader, UNet weights that keep ``requires_grad=True``) and
"reforge" (reForge: version "1.0.0v2-v1.10.1RC", the ``ldm_patched`` reader and CLIP patcher,
ordinary UNet weights with ``requires_grad=True``, A1111's chunker) and "classic" (Forge Classic:
version "classic", as reForge but the old ComfyUI reader's tuples, merged by the patcher).

Besides the SD1.5 checkpoint (``fake_model``, ``fake_host``) there is an SDXL one
(``fake_sdxl_model``, ``fake_sdxl_host``) with its own LoRA folder.

This tier runs in a process of its own (its ``modules`` package is not the A1111 fake's of
tests/host): ``pytest tests`` runs it through tests/test_fake_neo_tier.py, and
``pytest tests/forge`` runs it directly. The model and the LoRA files are built once per
session; a test gets a freshly reset host (options, progress state, LoRA list, the glue's
caches), and at its end the model must carry no hook of the glue and the host's own
patchers no option of it.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import save_file

FAKE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_neo")
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/tolerance.py
for folder in (TESTS, FAKE):
    if folder not in sys.path:
        sys.path.insert(0, folder)

_loaded = sys.modules.get("modules")
if _loaded is not None and not (getattr(_loaded, "__file__", None) or "").startswith(FAKE + os.sep):
    # another tier's fake host is in this process already: both ship a ``modules`` package
    raise pytest.UsageError(
        "tests/host and tests/forge cannot share a process (each fake host ships its own ``modules``): "
        "run `pytest tests` (it runs tests/forge in a process of its own), or each folder alone")

from modules import prompt_parser, shared  # noqa: E402  (the fake Neo's)

import modules_forge.forge_version as forge_version  # noqa: E402
import networks  # noqa: E402
from backend.patcher import lora as host_lora  # noqa: E402
from clora_ext.devtools.loras import (  # noqa: E402
    LOCON_TARGETS, UNET_TARGETS, kohya_unet_key, lora_targets, write_kohya_lora)
from clora_ext.forge import lora_bridge, runtime  # noqa: E402
from world import FakeNeoModel, FakeNeoSDXLModel  # noqa: E402


VERSIONS = {"neo": "neo", "forge2": "2.0.1v1.10.1", "reforge": "1.0.0v2-v1.10.1RC", "classic": "classic"}
# the hosts the tier runs as: (flavour, Neo release number or None)
HOSTS = {"neo": ("neo", None), "neo226": ("neo", "2.26"), "forge2": ("forge2", None), "reforge": ("reforge", None),
         "classic": ("classic", None)}


@pytest.fixture(scope="session", params=sorted(HOSTS, reverse=True))
def flavour(request) -> str:
    """The flavour of the host this test runs as (both Neo releases are "neo"; ``fake_model.release`` tells)."""
    return request.param


@pytest.fixture(scope="session")
def fake_model(flavour) -> FakeNeoModel:
    model = FakeNeoModel(unet_seed=0, te_seed=0, flavour=HOSTS[flavour][0])
    model.release = HOSTS[flavour][1]
    return model


# LoRA files are mostly half precision: so are these LyCORIS ones (Neo's adapters fail on such
# factors inside a functional transform, which the glue must never call them in)
def _write_loha(path: str, unet: torch.nn.Module, seed: int) -> None:
    """A LoHa (rank 2 x 2) over the UNet's attention projections and its ResBlock 3x3 convs
    (a conv's ``*_b`` factors flattened to (rank, in*kh*kw), as LyCORIS writes them)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in [*lora_targets(unet, UNET_TARGETS), *lora_targets(unet, LOCON_TARGETS)]:
        out, inp = module.weight.shape[:2]
        fan_in = module.weight[0].numel()
        key = kohya_unet_key(name)
        std = float(module.weight.std())
        for i in (1, 2):
            tensors[f"{key}.hada_w{i}_a"] = (torch.randn(out, 2, generator=g) * std ** 0.5).half()
            tensors[f"{key}.hada_w{i}_b"] = (torch.randn(2, fan_in, generator=g) * std ** 0.5 / inp ** 0.5).half()
        tensors[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(tensors, path)


def _split(n: int) -> tuple[int, int]:
    """LyCORIS's factorisation of a width for LoKr: the most even pair (small, large)."""
    small = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)
    return small, n // small


def _write_lokr(path: str, unet: torch.nn.Module, seed: int) -> None:
    """A LoKr over the same layers: a full ``lokr_w1`` and a low-rank ``lokr_w2_a``/``lokr_w2_b``
    (rank 2; for a 3x3 conv ``lokr_w2_b`` is (rank, in2*kh*kw), LyCORIS's layout without Tucker)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in [*lora_targets(unet, UNET_TARGETS), *lora_targets(unet, LOCON_TARGETS)]:
        (o1, o2), (i1, i2) = _split(module.weight.shape[0]), _split(module.weight.shape[1])
        kernel = module.weight[0, 0].numel()
        key = kohya_unet_key(name)
        std = float(module.weight.std())
        tensors[f"{key}.lokr_w1"] = torch.randn(o1, i1, generator=g).half()
        tensors[f"{key}.lokr_w2_a"] = (torch.randn(o2, 2, generator=g) * std).half()
        tensors[f"{key}.lokr_w2_b"] = (torch.randn(2, i2 * kernel, generator=g) / (i1 * i2 * kernel) ** 0.5).half()
        tensors[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(tensors, path)


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory, fake_model) -> str:
    folder = tmp_path_factory.mktemp("Lora")
    unet = fake_model.diffusion_model
    te = fake_model.forge_objects.clip.cond_stage_model.clip_l.transformer
    with torch.no_grad():  # Forge 2.x's weights require grad (inference tensors: no graph can be made on them)
        for seed, name in enumerate(["cat_lora", "dog_lora", "fox_lora"]):
            write_kohya_lora(folder / f"{name}.safetensors", unet, te, seed=seed + 1, strength=2.0)
        _write_loha(str(folder / "cat_loha.safetensors"), unet, 11)
        _write_lokr(str(folder / "dog_lokr.safetensors"), unet, 12)
        write_kohya_lora(folder / "dog_locon.safetensors", unet, te, seed=13, strength=2.0, conv=True)
    return str(folder)


@pytest.fixture(scope="session")
def fake_sdxl_model(flavour) -> FakeNeoSDXLModel:
    model = FakeNeoSDXLModel(unet_seed=0, te_seed=0, flavour=HOSTS[flavour][0])
    model.release = HOSTS[flavour][1]
    return model


@pytest.fixture(scope="session")
def sdxl_lora_dir(tmp_path_factory, fake_sdxl_model, lora_dir) -> str:
    """SDXL kohya LoRAs (UNet keys in ldm naming, ``lora_te1_``/``lora_te2_`` for clip_l/clip_g):
    cat_xl, dog_xl; and cat_lora, the SD1.5 checkpoint's, made for another family."""
    folder = tmp_path_factory.mktemp("LoraXL")
    unet = fake_sdxl_model.diffusion_model
    encoders = fake_sdxl_model.forge_objects.clip.cond_stage_model
    text_encoders = {"lora_te1_": encoders.clip_l.transformer, "lora_te2_": encoders.clip_g.transformer}
    with torch.no_grad():
        for seed, name in enumerate(["cat_xl", "dog_xl"]):
            write_kohya_lora(folder / f"{name}.safetensors", unet, seed=seed + 1, strength=2.0, unet_naming="ldm",
                             text_encoders=text_encoders)
    shutil.copy(os.path.join(lora_dir, "cat_lora.safetensors"), folder)
    return str(folder)


@pytest.fixture
def fake_host(fake_model, lora_dir, monkeypatch):
    """A started fake host (Neo or Forge 2.x) with ``fake_model`` loaded and the LoRA folder listed."""
    yield from _started_host(fake_model, lora_dir, monkeypatch)


@pytest.fixture
def fake_sdxl_host(fake_sdxl_model, sdxl_lora_dir, monkeypatch):
    """A started fake host of the ``flavour`` with the SDXL checkpoint loaded and the SDXL LoRA folder listed
    (CLoRA runs SDXL on Neo and Forge 2.x; reForge and Classic refuse it)."""
    yield from _started_host(fake_sdxl_model, sdxl_lora_dir, monkeypatch)


def _started_host(fake_model, lora_dir, monkeypatch):
    monkeypatch.setattr(forge_version, "version", VERSIONS[fake_model.flavour])
    release = getattr(fake_model, "release", None)
    if release is None:
        monkeypatch.delattr(forge_version, "release", raising=False)
    else:
        monkeypatch.setattr(forge_version, "release", release, raising=False)
    prompt_parser.use_release(release)
    monkeypatch.setattr(host_lora, "FLAVOUR", fake_model.flavour)
    shared.reset(fake_model)
    networks.lora_dir = lora_dir
    networks.list_available_networks()
    lora_bridge.clear_cache()
    fake_model.kmodel.calls.clear()
    fake_model.clip_encodes.clear()
    hooks_before = _hook_count(fake_model)
    yield shared
    runtime.generations.close_any()
    prompt_parser.use_release(None)
    assert _hook_count(fake_model) == hooks_before, "the glue left hooks on the model"
    for objects in (fake_model.forge_objects_original, fake_model.forge_objects_after_applying_lora):
        assert set(objects.unet.model_options) == {"transformer_options"}, "the glue changed the host's own patcher"
        assert not objects.clip.patcher.patches, "the glue patched the host's own CLIP"
    # the weights of Forge 2.x, reForge and Classic keep requires_grad=True (the engine switches it
    # off for a gradient pass and back on), Neo's stay off
    keeps = fake_model.flavour != "neo"
    assert all(w.requires_grad == keeps for w in fake_model.diffusion_model.parameters())


def _hook_count(model: FakeNeoModel) -> int:
    modules = [*model.diffusion_model.modules(), *model.forge_objects.clip.cond_stage_model.modules()]
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)
