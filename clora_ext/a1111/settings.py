"""The Settings tab's CLoRA defaults, as the host stores them (host-facing, no UI code)."""

from __future__ import annotations

from typing import Any

from . import host
from .params import SETTING_FIELDS, CLoRAArgs, ui_value

SECTION = ("clora", "CLoRA")
CATEGORY = "sd"  # 1.10 groups Settings by category; CLoRA sits beside Extra Networks


def option_key(name: str) -> str:
    return f"clora_{name}"


def settings_defaults() -> dict[str, Any]:
    """The Settings tab's defaults for the advanced parameters, as UI values."""
    fields = CLoRAArgs.__fields__
    return {name: host.option(option_key(name), ui_value(name, fields[name].get_default())) for name in SETTING_FIELDS}
