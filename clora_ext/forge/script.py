"""The AlwaysOn script Forge Neo and Forge 2.x load: the shared UI, and the hand-over to the ``runtime`` (host-facing)."""

from __future__ import annotations

from typing import Any

from modules import script_callbacks, scripts  # the script API itself: what every extension subclasses

from ..a1111 import infotext, ui
from . import runtime

script_callbacks.on_ui_settings(ui.register_settings)


class CLoRAScript(scripts.Script):
    def title(self) -> str:
        return "CLoRA"

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool) -> list:
        inputs = ui.build(is_img2img)
        self.infotext_fields = [(component, infotext.paste_field(i)) for i, component in enumerate(inputs)]
        self.paste_field_names = [infotext.KEY]
        return inputs

    def process(self, p: Any, *args: Any) -> None:
        runtime.begin(p, args)

    def process_before_every_sampling(self, p: Any, *args: Any, **kwargs: Any) -> None:
        runtime.before_sampling(p)

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        previews = runtime.previews_of(p)
        processed.images.extend(previews)
        processed.infotexts.extend([""] * len(previews))
