"""The sampler list, like ``modules.sd_samplers`` (names -> configs)."""

from __future__ import annotations

from .sd_samplers_common import SamplerConfig

_ALL = {
    "Euler": SamplerConfig("Euler", "sample_euler"),
    "Euler a": SamplerConfig("Euler a", "sample_euler_ancestral"),
    "Heun": SamplerConfig("Heun", "sample_heun", second_order=True),
}


def all_samplers() -> dict[str, SamplerConfig]:
    return dict(_ALL)


def find_sampler_config(name):
    return _ALL.get(name)


def create_sampler(name, model):
    from . import sd_samplers_kdiffusion

    config = find_sampler_config(name)
    if config is None:
        raise ValueError(f"bad sampler name: {name}")
    return sd_samplers_kdiffusion.KDiffusionSampler(config, model)
