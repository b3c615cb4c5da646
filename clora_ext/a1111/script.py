"""The AlwaysOn script: UI, argument parsing, infotext and the run's lifecycle (host-facing).

Errors in the arguments cannot be raised from ``process`` (the host logs and
swallows script exceptions there); they are kept and raised at the generation's
first model call, which fails the request (HTTP 422 through the API).
"""

from __future__ import annotations

from typing import Any

from modules import processing, script_callbacks, scripts

from . import infotext, lora_bridge, runtime, ui
from .params import POSITIONAL_LENGTH, CLoRAArgsError, parse_args
from .plan import CLoRARuntimeError

runtime.install()
script_callbacks.on_ui_settings(ui.register_settings)


class CLoRAScript(scripts.Script):
    def title(self) -> str:
        return "CLoRA"

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool) -> list:
        if is_img2img:
            return ui.build_img2img()
        inputs, _ = ui.build_txt2img()
        self.infotext_fields = [(component, _paste(i)) for i, component in enumerate(inputs)]
        self.paste_field_names = [infotext.KEY]
        return inputs

    def process(self, p: Any, *args: Any) -> None:
        runtime.reset()  # a failed generation skips postprocess
        if not isinstance(p, processing.StableDiffusionProcessingTxt2Img):
            if args and _wants_clora(args):  # refused (HTTP 422), never run without CLoRA
                runtime.start(p, None, CLoRARuntimeError(
                    "CLoRA: img2img and inpainting are not supported yet; use txt2img, or send the request "
                    "without CLoRA"))
            return
        try:
            parsed = parse_args(args, ui.settings_defaults())
        except CLoRAArgsError as e:
            if _wants_clora(args):
                runtime.start(p, None, e)
            return
        if not parsed.enabled:
            return
        if not parsed.concepts:
            print("CLoRA: enabled without any concept row (subject + LoRA); nothing to do")
            return
        try:
            runtime.check_host()
            for concept in parsed.concepts:
                lora_bridge.on_disk(concept.lora)  # fail early, naming a LoRA that is missing
        except CLoRARuntimeError as e:
            runtime.start(p, None, e)
            return
        p.extra_generation_params[infotext.KEY] = infotext.dump(parsed)
        runtime.start(p, parsed)

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        run = runtime.finish(p)
        if run is None or run.args is None or not run.args.previews:
            return
        previews = run.previews.images()
        processed.images.extend(previews)
        processed.infotexts.extend([""] * len(previews))


def _wants_clora(args: tuple) -> bool:
    first = args[0]
    return bool(first.get("enabled", True)) if isinstance(first, dict) else bool(first)


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
