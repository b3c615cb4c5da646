"""The txt2img and img2img accordion and the Settings section, built from the parameter model (host-facing)."""

from __future__ import annotations

from typing import Any, Callable

import gradio as gr

from ..concepts import MAX_CONCEPTS, Role
from ..masks import MaskTokens, MaskUpsampling, Morphology
from . import host, loras
from .params import NO_LORA, ROW_FIELDS, SETTING_FIELDS, VERSION, CLoRAArgs, ConceptArgs, ui_value
from .settings import CATEGORY, MAX_ROWS_KEY, SECTION, option_key, settings_defaults

VISIBLE_ROWS = 2
ENUM_CHOICES = {"morphology": [m.value for m in Morphology], "mask_tokens": [m.value for m in MaskTokens],
                "mask_upsampling": [m.value for m in MaskUpsampling]}


def _component(name: str, value: Any, **kwargs: Any) -> gr.components.Component:
    """The component for one model field: slider for bounded numbers, dropdowns for enums."""
    field = {**CLoRAArgs.__fields__, **ConceptArgs.__fields__}[name]
    info = field.field_info
    label = info.title or name
    if name in ENUM_CHOICES:
        if info.description:
            kwargs["info"] = info.description
        return gr.Dropdown(label=label, choices=ENUM_CHOICES[name], value=value, **kwargs)
    if name == "role":
        return gr.Dropdown(label=label, choices=[r.label for r in Role], value=value, **kwargs)
    if isinstance(value, bool):
        return gr.Checkbox(label=label, value=value, **kwargs)
    if info.ge is not None and info.le is not None:
        return gr.Slider(label=label, minimum=info.ge, maximum=info.le, step=_slider_step(field), value=value, **kwargs)
    return gr.Textbox(label=label, value=value, placeholder=info.description or "", **kwargs)


def _slider_step(field: Any) -> float:
    """Integers step by 1; a field may name its own step (``ui_step``); else by its range."""
    info = field.field_info
    if "ui_step" in info.extra:
        return info.extra["ui_step"]
    default = field.get_default()
    if isinstance(default, int) and not isinstance(default, bool):
        return 1
    return 0.05 if info.le - info.ge <= 10 else 0.5


def build(is_img2img: bool) -> list:
    """All inputs in the model's positional order: enabled, 8 rows, advanced settings. The same
    accordion in txt2img and img2img; element ids carry the tab (``clora-img2img-...``)."""
    components = host.ui_components()
    tab = "img2img" if is_img2img else "txt2img"

    def elem(name: str) -> str:
        return f"clora-{tab}-{name}"

    defaults = settings_defaults()
    names = [NO_LORA, *loras.lora_names()]
    row_defaults = ConceptArgs.__fields__
    inputs: list = []
    dropdowns: list[gr.Dropdown] = []
    buttons: list = []
    with components.InputAccordion(False, label="CLoRA", elem_id=f"clora-{tab}") as enabled:
        with enabled.extra():
            gr.HTML(f"<span class='clora-version'>v{VERSION}</span>")
        inputs.append(enabled)
        note = "Map subjects of the prompt to LoRAs; each content LoRA acts only where its subject is."
        if is_img2img:
            note += " In inpainting, only inside the mask."
        gr.HTML(f"<p class='clora-note'>{note}</p>")
        more = None
        for i in range(MAX_CONCEPTS):
            if i == VISIBLE_ROWS:
                more = gr.Accordion(f"Concepts {VISIBLE_ROWS + 1}-{MAX_CONCEPTS}", open=False, elem_id=elem("more"))
                more.__enter__()
            with components.FormRow(elem_id=elem(f"row-{i}"), elem_classes=["clora-row"]):
                row = {}
                for name in ROW_FIELDS:
                    default = NO_LORA if name == "lora" else ui_value(name, row_defaults[name].get_default())
                    if name == "lora":
                        row[name] = gr.Dropdown(
                            label="LoRA", choices=names, value=default, elem_id=elem(f"lora-{i}"), allow_custom_value=True
                        )
                        buttons.append(components.ToolButton(value="\U0001f504", elem_id=elem(f"refresh-{i}"),
                                                             tooltip="Refresh LoRAs"))
                        dropdowns.append(row[name])
                    else:
                        row[name] = _component(name, default, elem_id=elem(f"{name}-{i}"))
                row["lora"].input(fn=loras.activation_text, inputs=[row["lora"]], outputs=[row["trigger"]], show_progress=False)
                inputs.extend(row[name] for name in ROW_FIELDS)
        if more is not None:
            more.__exit__(None, None, None)
        with gr.Accordion("Advanced", open=False, elem_id=elem("advanced")):
            for name in SETTING_FIELDS:
                inputs.append(_component(name, defaults[name], elem_id=elem(name)))
    for button in buttons:
        button.click(fn=_refresh(len(dropdowns)), inputs=[], outputs=dropdowns, show_progress=False)
    return inputs


def _refresh(count: int) -> Callable[[], list]:
    def refresh() -> list:
        loras.refresh()
        choices = [NO_LORA, *loras.lora_names()]
        return [gr.update(choices=choices) for _ in range(count)]

    return refresh


def register_settings() -> None:
    """Settings tab: the paper's defaults for the advanced parameters."""
    fields = CLoRAArgs.__fields__
    for name in SETTING_FIELDS:
        field = fields[name]
        info = field.field_info
        default = ui_value(name, field.get_default())
        if name in ENUM_CHOICES:
            component, args = gr.Dropdown, {"choices": ENUM_CHOICES[name]}
        elif isinstance(default, bool):
            component, args = gr.Checkbox, {}
        elif info.ge is not None and info.le is not None:
            component, args = gr.Slider, {"minimum": info.ge, "maximum": info.le, "step": _slider_step(field)}
        else:
            component, args = gr.Textbox, {}
        host.add_setting(option_key(name), default, f"CLoRA default: {info.title}", component, args, SECTION, CATEGORY)
    host.add_setting(MAX_ROWS_KEY, 0, "CLoRA: most UNet rows per call (0: no limit; lower it when VRAM runs out)",
                     gr.Slider, {"minimum": 0, "maximum": 64, "step": 1}, SECTION, CATEGORY)
