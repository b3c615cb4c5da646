"""Every access to the internals of the Forge hosts CLoRA runs on (Forge Neo and lllyasviel Forge
2.x with their ``backend`` package, reForge and Forge Classic with their ``ldm_patched``
package, and the sampling objects they put on ``p``), in one module: the seam, where the
hosts' differences are decided.

What these hosts keep of AUTOMATIC1111's API (``shared.opts``, ``shared.state``, the Lora
extension's listing, ``ui_components``, the script classes) is reached through
``clora_ext.a1111.host`` as on A1111; this module holds what only the Forge family has: the
UnetPatcher and its model options, KModel (``ldm_patched``: BaseModel), the host's LoRA reader,
the CLIP patcher and the prompt chunker.

Where Neo's releases differ, the glue asks what the host offers, not its version: Neo 2.26
dropped ``use_old_scheduling`` from the prompt parser's functions (``_scheduling_args`` reads
their signatures); ``host_label`` names the release where ``forge_version.release`` exists.

Where Forge 2.x (lllyasviel, ``forge_version.version == "2.0.1v1.10.1"`` at dfdcbab6) differs
from Neo:
- its LoRA reader returns tuples, ``("lora", (up, down, alpha, mid, dora_scale))``,
  ``("loha", ...)``, ``("lokr", ...)``, not adapter objects (``read_adapter`` reads both into
  the same neutral factors; a format without them gets its dense delta from
  ``merge_lora_to_weight``);
- its KModel leaves the UNet parameters at ``requires_grad=True`` (made under inference mode).
  Measured (torch 2.13, the tiny ldm UNet): ``func.vjp(functionalize(f))`` works on them inside
  inference mode with ``requires_grad`` True or off; outside inference mode it fails unless
  ``requires_grad_(False)``, which then cannot be undone there. So CLoRA's step runs inside
  inference mode on both hosts (``gradient_mode``), where the engine's temporary
  ``requires_grad_(False)`` and its restore both work;
- it never calls the ``cfg_denoised`` callback (the glue uses none of the CFG callbacks).
Everything else the glue uses has the same names and signatures (line numbers differ).

Where reForge (``ldm_patched``, ``forge_version.version == "1.0.0v2-v1.10.1RC"`` at 3b56b268)
differs from Neo (measured in the running host; docs/forge-neo.md):
- the LoRA reader is ``ldm_patched.modules.lora`` (after ``lora_convert.convert_lora``); its
  ``load_lora`` returns only {model key: patch} (Neo's adapter objects, or ``("diff", ...)`` /
  ``("set", ...)`` tuples merged by its ``calculate_weight``), so the unmatched keys are
  counted here; the CLIP patcher's ``add_patches(patches, strength)`` has no file name;
- the prompt chunker is A1111's (``cond_stage_model``; SDXL's first embedder);
- the UNet's weights are ordinary tensors with ``requires_grad=True`` and become inference
  tensors where a prompt LoRA is merged into them; the functional gradient works on both
  inside inference mode only, as on the other two hosts;
- ``sampling_function`` runs without uncond rows at NGMS / "skip early CFG" steps: the
  wrapper then serves the cond rows only (``cond_or_uncond == [0]``).

Forge Classic (``ldm_patched``, ``forge_version.version == "classic"`` at 1f95d717) is reForge's
case except that:
- its reader is the old ComfyUI one: ``load_lora`` returns ({model key: tuple}, unread tensors),
  with ``("lora", (up, down, alpha, mid))`` and the other kinds as tuples, merged by the model
  patcher's ``calculate_weight(patches, weight, key)`` method; there is no ``lora_convert``;
- its residual adds are in place, as Neo's (the functional gradient functionalises them);
- it runs the first step of every pass at CFG 1 (cond rows only) with default settings.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from modules import prompt_parser, sd_samplers_common, shared

from .. import formats
from ..webui import host as webui
from ..webui.compat import CLASSIC, FORGE2, NEO, REFORGE, forge_flavour

NAMES = {NEO: "Forge Neo", FORGE2: "Forge 2.x", REFORGE: "reForge", CLASSIC: "Forge Classic"}


def flavour() -> str:
    """Which host runs: NEO, FORGE2, REFORGE or CLASSIC (``compat.host_glue`` loads this glue on no other)."""
    from modules_forge import forge_version

    version = getattr(forge_version, "version", None)
    found = forge_flavour(version, importlib.util.find_spec("backend") is not None,
                          importlib.util.find_spec("ldm_patched") is not None)
    if found is None:
        raise RuntimeError(f"CLoRA's Forge glue does not serve this host (version {version!r})")
    return found


def host_name() -> str:
    return NAMES[flavour()]


def host_label() -> str:
    """The host's name and version as messages give them ("Forge Neo 2.26", "Forge 2.x 2.0.1v1.10.1");
    Neo's release number where it has one (``forge_version.release``, from mid 2026)."""
    from modules_forge import forge_version

    found = flavour()
    release = getattr(forge_version, "release", None) or getattr(forge_version, "version", None)
    return NAMES[found] if release in (None, NEO, CLASSIC) else f"{NAMES[found]} {release}"


def gradient_mode() -> Any:
    """The mode CLoRA's step (and its functional gradient pass) runs in: inference mode. Every host
    calls the conditioning modifier inside it already; the functional gradient works on Forge
    2.x's ``requires_grad=True`` inference weights, and on reForge's and Classic's mixed ones,
    only there (see the module docstring), so it is made explicit here."""
    return torch.inference_mode()

# -- the UNet patcher of one sampling pass ----------------------------------------------------------


def unet_patcher(p: Any) -> Any:
    """The UnetPatcher this sampling pass will use (reset by the host before every sampling)."""
    return p.sd_model.forge_objects.unet


def install_patcher(p: Any, wrapper: Callable, modifier: Callable) -> Any:
    """A clone of the pass's UnetPatcher with CLoRA's unet function wrapper and conditioning modifier,
    put back on ``p.sd_model.forge_objects``: it lives for this sampling only (the host resets
    ``forge_objects`` from ``forge_objects_after_applying_lora`` before each sampling)."""
    patcher = unet_patcher(p).clone()
    # plain functions, not bound methods: the host deep-copies model_options on every clone (the
    # hires pass clones this patcher), and a bound method would copy its object (the engine) along
    patcher.set_model_unet_function_wrapper(lambda apply_model, args: wrapper(apply_model, args))
    patcher.add_conditioning_modifier(lambda *args: modifier(*args))
    p.sd_model.forge_objects.unet = patcher
    return patcher


def diffusion_model(patcher: Any) -> torch.nn.Module:
    return patcher.model.diffusion_model


def apply_model(kmodel_: Any, model_options: dict, x: torch.Tensor, sigma: torch.Tensor,
                context: torch.Tensor, vector: torch.Tensor | None = None) -> torch.Tensor:
    """KModel.apply_model on rows ``x`` at ``sigma`` with cross-attention ``context``: the x0 prediction.
    ``vector`` (SDXL: each row's pooled text embedding and size embeddings, one row per row of ``x``) goes
    in as ``y``, where the host's own conds put it (``model_conds["y"]``, passed on to the UNet's ``y``)."""
    options = dict(model_options.get("transformer_options", {}))
    options["cond_or_uncond"] = [0]
    options["sigmas"] = sigma
    extra = {} if vector is None else {"y": vector}
    return kmodel_.apply_model(x, sigma, c_crossattn=context, transformer_options=options, **extra)


def step_and_total(p: Any, model_options: dict, sigma: torch.Tensor) -> tuple[int, int]:
    """The model step this call is (0-based) and the model calls the sampler makes in this pass, as
    the CFG denoiser counts them (in img2img: the steps that run at the denoising strength). Without
    a denoiser: the position of ``sigma`` in the sampling's sigma schedule."""
    denoiser = _denoiser(p)
    if denoiser is not None and getattr(denoiser, "total_steps", None):
        return int(denoiser.step), int(denoiser.total_steps)
    sigmas = model_options.get("transformer_options", {}).get("sampling_sigmas")
    if sigmas is None:
        return 0, 1
    sigmas = sigmas.to(sigma.device, torch.float32)
    return int((sigmas[:-1] - float(sigma[0])).abs().argmin()), len(sigmas) - 1


def is_k_diffusion(p: Any) -> bool:
    """The family converts its timestep samplers to sigma space too: the wrapper always sees x0 + sigma*eps."""
    return True


def sampler_function(p: Any) -> str | None:
    func = getattr(getattr(p, "sampler", None), "funcname", None)
    return getattr(func, "__name__", func)


def controlnet_active(p: Any) -> bool:
    """Whether a ControlNet is attached to this sampling's UNet patcher (the host's built-in
    sd_forge_controlnet puts its units there, after CLoRA's pbes or before)."""
    return getattr(unet_patcher(p), "controlnet_linked_list", None) is not None


def _denoiser(p: Any) -> Any:
    return getattr(getattr(p, "sampler", None), "model_wrap_cfg", None)


def inpaint_region(p: Any) -> torch.Tensor | None:
    """Where the host repaints (1) and keeps the original (0), latent-sized, or None outside inpainting."""
    denoiser = _denoiser(p)
    return getattr(denoiser, "nmask", None) if getattr(denoiser, "mask", None) is not None else None


def watch_sampler_latent(p: Any, keep: Callable[[torch.Tensor], None]) -> Any:
    """Hand ``keep`` the sampler's own x at every call of the CFG denoiser (a forward pre-hook on it;
    the handle, or None without a denoiser). In inpainting the host blends x with the noised original
    before the conditioning modifier, which so gets a copy: an update must reach the sampler's x too."""
    denoiser = _denoiser(p)
    if not isinstance(denoiser, torch.nn.Module):
        return None
    return denoiser.register_forward_pre_hook(lambda module, args: keep(args[0]) if args else None)


def is_hires_pass(p: Any) -> bool:
    return bool(getattr(p, "is_hr_pass", False))


# -- LoRA files through the host's own loader -------------------------------------------------------------


def _ldm_patched() -> bool:
    """reForge and Forge Classic: the ``ldm_patched`` package in place of ``backend``."""
    return flavour() in (REFORGE, CLASSIC)


def load_lora_file(path: str) -> dict:
    if _ldm_patched():
        from ldm_patched.modules.utils import load_torch_file
    else:
        from backend.utils import load_torch_file

    return load_torch_file(path, safe_load=True)


def lora_patches(state_dict: dict, p: Any) -> tuple[dict, dict, int]:
    """({UNet key: patch}, {CLIP key: patch}, unmatched count) by the host's own key maps and
    ``load_lora`` (patches: adapter objects or tuples, as the host's reader makes them;
    ``read_adapter`` reads both, and the CLIP ones go back to the host's own CLIP patcher as they
    are). UNet keys are the diffusion model wrapper's state-dict keys (``diffusion_model.<module>.weight``)."""
    if _ldm_patched():
        from ldm_patched.modules import lora
    else:
        from backend.patcher import lora
    objects = p.sd_model.forge_objects
    unet_map = lora.model_lora_keys_unet(objects.unet.model, {})
    clip_map = lora.model_lora_keys_clip(objects.clip.cond_stage_model, {})
    if flavour() != REFORGE:
        unet, rest = lora.load_lora(dict(state_dict), unet_map)
        clip, rest = lora.load_lora(rest, clip_map)
        return unet, clip, len(rest)
    from ldm_patched.modules.lora_convert import convert_lora

    converted = convert_lora(dict(state_dict))
    unet = lora.load_lora(converted, unet_map, log_missing=False)
    clip = lora.load_lora(converted, clip_map, log_missing=False)
    # reForge's reader returns the patches only; it reads a layer's tensors as "<map key>.<name>",
    # so a file key is unplaced when none of its dotted prefixes is a key of either map
    prefixes = set(unet_map) | set(clip_map)
    unmatched = sum(1 for key in converted
                    if not any(key[:i] in prefixes for i, c in enumerate(key) if c == "."))
    return unet, clip, unmatched


@dataclass(frozen=True)
class Adapter:
    """One patch of the host's reader, read: its format's neutral ``factors`` (``formats.Factors``;
    None for a format without one) and ``delta(weight)``, the full weight delta at strength 1 by
    the host's own merge, for the formats the core does not factor. ``delta`` runs the host's merge,
    which may work in place: call it outside any torch.func transform."""

    kind: str
    factors: formats.Factors | None
    delta: Callable[[torch.Tensor], torch.Tensor]


# the tensors of each kind, in the order the comfy-style readers keep them (adapter ``.weights``
# and tuple patches alike); "alpha" and "dora_scale" are read apart from the factors
_LAYOUTS = {
    "lora": ("up", "down", "alpha", "mid", "dora_scale", "reshape"),
    "loha": ("w1a", "w1b", "alpha", "w2a", "w2b", "t1", "t2", "dora_scale"),
    "lokr": ("w1", "w2", "alpha", "w1a", "w1b", "w2a", "w2b", "t2", "dora_scale"),
}
_ADAPTER_KINDS = {"LoRAAdapter": "lora", "LoHaAdapter": "loha", "LoKrAdapter": "lokr"}


def _factors(kind: str, tensors: tuple) -> formats.Factors | None:
    """The neutral factors of one comfy-style patch (``tensors`` in ``_LAYOUTS`` order; a shorter
    tuple, as Forge Classic's without the DoRA scale, leaves the rest None)."""
    names = _LAYOUTS.get(kind)
    if names is None:
        return None
    values = dict(zip(names, (*tensors, *(None,) * len(names))))
    alpha = values.pop("alpha")
    alpha = None if alpha is None else float(alpha)
    plain = values.pop("dora_scale") is None and values.pop("reshape", None) is None
    factors = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in values.items()}
    if kind == "lora":
        scale = alpha / factors["down"].shape[0] if alpha is not None else 1.0
    elif kind == "loha":
        scale = alpha / factors["w1b"].shape[0] if alpha is not None else 1.0
    else:
        scale = formats.lokr_scale(alpha, factors["w1b"], factors["w2b"])
    return formats.Factors(kind, factors, scale, plain)


def read_adapter(key: str, adapter: Any, p: Any) -> Adapter:
    """``adapter``: Neo's and reForge's adapter objects (``.weights``, ``calculate_weight``), or a
    tuple ``(kind, tensors)`` (Forge 2.x's and Forge Classic's readers; reForge's "diff"/"set")."""
    if isinstance(adapter, tuple):
        return _read_patch_tuple(key, adapter, _tuple_merger(p))

    name = type(adapter).__name__
    kind = _ADAPTER_KINDS.get(name, name)
    factors = _factors(kind, tuple(adapter.weights)) if kind in _LAYOUTS else None

    def delta(weight: torch.Tensor) -> torch.Tensor:
        # against zeros, except with a DoRA scale, which renormalises the merged weight
        real = factors is None or not factors.plain
        base = weight.float().clone() if real else torch.zeros_like(weight, dtype=torch.float32)
        return adapter.calculate_weight(base.clone(), key, 1.0, 1.0, None, lambda a: a) - base

    return Adapter(kind, factors, delta)


Merger = Callable[[tuple, torch.Tensor, str], torch.Tensor]


def _tuple_merger(p: Any) -> Merger:
    """The host's own merge of one tuple patch at strength 1 into (a copy of) a float32 weight."""
    host = flavour()
    if host == FORGE2:
        from backend.patcher.lora import merge_lora_to_weight

        return lambda patch, base, key: merge_lora_to_weight([[1.0, patch, 1.0, None, None]], base.clone(), key,
                                                             computation_dtype=torch.float32)
    if host == REFORGE:
        from ldm_patched.modules.lora import calculate_weight

        return lambda patch, base, key: calculate_weight([(1.0, patch, 1.0, None, None)], base.clone(), key,
                                                         intermediate_dtype=torch.float32)
    if host == CLASSIC:  # the old ComfyUI merge, a method of the model patcher
        patcher = unet_patcher(p)
        return lambda patch, base, key: patcher.calculate_weight([(1.0, patch, 1.0)], base.clone(), key)
    raise RuntimeError(f"CLoRA: {NAMES[host]}'s LoRA reader makes no tuple patches")


def _read_patch_tuple(key: str, patch: tuple, merge: Merger) -> Adapter:
    """``("lora", (up, down, alpha, mid[, dora_scale]))`` (Forge 2.x with the DoRA scale, Classic
    without) and the other kinds of those comfy readers (their tensors in ``_LAYOUTS`` order), or a
    one-tensor "diff"/"set". The dense delta comes from the host's own merge; with a DoRA scale, or
    for "set" and kinds not read here, it is taken against the real weight (DoRA renormalises the
    merged weight), otherwise against zeros."""
    kind, tensors = patch
    factors = _factors(str(kind), tuple(tensors)) if kind in _LAYOUTS else None

    def delta(weight: torch.Tensor) -> torch.Tensor:
        real = kind != "diff" and (factors is None or not factors.plain)
        base = weight.float() if real else torch.zeros_like(weight, dtype=torch.float32)
        return merge(patch, base, key) - base

    return Adapter(str(kind), factors, delta)


def model_parameter(p: Any, key: str) -> torch.Tensor:
    return p.sd_model.forge_objects.unet.model.get_parameter(key)


def diffusion_module(p: Any, name: str) -> torch.nn.Module | None:
    """The diffusion model's module ``name`` (a LoRA layer's target), or None."""
    try:
        return diffusion_model(unet_patcher(p)).get_submodule(name)
    except AttributeError:
        return None


# -- text encoder ---------------------------------------------------------------------------------


@contextlib.contextmanager
def text_encoder_patches(p: Any, tag: str, patches: list[tuple[dict, float]]) -> Iterator[None]:
    """The CLIP of ``p.sd_model`` with CLIP patches [(patches, strength)] added to a clone, for the
    duration of the block (the host re-merges its weights from its backups when it is restored)."""
    model = p.sd_model
    original = model.forge_objects.clip
    if not patches:
        yield
        return
    clip = original.clone()
    for i, (patch, strength) in enumerate(patches):
        if _ldm_patched():  # ComfyUI's signature
            clip.add_patches(patch, strength)
        else:
            clip.add_patches(filename=f"{tag}#{i}", patches=patch, strength_patch=strength, online_mode=False)
    model.forge_objects.clip = clip
    try:
        yield
    finally:
        model.forge_objects.clip = original


def _scheduling_args(function: Callable) -> tuple:
    """The host's "use old prompt editing timelines" option as the extra argument ``function`` takes
    (Neo before 2.26, Forge 2.x, reForge, Classic), or nothing: Neo 2.26 dropped the parameter from
    ``get_learned_conditioning`` and ``get_learned_conditioning_prompt_schedules``."""
    if "use_old_scheduling" not in _parameters(function):
        return ()
    return (bool(getattr(shared.opts, "use_old_scheduling", False)),)


@functools.lru_cache(maxsize=None)
def _parameters(function: Callable) -> tuple[str, ...]:
    return tuple(inspect.signature(function).parameters)


def learned_conditioning(p: Any, texts: list[str], negative: bool, steps: int, hires_steps: int | None,
                         width: int, height: int) -> list[list[tuple[int, Any]]]:
    conditioning = prompt_parser.SdConditioning(texts, is_negative_prompt=negative, width=width, height=height)
    function = prompt_parser.get_learned_conditioning
    scheduled = function(p.sd_model, conditioning, steps, hires_steps, *_scheduling_args(function))
    return [[(int(c.end_at_step), c.cond) for c in schedule] for schedule in scheduled]


def prompt_schedules(texts: list[str], steps: int, hires_steps: int | None) -> list[list[tuple[int, str]]]:
    function = prompt_parser.get_learned_conditioning_prompt_schedules
    raw = function(texts, steps, hires_steps, *_scheduling_args(function))
    return [[(int(end), text) for end, text in schedule] for schedule in raw]


def prompt_chunker(p: Any) -> Any:
    """The host's prompt chunker (tokenize_line, id_start, id_end, id_pad): Neo's and Forge 2.x's
    text processing engine (SDXL's first, clip_l's: both of its encoders chunk a prompt alike),
    reForge's and Classic's A1111 embedder."""
    if _ldm_patched():
        return webui.prompt_chunker(p.sd_model)
    model = p.sd_model
    return model.text_processing_engine_l if getattr(model, "is_sdxl", False) else model.text_processing_engine


SUPPORTED_FAMILIES = ("SD1", "SDXL")  # the ``model_family`` names CLoRA runs, on every host of the glue


def model_family(p: Any) -> str:
    """"SD1" or "SDXL", else what the checkpoint is: "SDXL refiner" (the hosts mark it ``is_sdxl`` too;
    it has clip_g only: Neo and Forge 2.x give it no clip_l engine, reForge and Classic make its one
    text embedder the ``cond_stage_model`` instead of the conditioner), "SD2", the engine's class name
    (Flux, ...); " inpainting" appended for an inpainting checkpoint (the UNet takes more than the 4
    latent channels: the masked image and the mask)."""
    model = p.sd_model
    if getattr(model, "is_sd1", False):
        family = "SD1"
    elif getattr(model, "is_sdxl", False):
        if _ldm_patched():
            refiner = getattr(model, "cond_stage_model", None) is not getattr(model, "conditioner", None)
        else:
            refiner = not hasattr(model, "text_processing_engine_l")
        family = "SDXL refiner" if refiner else "SDXL"
    elif getattr(model, "is_sd2", False):
        family = "SD2"
    else:
        family = type(model).__name__
    inpainting = getattr(diffusion_model(unet_patcher(p)), "in_channels", 4) != 4
    return f"{family} inpainting" if inpainting else family


# -- interrupt -----------------------------------------------------------------------------------


def raise_interrupted() -> None:
    raise sd_samplers_common.InterruptedException
