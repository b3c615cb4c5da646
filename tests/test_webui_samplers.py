"""Every sampler of A1111 v1.10.1 has a stated CLoRA support and a true reason where updates cannot run."""

from __future__ import annotations

import pytest

from clora_ext.webui.samplers import SUPPORT, support

# (label, function name) of every sampler A1111 v1.10.1 offers (sd_samplers_kdiffusion, _timesteps, _lcm)
HOST_1_10_1 = [
    ("DPM++ 2M", "sample_dpmpp_2m"), ("DPM++ SDE", "sample_dpmpp_sde"), ("DPM++ 2M SDE", "sample_dpmpp_2m_sde"),
    ("DPM++ 2M SDE Heun", "sample_dpmpp_2m_sde"), ("DPM++ 2S a", "sample_dpmpp_2s_ancestral"),
    ("DPM++ 3M SDE", "sample_dpmpp_3m_sde"), ("Euler a", "sample_euler_ancestral"), ("Euler", "sample_euler"),
    ("LMS", "sample_lms"), ("Heun", "sample_heun"), ("DPM2", "sample_dpm_2"), ("DPM2 a", "sample_dpm_2_ancestral"),
    ("DPM fast", "sample_dpm_fast"), ("DPM adaptive", "sample_dpm_adaptive"), ("Restart", "restart_sampler"),
    ("DDIM", "ddim"), ("DDIM CFG++", "ddim_cfgpp"), ("PLMS", "plms"), ("UniPC", "unipc"), ("LCM", "sample_lcm"),
]
UPDATES = {"Euler", "Euler a", "LMS", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "DDIM",
           "DDIM CFG++", "LCM"}


@pytest.mark.parametrize("label,func", HOST_1_10_1)
def test_every_host_sampler_is_known(label, func):
    assert func in SUPPORT
    s = support(func)
    assert s.updates == (label in UPDATES)
    if not s.updates:
        assert s.reason and "more than once" not in s.reason


def test_one_call_samplers_are_not_said_to_call_twice():
    # the note of 0.1.0 said LCM, UniPC and DDIM CFG++ call the model more than once per step
    assert support("sample_lcm").updates and support("ddim_cfgpp").updates
    assert "corrector" in support("unipc").reason


def test_timestep_samplers_count_one_step_fewer():
    assert support("ddim").one_step_fewer and support("ddim_cfgpp").one_step_fewer
    assert not support("sample_euler").one_step_fewer


def test_an_unknown_sampler_gets_no_updates_and_says_why():
    s = support("sample_something_new")
    assert not s.updates and "not known" in s.reason
