"""What every supported web UI host shares, in one module (the shared host seam).

AUTOMATIC1111 and the Forge family (Neo, Forge 2.x, reForge, Classic) keep the same
``modules`` API for options, processing objects, state and the built-in Lora extension's
listing; this module is the only place the shared web-UI layer (``clora_ext.webui``) reaches
them. What one host family has of its own is in its folder's ``host`` module
(``clora_ext.a1111.host``, ``clora_ext.forge.host``). CI drives it through the fake hosts
(tests/host, tests/forge), which stand in for these imports.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, Callable, Iterator

from fastapi.exceptions import HTTPException

from modules import extra_networks, processing, sd_samplers, shared

from .passes import PassFacts

RefusalBase = HTTPException  # the API answers these with their status code, without a backtrace


# -- model and options ---------------------------------------------------------------------------


def option(name: str, default: Any = None) -> Any:
    """A host option (``shared.opts``), or ``default`` where this version has none."""
    return getattr(shared.opts, name, default)


def prompt_chunker(model: Any) -> Any:
    """The host's prompt chunker (tokenize_line, id_start, id_end): SD1/2's or SDXL's first encoder."""
    return model.conditioner.embedders[0] if model.is_sdxl else model.cond_stage_model


def add_setting(key: str, default: Any, label: str, component: Any, args: dict, section: tuple, category: str) -> None:
    # category: the Settings page groups sections by it (1.8.0 and 1.10.1)
    shared.opts.add_option(key, shared.OptionInfo(default, label, component, args, section=section, category_id=category))


# -- sd-webui-controlnet (Mikubill), when installed ----------------------------------------------


def controlnet_units_enabled(p: Any) -> list[int]:
    """Indices of the ControlNet units enabled for ``p`` (its script's args); [] without ControlNet."""
    runner = getattr(p, "scripts", None)
    args = getattr(p, "script_args", None) or ()
    for script in getattr(runner, "alwayson_scripts", ()):
        try:
            if script.title().lower() != "controlnet":
                continue
        except Exception:  # another extension's title() failing is not ours to report
            continue
        units = args[script.args_from:script.args_to]
        return [i for i, unit in enumerate(units)
                if (unit.get("enabled", False) if isinstance(unit, dict) else getattr(unit, "enabled", False))]
    return []


# -- processing objects ------------------------------------------------------------------------


def is_txt2img(p: Any) -> bool:
    return isinstance(p, processing.StableDiffusionProcessingTxt2Img)


def is_img2img(p: Any) -> bool:
    return isinstance(p, processing.StableDiffusionProcessingImg2Img)


def pass_facts(p: Any) -> PassFacts:
    hires = bool(getattr(p, "is_hr_pass", False))
    if hires:
        config = sd_samplers.find_sampler_config(p.hr_sampler_name or p.sampler_name)
        steps = p.hr_second_pass_steps or p.steps
        hires_steps = config.total_steps(steps) if config else steps
        return PassFacts(True, list(p.hr_prompts), list(p.hr_negative_prompts), p.hr_sampler_name or p.sampler_name,
                         p.firstpass_steps, hires_steps, p.hr_upscale_to_x, p.hr_upscale_to_y)
    return PassFacts(False, list(p.prompts), list(p.negative_prompts), p.sampler_name, p.firstpass_steps, None,
                     p.width, p.height)


def uses_refiner(p: Any) -> bool:
    """Whether ``p`` switches to a refiner checkpoint part way (1.6+)."""
    return getattr(p, "refiner_checkpoint", None) not in (None, "", "None", "none")


def batch_iteration(p: Any) -> int:
    return int(p.iteration)


def set_generation_param(p: Any, key: str, value: str) -> None:
    p.extra_generation_params[key] = value


def on_close(p: Any, callback: Callable[[], None]) -> None:
    """Call ``callback`` when the host closes ``p``: it always does, after success or failure
    (``with closing(p)`` around every txt2img/img2img run, UI and API)."""
    close = p.close

    def close_with_callback() -> None:
        try:
            callback()
        finally:
            close()

    p.close = close_with_callback


# -- state: interrupt, progress ---------------------------------------------------------------


def interrupted() -> bool:
    return bool(shared.state.interrupted or shared.state.skipped)


def set_progress_text(text: str) -> None:
    shared.state.textinfo = text


@contextlib.contextmanager
def progress_text_kept() -> Iterator[None]:
    text = shared.state.textinfo
    try:
        yield
    finally:
        shared.state.textinfo = text


# -- the built-in Lora extension ------------------------------------------------------------------


class LoraExtensionMissing(RuntimeError):
    pass


def networks() -> Any:
    """The built-in Lora extension's ``networks`` module (loaded by the host with that extension)."""
    try:
        return importlib.import_module("networks")
    except ImportError:
        raise LoraExtensionMissing("CLoRA needs the built-in Lora extension, which is disabled") from None


def lora_names() -> list[str]:
    return sorted(networks().available_networks, key=str.lower)


def refresh_loras() -> None:
    networks().list_available_networks()


def find_lora(name: str) -> Any:
    """The host's entry (``NetworkOnDisk``) for ``name`` or its alias, listing the folder again once; or None."""
    nets = networks()
    found = nets.available_networks.get(name) or nets.available_network_aliases.get(name)
    if found is None:
        nets.list_available_networks()
        found = nets.available_networks.get(name) or nets.available_network_aliases.get(name)
    return found


def lora_path(entry: Any) -> str:
    """The file of a host LoRA entry."""
    return str(entry.filename)


def user_metadata(filename: str) -> dict:
    return extra_networks.get_user_metadata(filename)


# -- UI ----------------------------------------------------------------------------------------


def ui_components() -> Any:
    """The host's Gradio helpers (FormRow, InputAccordion, ToolButton)."""
    from modules import ui_components

    return ui_components
