"""The AlwaysOn script A1111 loads: the shared script class over the A1111 ``runtime``, whose denoiser
wrapper is installed at import (host-facing)."""

from __future__ import annotations

from modules import script_callbacks

from . import runtime, ui
from .script_base import CLoRAScriptBase

runtime.install()
script_callbacks.on_ui_settings(ui.register_settings)


class CLoRAScript(CLoRAScriptBase):
    runtime = runtime
