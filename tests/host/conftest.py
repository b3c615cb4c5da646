"""The fake host (fake_a1111/) in place of A1111's ``modules`` and ``networks``, and the glue on top.

Every test runs once per supported host version (``host_version``); the model and the
LoRA files are built once per session. A test gets a freshly reset host: options,
progress state, LoRA list and the glue's caches.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from safetensors.torch import save_file

FAKE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_a1111")
if FAKE not in sys.path:
    sys.path.insert(0, FAKE)

_loaded = sys.modules.get("modules")
if _loaded is not None and not (getattr(_loaded, "__file__", None) or "").startswith(FAKE + os.sep):
    # another tier's fake host is in this process already: both ship a ``modules`` package
    raise pytest.UsageError(
        "tests/host and tests/forge cannot share a process (each fake host ships its own ``modules``): "
        "run `pytest tests` (it runs tests/forge in a process of its own), or each folder alone")

from modules import shared  # noqa: E402  (the fake host's)

import networks  # noqa: E402
from clora_ext.a1111 import encoding, lora_bridge, runtime  # noqa: E402
from clora_ext.devtools.loras import UNET_TARGETS, kohya_unet_key, lora_targets, write_kohya_lora  # noqa: E402
from world import FakeSDModel  # noqa: E402

VERSIONS = ["1.8.0", "1.10.1"]


@pytest.fixture(scope="session")
def fake_model() -> FakeSDModel:
    return FakeSDModel(unet_seed=0, te_seed=0)


def _write_factored(path: str, unet: torch.nn.Module, kind: str, seed: int) -> None:
    """A LoHa (rank 2 x 2) or LoKr file over the UNet's attention projections."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in lora_targets(unet, UNET_TARGETS):
        if module.weight.dim() != 2:
            continue
        out, inp = module.weight.shape
        key = kohya_unet_key(name)
        std = float(module.weight.detach().std())
        if kind == "loha":
            for i in (1, 2):
                tensors[f"{key}.hada_w{i}_a"] = torch.randn(out, 2, generator=g) * std ** 0.5
                tensors[f"{key}.hada_w{i}_b"] = torch.randn(2, inp, generator=g) * std ** 0.5 / inp ** 0.5
        else:
            f = 4 if out % 4 == 0 and inp % 4 == 0 else 1
            tensors[f"{key}.lokr_w1"] = torch.randn(f, f, generator=g)
            tensors[f"{key}.lokr_w2"] = torch.randn(out // f, inp // f, generator=g) * std * 0.5
        tensors[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(tensors, path, metadata={"ss_base_model_version": "sd_v1"})


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory, fake_model) -> str:
    folder = tmp_path_factory.mktemp("Lora")
    unet, te = fake_model.model.diffusion_model, fake_model.cond_stage_model.transformer
    for seed, name in enumerate(["cat_lora", "dog_lora", "fox_lora"]):
        write_kohya_lora(folder / f"{name}.safetensors", unet, te, seed=seed + 1, strength=2.0)
    _write_factored(str(folder / "cat_loha.safetensors"), unet, "loha", 11)
    _write_factored(str(folder / "dog_lokr.safetensors"), unet, "lokr", 12)
    return str(folder)


@pytest.fixture(params=VERSIONS)
def host_version(request) -> str:
    return request.param


@pytest.fixture
def fake_host(host_version, fake_model, lora_dir):
    """A started fake host of ``host_version`` with the glue installed (what the script does at load)."""
    shared.reset(host_version, fake_model)
    networks.lora_dir = lora_dir
    networks.loaded_networks.clear()
    networks.list_available_networks()
    runtime.install()
    lora_bridge.clear_cache()
    encoding.clear_cache()
    hooks_before = _hook_count(fake_model)
    yield shared
    runtime.generations.close_any()
    assert _hook_count(fake_model) == hooks_before, "the glue left hooks on the model"


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
