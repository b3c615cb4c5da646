"""Prompt schedules and learned conditioning: Neo keeps AUTOMATIC1111's prompt parser, so this is
the A1111 fake's (tests/host/fake_a1111/modules/prompt_parser.py), loaded as this module."""

import os

_PATH = os.path.join(os.path.dirname(__file__), *[os.pardir] * 3, "host", "fake_a1111", "modules", "prompt_parser.py")
with open(_PATH, encoding="utf8") as _f:
    exec(compile(_f.read(), os.path.abspath(_PATH), "exec"))
