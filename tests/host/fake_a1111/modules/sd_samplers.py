"""The sampler list, like ``modules.sd_samplers`` (names -> configs)."""

from __future__ import annotations

from . import shared
from .sd_samplers_common import SamplerConfig

_ALL = {
    "Euler": SamplerConfig("Euler", "sample_euler"),
    "Euler a": SamplerConfig("Euler a", "sample_euler_ancestral"),
    "Heun": SamplerConfig("Heun", "sample_heun", second_order=True),
    "DPM++ 2M": SamplerConfig("DPM++ 2M", "sample_dpmpp_2m"),
    "LCM": SamplerConfig("LCM", "sample_lcm"),
    "DDIM": SamplerConfig("DDIM", "ddim"),
    "DDIM CFG++": SamplerConfig("DDIM CFG++", "ddim_cfgpp"),
    "UniPC": SamplerConfig("UniPC", "unipc"),
}


def all_samplers() -> dict[str, SamplerConfig]:
    names = shared.features()["samplers"]
    return {k: v for k, v in _ALL.items() if v.funcname in names}


def find_sampler_config(name):
    return all_samplers().get(name)


def create_sampler(name, model):
    from . import sd_samplers_kdiffusion, sd_samplers_timesteps

    config = find_sampler_config(name)
    if config is None:
        raise ValueError(f"bad sampler name: {name}")
    if config.funcname in sd_samplers_timesteps.FUNCTIONS:
        return sd_samplers_timesteps.CompVisSampler(config, model)
    return sd_samplers_kdiffusion.KDiffusionSampler(config, model)
