"""Sampling-time hook: a CFGDenoiser.forward wrapper and a proxy for its inner model (host-facing).

``install()`` wraps ``CFGDenoiser.forward`` once. Without an open CLoRA generation
for the denoiser's ``p`` the wrapper calls the original with the very same arguments.
With one, each call:

1. runs ``CLoRAEngine.step`` on the sampler's own ``x``: every image is expanded
   into its variants (base prompt + one per content LoRA), cond and uncond, in one
   batch; each LoRA is routed to its rows; maps are captured; the latent is updated
   in place at scheduled steps (first-order samplers, first pass only); the rows
   are fused with the masks back to one cond and one uncond row per image;
2. swaps the denoiser's inner model for a proxy that serves those fused rows in the
   host's row order, and lets the host's own forward run (its callbacks, CFG,
   previews and step counting stay the host's). The proxy serves consecutive row
   ranges, so the host may split the batch (``batch_cond_uncond`` off, uneven
   cond/uncond lengths) or drop uncond rows (NGMS) as it likes.

The fused rows are computed from the prompts and latent the host handed to the
forward; a ``cfg_denoiser`` callback that edits ``x_in`` or the conds is not seen.
In img2img the schedule counts the steps that run at the denoising strength (the
host's ``total_steps``); in inpainting the latent update acts inside the inpaint
mask only, and the host's own blend keeps the rest of the image.

The generation lifecycle is the shared one (``webui.pipeline``): ``begin`` (the script's
``process``) opens a generation, closed when the host closes ``p``. A pass (one batch's
sampling) takes its hooks off the model when sampling raises, when the next pass starts, or
when its generation closes. Every access to the host goes through ``host`` (A1111's own) or
``webui.host`` (what every web UI host shares).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch

from ..webui import host as webui
from ..webui import passes, pipeline
from ..webui.passes import PassFacts
from ..webui.pipeline import Generations, GenerationState, WebUIPort, controlnet_message, refused
from ..webui.plan import ChunkedTokenizer, CLoRARuntimeError, FusedProxy, VariantPlan, check_single_conds
from ..webui.samplers import SamplerSupport
from . import encoding, host, lora_bridge


def install() -> None:
    """Wrap CFGDenoiser.forward (idempotent): a denoiser whose ``p`` has no open generation runs
    the host's forward with the very same arguments."""

    def make(original: Callable) -> Callable:
        @functools.wraps(original)
        def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
            generation = generations.serving(host.denoiser_p(self))
            if generation is None:
                return original(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)
            return generation.forward(original, self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)

        return forward

    host.wrap_denoiser_forward(make, __name__)


def begin(p: Any, args: Sequence[Any]) -> None:
    """The script's ``process`` (``pipeline.begin``) with A1111's own refusals."""
    pipeline.begin(generations, p, args, check_host)


def previews_of(p: Any) -> list:
    return pipeline.previews_of(generations, p)


def check_host(p: Any) -> None:
    """Refuse host setups whose UNet is not the ldm/sgm module CLoRA hooks into."""
    label = host.replaced_unet_label()  # a replaced UNet (TensorRT, ...) never runs our layers
    if label is not None:
        raise CLoRARuntimeError(
            f"CLoRA: the UNet is replaced by {label!r} (e.g. TensorRT); set Settings > SD UNet to None to use CLoRA"
        )


generations = Generations(lambda p, args, error: Generation(p, args, error))


class Generation(GenerationState):
    """The A1111 generation: its passes run inside the host's CFG denoiser (``forward``)."""

    def forward(self, original, denoiser, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if self.error is not None:
            raise refused(self.error, host.host_label())
        if webui.interrupted():  # the host's forward raises InterruptedException
            return original(denoiser, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)
        try:
            if host.controlnet_marked(cond):  # hooked by ControlNet without an enabled unit in its args
                raise CLoRARuntimeError(controlnet_message("ControlNet is active for this generation"))
            if self._pass is None or not self._pass.port.serves(denoiser):
                self.close_pass()
                self._pass = passes.Pass(self, Port(self.p, denoiser, cond))
            inner = host.inner_model(denoiser)
            fused = self._pass.step(inner, x, sigma, image_cond, host.denoiser_step(denoiser),
                                    host.denoiser_total_steps(denoiser), host.sigma_space(denoiser),
                                    host.inpaint_region(denoiser))
            proxy = FusedProxy(inner, fused, self._pass.rows)
            with host.inner_model_replaced(denoiser, proxy):
                return original(denoiser, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)
        except BaseException as e:  # sampling ends here: take the hooks off the model now
            self.close_pass()
            answer = refused(e, host.host_label())
            if answer is e:
                raise
            raise answer from None

    def close(self) -> None:
        super().close()
        host.forget_cached_conds(self.p)


class Port(WebUIPort):
    """A1111's side of one sampling pass (``passes.PassPort``): the pass runs inside ``denoiser``'s
    forward, on the loaded checkpoint's ldm/sgm UNet, with ordinary autograd."""

    functional_gradient = False

    def __init__(self, p: Any, denoiser: Any, cond: Any):
        super().__init__(p)
        self.denoiser = denoiser
        self.cond = cond
        self.model = host.sd_model()

    def serves(self, denoiser: Any) -> bool:
        return denoiser is self.denoiser and host.sd_model() is self.model

    def check_model(self) -> None:
        if host.is_unclip(self.model):
            raise CLoRARuntimeError("CLoRA does not support unCLIP checkpoints")
        if host.is_edit_model(self.model):
            raise CLoRARuntimeError("CLoRA does not support instruct-pix2pix (edit) checkpoints")
        check_single_conds(host.subprompt_counts(self.cond))

    def load_lora(self, name: str) -> lora_bridge.HostLoRA:
        return lora_bridge.load(name)

    def encode(self, plan: VariantPlan, loras: dict, facts: PassFacts) -> list[list[tuple[int, Any]]]:
        return encoding.encode(plan, loras, _encoding_schedule(facts))

    def tokenizer(self) -> ChunkedTokenizer:
        return encoding.host_tokenizer()

    def prompt_schedules(self, texts: list[str], facts: PassFacts) -> list[list[tuple[int, str]]]:
        return _encoding_schedule(facts).prompt_schedules(texts)

    def sampler_function(self) -> str | None:
        return host.sampler_function(self.denoiser)

    def model_calls(self, total_steps: int, sampler: SamplerSupport) -> int | None:
        return total_steps - 1 if sampler.one_step_fewer else None

    def attach(self) -> torch.nn.Module:
        return host.unet(self.model)  # the denoiser wrapper (``install``) is the hook

    def pad_cond(self) -> torch.Tensor | None:
        # the host runs cond and uncond at their own lengths unless told to pad them
        return host.empty_prompt_cond(self.model) if host.pads_cond_uncond() else None

    def raise_interrupted(self) -> None:
        host.raise_interrupted()


def _encoding_schedule(facts: PassFacts) -> encoding.Schedule:
    return encoding.Schedule(facts.steps, facts.hires_steps, facts.width, facts.height)
