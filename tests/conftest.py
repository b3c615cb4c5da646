"""Shared fixtures: tiny seeded SD stand-ins (see clora_ext.devtools.tiny_sd).

The session fixtures are shared by every test: tests must not change their
weights (a test that needs to mutate a model builds its own with
build_tiny_unet / build_tiny_text_encoder). Teardown checks this.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

torch.set_flush_denormal(True)

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from clora_ext.devtools import tiny_sd  # noqa: E402


_FORGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "forge")


def _inside(path: str, folder: str) -> bool:
    path = os.path.abspath(path)
    return path == folder or path.startswith(folder + os.sep)


def pytest_ignore_collect(collection_path, config: pytest.Config):
    """tests/forge (the fake Forge Neo) is collected only when every path asked for is inside it:
    its fake ``modules`` cannot share a process with tests/host's. ``pytest tests`` runs it in a
    process of its own (tests/test_fake_neo_tier.py)."""
    if not _inside(str(collection_path), _FORGE):
        return None
    args = [a.split("::")[0] for a in config.args] or [os.getcwd()]
    return True if not all(_inside(a, _FORGE) for a in args) else None


def pytest_configure(config: pytest.Config) -> None:
    # Known deprecations inside the vendored ldm code (not ours to fix).
    for line in (
        r"ignore:torch\.get_autocast_gpu_dtype\(\) is deprecated:DeprecationWarning",
        r"ignore:`torch\.cuda\.amp\.autocast\(args\.\.\.\)` is deprecated:FutureWarning",
        # numpy probes subnormals once; torch.set_flush_denormal(True) makes them read as zero
        r"ignore:The value of the smallest subnormal:UserWarning",
    ):
        config.addinivalue_line("filterwarnings", line)


def _guarded(model: torch.nn.Module, name: str):
    """Yield ``model``; at teardown fail if any of its weights changed."""
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    yield model
    after = model.state_dict()
    changed = sorted(
        k for k, v in before.items() if k not in after or not torch.equal(v, after[k])
    )
    if changed or set(after) != set(before):
        pytest.fail(
            f"session fixture {name!r} was mutated by a test "
            f"(changed: {changed[:5]}{'...' if len(changed) > 5 else ''}); "
            "build a private model instead"
        )


@pytest.fixture(scope="session")
def tiny_unet():
    """Tiny SD1.5-layout ldm UNetModel (seed 0, context_dim 32), eval, fp32."""
    yield from _guarded(tiny_sd.build_tiny_unet("sd15", seed=0), "tiny_unet")


@pytest.fixture(scope="session")
def tiny_unet_sdxl():
    """Tiny SDXL-layout ldm UNetModel (seed 0, context_dim 32), eval, fp32."""
    yield from _guarded(tiny_sd.build_tiny_unet("sdxl", seed=0), "tiny_unet_sdxl")


@pytest.fixture(scope="session")
def tiny_text_encoder():
    """Tiny transformers CLIPTextModel (seed 0, hidden 32), eval, fp32."""
    yield from _guarded(tiny_sd.build_tiny_text_encoder(seed=0), "tiny_text_encoder")


@pytest.fixture(scope="session")
def clip_bpe():
    """openai-clip's SimpleTokenizer (CLIP BPE; encode() adds no BOS/EOS)."""
    return tiny_sd.clip_bpe()
