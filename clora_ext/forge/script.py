"""The AlwaysOn script the Forge hosts load: the shared script class over the Forge ``runtime``, which
sets up each sampling in ``process_before_every_sampling`` (host-facing)."""

from __future__ import annotations

from typing import Any

from modules import script_callbacks

from ..webui import ui
from ..webui.script_base import CLoRAScriptBase
from . import runtime

script_callbacks.on_ui_settings(ui.register_settings)


class CLoRAScript(CLoRAScriptBase):
    runtime = runtime

    def process_before_every_sampling(self, p: Any, *args: Any, **kwargs: Any) -> None:
        runtime.before_sampling(p)
