"""The AlwaysOn script the host loads: its UI, and the hand-over to ``runtime`` (host-facing)."""

from __future__ import annotations

from typing import Any

from modules import script_callbacks, scripts  # the script API itself: what every extension subclasses

from . import infotext, runtime, ui
from .params import POSITIONAL_LENGTH

runtime.install()
script_callbacks.on_ui_settings(ui.register_settings)


class CLoRAScript(scripts.Script):
    def title(self) -> str:
        return "CLoRA"

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool) -> list:
        inputs = ui.build(is_img2img)
        self.infotext_fields = [(component, _paste(i)) for i, component in enumerate(inputs)]
        self.paste_field_names = [infotext.KEY]
        return inputs

    def process(self, p: Any, *args: Any) -> None:
        runtime.begin(p, args)

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        previews = runtime.previews_of(p)
        processed.images.extend(previews)
        processed.infotexts.extend([""] * len(previews))


_pasted: dict = {}  # the last entry read, shared by all inputs: one paste parses it once


def _paste(index: int):
    """Infotext paste for the input at ``index``: every input reads the one "CLoRA" entry."""

    def paste(params: dict) -> Any:
        key = params.get(infotext.KEY)
        if "values" not in _pasted or _pasted["key"] != key:
            _pasted.update(key=key, values=infotext.paste_values(params))
        values = _pasted["values"] or [None] * POSITIONAL_LENGTH
        return values[index]

    return paste
