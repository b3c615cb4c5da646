"""Prompt schedules and learned conditioning: Neo keeps AUTOMATIC1111's prompt parser, so this is
the A1111 fake's (tests/host/fake_a1111/modules/prompt_parser.py), loaded as this module.

``use_release("2.26")`` puts Neo 2.26's signatures in place (the tests set it for that release):
``get_learned_conditioning(model, prompts, steps, hires_steps=None)``, and the same loss of
``use_old_scheduling`` in ``get_learned_conditioning_prompt_schedules`` and
``get_multicond_learned_conditioning``, where passing it is a TypeError, as there.
``use_release(None)`` puts the February tree's (A1111's) back."""

import os

_PATH = os.path.join(os.path.dirname(__file__), *[os.pardir] * 3, "host", "fake_a1111", "modules", "prompt_parser.py")
_A1111 = {"__name__": __name__}  # the A1111 fake's functions call each other here, whatever this module swaps
with open(_PATH, encoding="utf8") as _f:
    exec(compile(_f.read(), os.path.abspath(_PATH), "exec"), _A1111)
globals().update({k: v for k, v in _A1111.items() if not k.startswith("__")})

_WITH_OLD_SCHEDULING = (_A1111["get_learned_conditioning_prompt_schedules"], _A1111["get_learned_conditioning"],
                        _A1111["get_multicond_learned_conditioning"])


def _schedules_226(prompts, base_steps, hires_steps=None):
    return _WITH_OLD_SCHEDULING[0](prompts, base_steps, hires_steps, False)


def _learned_226(model, prompts, steps, hires_steps=None):
    return _WITH_OLD_SCHEDULING[1](model, prompts, steps, hires_steps, False)


def _multicond_226(model, prompts, steps, hires_steps=None):
    return _WITH_OLD_SCHEDULING[2](model, prompts, steps, hires_steps, False)


def use_release(release):
    global get_learned_conditioning_prompt_schedules, get_learned_conditioning, get_multicond_learned_conditioning
    functions = (_schedules_226, _learned_226, _multicond_226) if release == "2.26" else _WITH_OLD_SCHEDULING
    get_learned_conditioning_prompt_schedules, get_learned_conditioning, get_multicond_learned_conditioning = functions
