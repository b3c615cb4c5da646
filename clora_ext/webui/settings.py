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


MAX_ROWS_KEY = "clora_max_rows"  # a Settings option of its own: a resource limit, not a generation parameter


def row_cap(cond_rows: int) -> int | None:
    """The most UNet rows one CLoRA call may take: the Settings cap (0: none), and with the host's
    low-VRAM batching (``batch_cond_uncond`` off) no more than one half (cond or uncond) at a time."""
    cap = int(host.option(MAX_ROWS_KEY, 0) or 0) or None
    if not host.option("batch_cond_uncond", True):
        cap = min(cap or cond_rows, cond_rows)
    return cap
