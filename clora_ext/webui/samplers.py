"""Which of the host's samplers can take CLoRA's latent updates, and why not where they cannot (pure).

An update changes, in place, the tensor the sampler hands the model. It counts when
the sampler calls the model once per step and continues from that tensor (or from
the prediction made at it); it is lost or miscounted otherwise. Read from A1111
v1.10.1's sampler code (modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps_impl.py,
sd_samplers_lcm.py, sd_samplers_extra.py, k-diffusion's sampling.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplerSupport:
    updates: bool
    reason: str = ""  # why no update runs (when ``updates`` is False)
    one_step_fewer: bool = False  # N steps are N-1 model calls (the host's timestep samplers)


_SECOND_ORDER = ("calls the model twice per step (at the latent and at a trial point), so model calls do not match "
                 "steps and an update at the trial point would be thrown away")
_ADAPTIVE = "chooses its own number of model calls, so steps cannot be matched to the update schedule"

SUPPORT: dict[str, SamplerSupport] = {
    # k-diffusion samplers: one call per step, the next latent is built from the one handed over
    "sample_euler": SamplerSupport(True),
    "sample_euler_ancestral": SamplerSupport(True),
    "sample_lms": SamplerSupport(True),
    "sample_dpmpp_2m": SamplerSupport(True),
    "sample_dpmpp_2m_sde": SamplerSupport(True),
    "sample_dpmpp_3m_sde": SamplerSupport(True),
    # LCM: one call per step; the next latent is the prediction made at the updated latent
    "sample_lcm": SamplerSupport(True),
    # timestep samplers: DDIM and DDIM CFG++ loop over N-1 intervals
    "ddim": SamplerSupport(True, one_step_fewer=True),
    "ddim_cfgpp": SamplerSupport(True, one_step_fewer=True),
    "sample_heun": SamplerSupport(False, _SECOND_ORDER),
    "sample_dpm_2": SamplerSupport(False, _SECOND_ORDER),
    "sample_dpm_2_ancestral": SamplerSupport(False, _SECOND_ORDER),
    "sample_dpmpp_sde": SamplerSupport(False, _SECOND_ORDER),
    "sample_dpmpp_2s_ancestral": SamplerSupport(False, _SECOND_ORDER),
    "restart_sampler": SamplerSupport(False, "calls the model several times per step (second-order steps and restarts)"),
    "sample_dpm_fast": SamplerSupport(False, _ADAPTIVE),
    "sample_dpm_adaptive": SamplerSupport(False, _ADAPTIVE),
    "plms": SamplerSupport(False, "calls the model twice in its first step, so the steps after it cannot be matched "
                                  "to the update schedule"),
    "unipc": SamplerSupport(False, "rebuilds each latent from the previous step in its corrector, so an update to the "
                                   "latent it hands the model is lost"),
}


def support(func_name: str | None) -> SamplerSupport:
    """What CLoRA can do on the sampler whose function is named ``func_name``."""
    known = SUPPORT.get(func_name or "")
    if known is not None:
        return known
    return SamplerSupport(False, "is not known to this version of CLoRA, so its calls per step cannot be relied on")
