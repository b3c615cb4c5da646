"""The AlwaysOn script A1111 loads: the shared script class over the A1111 ``runtime``, whose denoiser
wrapper is installed at import (host-facing)."""

from __future__ import annotations

from modules import script_callbacks

from ..webui import ui
from ..webui.script_base import CLoRAScriptBase
from . import runtime

runtime.install()
script_callbacks.on_ui_settings(ui.register_settings)


class CLoRAScript(CLoRAScriptBase):
    runtime = runtime
