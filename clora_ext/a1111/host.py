"""Every access to AUTOMATIC1111's own internals, in one module (the A1111 host seam).

The rest of the A1111 glue never imports the host's ``modules`` or the Lora extension's
``networks``: it asks this module, or ``clora_ext.webui.host`` for what every web UI host
shares (options, processing objects, state, the Lora listing). What differs between the supported
versions (1.8.0 to 1.10.1) is decided here, so a host change is one edit here, and
CI drives the glue through a fake host (tests/host/) that stands in for these
imports.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from modules import (
    devices,
    patches,
    processing,
    prompt_parser,
    sd_samplers_cfg_denoiser,
    sd_samplers_common,
    sd_samplers_kdiffusion,
    shared,
)

from ..webui.host import networks, option


# -- model and options ---------------------------------------------------------------------------


def sd_model() -> Any:
    return shared.sd_model


def model_family(model: Any) -> str:
    return "SDXL" if model.is_sdxl else "SD2" if model.is_sd2 else "SD1"


def unet(model: Any) -> torch.nn.Module:
    return model.model.diffusion_model


def is_unclip(model: Any) -> bool:
    return model.model.conditioning_key == "crossattn-adm"


def is_edit_model(model: Any) -> bool:
    """instruct-pix2pix checkpoints: three rows per image and their own CFG."""
    return getattr(model, "cond_stage_key", None) == "edit"


def text_encoder(model: Any) -> torch.nn.Module:
    """The SD1.x CLIP text transformer (the fallback reader routes its deltas there)."""
    return model.cond_stage_model.wrapped.transformer


def empty_prompt_cond(model: Any) -> torch.Tensor:
    """The host's encoding of the empty prompt, used to pad conds to a common length."""
    return model.cond_stage_model_empty_prompt


def pads_cond_uncond() -> bool:
    """Whether the host pads cond and uncond to one length (1.10 has two such options)."""
    return bool(option("pad_cond_uncond", False) or option("pad_cond_uncond_v0", False))


def encoding_options(model: Any) -> tuple:
    """What changes an encoding besides its text: the model and the options the host's cond cache keys on."""
    return (
        id(model),
        model.sd_checkpoint_info,
        option("CLIP_stop_at_last_layers"),
        option("emphasis"),  # 1.8.0+
        option("sdxl_crop_left"),
        option("sdxl_crop_top"),
        option("comma_padding_backtrack"),
    )


# -- host version and neighbours ---------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def host_label() -> str:
    """"AUTOMATIC1111 <version tag>", as messages name the host."""
    try:
        from modules import launch_utils

        return f"AUTOMATIC1111 {launch_utils.git_tag()}"
    except Exception:  # noqa: BLE001 - no tag to read (a copy without git): the name alone
        return "AUTOMATIC1111"


def replaced_unet_label() -> str | None:
    """The label of a UNet that replaces the model's (TensorRT, ...), or None."""
    from modules import sd_unet

    current = sd_unet.current_unet
    if current is None:
        return None
    return str(getattr(getattr(current, "option", None), "label", "another UNet"))


# -- sd-webui-controlnet (Mikubill), when installed ----------------------------------------------


CONTROLNET_MARK = 1024.0  # ControlNet prepends a token of +-1024 to the prompts it hooks (cond/uncond)


def controlnet_marked(cond: Any) -> bool:
    """Whether ControlNet marked this conditioning (a MulticondLearnedConditioning, a list of
    schedules or a tensor): it hooked this sampling pass."""
    try:
        tensor = cond.batch[0][0].schedules[0].cond if hasattr(cond, "batch") else cond
        if isinstance(tensor, list):
            tensor = tensor[0][0].cond
    except (AttributeError, IndexError, TypeError):
        return False
    if isinstance(tensor, dict):
        tensor = tensor.get("crossattn")
    if not torch.is_tensor(tensor) or tensor.ndim < 2:
        return False
    return bool(((tensor[..., 0, :].float().abs() - CONTROLNET_MARK).abs().mean() < 1e-3).item())


def forget_cached_conds(p: Any) -> None:
    """Drop the host's prompt cache when ControlNet marked it in place and sampling stopped before
    ControlNet's UNet hook took the marks off again (a refused request); else the next request with
    the same prompt would reuse the marked conds."""
    if not any(controlnet_marked(getattr(p, name, None)) for name in ("c", "uc", "hr_c", "hr_uc")):
        return
    processing.StableDiffusionProcessing.cached_c = [None, None]
    processing.StableDiffusionProcessing.cached_uc = [None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None]


# -- the CFG denoiser ------------------------------------------------------------------------


def wrap_denoiser_forward(make: Callable[[Callable], Callable], owner: str) -> None:
    """Replace CFGDenoiser.forward by ``make(original)``, once (the host's patch registry)."""
    cls = sd_samplers_cfg_denoiser.CFGDenoiser
    if getattr(cls.forward, "__clora__", False):
        return
    wrapper = make(cls.forward)
    wrapper.__clora__ = True
    patches.patch(owner, cls, "forward", wrapper)


def denoiser_p(denoiser: Any) -> Any:
    return getattr(denoiser, "p", None)


def denoiser_step(denoiser: Any) -> int:
    """The model step the denoiser is at (0-based, counted by the host's forward)."""
    return int(denoiser.step)


def denoiser_total_steps(denoiser: Any) -> int:
    """The model calls the sampler is expected to make in this pass: the steps that actually run
    (in img2img, those left at the denoising strength)."""
    return int(denoiser.total_steps)


def inner_model(denoiser: Any) -> Any:
    return denoiser.inner_model


@contextlib.contextmanager
def inner_model_replaced(denoiser: Any, proxy: Any) -> Iterator[None]:
    """``proxy`` stands in for the denoiser's inner model during one host forward. The SDXL
    refiner switch replaces the wrapper inside that forward: then the host's stays."""
    inner = denoiser.inner_model
    denoiser.model_wrap = proxy
    try:
        yield
    finally:
        if denoiser.model_wrap is proxy:
            denoiser.model_wrap = inner


def sigma_space(denoiser: Any) -> bool:
    """k-diffusion samplers (LCM's included) hand the model x_t / sqrt(abar); the timestep ones x_t."""
    return isinstance(denoiser.sampler, sd_samplers_kdiffusion.KDiffusionSampler)


def sampler_function(denoiser: Any) -> str | None:
    func = getattr(denoiser.sampler, "funcname", None)
    return getattr(func, "__name__", func)


def inpaint_region(denoiser: Any) -> torch.Tensor | None:
    """Where the host repaints (1) and keeps the original (0), latent-sized, or None outside inpainting."""
    return getattr(denoiser, "nmask", None) if getattr(denoiser, "mask", None) is not None else None


# -- state: interrupt, progress ---------------------------------------------------------------


def raise_interrupted() -> None:
    raise sd_samplers_common.InterruptedException


# -- prompts -----------------------------------------------------------------------------------


def prompt_schedules(texts: list[str], steps: int, hires_steps: int | None) -> list[list[tuple[int, str]]]:
    """[(end_at_step, text)] per text, by the host's prompt-editing rules."""
    raw = prompt_parser.get_learned_conditioning_prompt_schedules(texts, steps, hires_steps, _old_scheduling())
    return [[(int(end), text) for end, text in schedule] for schedule in raw]


def learned_conditioning(texts: list[str], negative: bool, steps: int, hires_steps: int | None,
                         width: int, height: int) -> list[list[tuple[int, Any]]]:
    """[(end_at_step, cond)] per text, encoded by the host with the active text-encoder LoRAs
    (cond: a tensor, or SDXL's dict of tensors)."""
    conditioning = prompt_parser.SdConditioning(texts, is_negative_prompt=negative, width=width, height=height)
    with devices.autocast():
        scheduled = prompt_parser.get_learned_conditioning(shared.sd_model, conditioning, steps, hires_steps,
                                                           _old_scheduling())
    return [[(int(c.end_at_step), c.cond) for c in schedule] for schedule in scheduled]


def subprompt_counts(cond: Any) -> list[int]:
    """Sub-prompts per image of the host's multi-cond (more than one: an AND prompt)."""
    return [len(c) for c in cond.batch]


def scheduling_options() -> tuple:
    return (_old_scheduling(),)


def _old_scheduling() -> bool:
    return bool(option("use_old_scheduling", False))


# -- the built-in Lora extension ------------------------------------------------------------------


def lora_family(entry: Any) -> str:
    """"SD1", "SD2", "SDXL" or "Unknown", as the host read the file's metadata."""
    return getattr(getattr(entry, "sd_version", None), "name", "Unknown")


def load_network(name: str, entry: Any) -> Any:
    """A Network parsed by the host's own loader, never put in the host's cache.

    The loader builds throwaway Linear/Conv2d layers, whose initialisation draws from torch's
    global generator; CLoRA loads inside a sampling pass, after the host has seeded, so the
    generator's state is put back (else the next img2img's VAE sampling would change)."""
    with torch.random.fork_rng(devices=[]):
        return networks().load_network(name, entry)


@dataclass(frozen=True)
class NetworkModule:
    """One module of a host Network, read into what the glue needs (the host's object stays behind it).

    ``kind``: "lora" (also LoCon), "loha", "lokr" or the host's class name for other types;
    ``factors``: the kind's tensors by name (LoRA: up, down, mid; LoHa: w1a, w1b, w2a, w2b,
    t1, t2; LoKr: w1, w1a, w1b, w2, w2a, w2b, t2), None where the file has none; ``plain``:
    no bias or DoRA terms, so the delta is the factors times ``scale``; ``updown(weight)``:
    the host's own (delta, extra bias) at multiplier 1.
    """

    key: str
    target: torch.nn.Module
    kind: str
    factors: dict
    plain: bool
    scale: float
    updown: Callable[[torch.Tensor], tuple]


_KINDS = {"NetworkModuleLora": "lora", "NetworkModuleHada": "loha", "NetworkModuleLokr": "lokr"}


_FACTORS = {
    "lora": {"up": "up_model", "down": "down_model", "mid": "mid_model"},
    "loha": {"w1a": "w1a", "w1b": "w1b", "w2a": "w2a", "w2b": "w2b", "t1": "t1", "t2": "t2"},
    "lokr": {"w1": "w1", "w1a": "w1a", "w1b": "w1b", "w2": "w2", "w2a": "w2a", "w2b": "w2b", "t2": "t2"},
}


def network_modules(net: Any) -> list[NetworkModule]:
    """The modules of a Network loaded by ``load_network``, its multipliers set to 1 (our own
    object: CLoRA puts the multipliers on its routes)."""
    net.te_multiplier = net.unet_multiplier = 1.0
    out = []
    for module in net.modules.values():
        kind = _KINDS.get(type(module).__name__, type(module).__name__)
        factors = {}
        for name, attr in _FACTORS.get(kind, {}).items():
            value = getattr(module, attr, None)
            factors[name] = value.weight.detach() if isinstance(value, torch.nn.Module) else \
                None if value is None else value.detach()
        # 1.9+ carry bias and DoRA terms; 1.8's modules have no dora_scale
        plain = getattr(module, "bias", None) is None and getattr(module, "dora_scale", None) is None
        out.append(NetworkModule(module.sd_key, module.sd_module, kind, factors, plain,
                                 float(module.calc_scale()) if plain else 1.0, module.calc_updown))
    return out


def keep_network_modules(net: Any, keep: Callable[[torch.nn.Module], bool]) -> None:
    """Drop the Network's modules whose target module ``keep`` rejects."""
    net.modules = {k: m for k, m in net.modules.items() if keep(m.sd_module)}


def prompt_loras() -> tuple:
    """The LoRAs the prompt itself loaded (<lora:...> tags): they change every encoding."""
    return tuple((n.name, n.te_multiplier, getattr(n, "mtime", None)) for n in networks().loaded_networks)


@contextlib.contextmanager
def text_encoder_networks(nets: list[tuple[Any, float]]) -> Iterator[None]:
    """Host Networks [(network, te_multiplier)] active on the text encoder, on top of the prompt's own."""
    loaded = networks().loaded_networks
    saved = list(loaded)
    try:
        for net, weight in nets:
            net.te_multiplier = weight
            loaded.append(net)
        yield
    finally:
        loaded[:] = saved  # in place: the host holds this list
