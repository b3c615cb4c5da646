"""The AlwaysOn script class both glues load (host-facing): the shared UI, infotext fields and the
hand-over to the glue's ``runtime``. No side effects at import: each glue's ``script`` module
subclasses it, names its runtime and installs what it needs."""

from __future__ import annotations

from typing import Any

from modules import scripts  # the script API itself: what every extension subclasses

from . import infotext, ui


class CLoRAScriptBase(scripts.Script):
    runtime: Any  # the glue's runtime module: begin(p, args), previews_of(p)

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
        self.runtime.begin(p, args)

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        previews = self.runtime.previews_of(p)
        processed.images.extend(previews)
        processed.infotexts.extend([""] * len(previews))
