"""The CLoRA generation lifecycle every web UI host shares (host-facing through ``host``).

``begin`` (a script's ``process``) parses a request and opens its generation in the host
glue's ``Generations``; a generation is closed in one place, ``Generations.close_any``, when
the host closes ``p``. ``GenerationState`` holds what a generation carries across its passes
(arguments or the error that refuses it, notes, previews, the current pass); ``refused``
turns an error inside a pass into the answer the host's API gives. ``WebUIPort`` answers the
part of a pass's port (``passes.PassPort``) that every web UI host shares.
"""

from __future__ import annotations

import traceback
from typing import Any, Callable, ContextManager, Sequence

from . import host, infotext
from .loras import on_disk
from .params import CLoRAArgs, CLoRAArgsError, parse_args
from .passes import PassFacts
from .plan import CLoRARuntimeError
from .previews import PreviewStore
from .settings import row_cap, settings_defaults


class RequestRefused(host.RefusalBase):
    """A request CLoRA cannot run, as the host's API answers it: 422 with the message.

    An HTTPException, because the host prints a full backtrace in its console for any
    other exception; the message is printed here once instead.
    """

    def __init__(self, message: str):
        super().__init__(status_code=422, detail=message)

    def __str__(self) -> str:
        return str(self.detail)


class HostError(host.RefusalBase):
    """An unexpected error inside a CLoRA pass (a host function that changed, a failing adapter, ...),
    as the API answers it: 500 with one line naming CLoRA, the host and its version; the traceback
    goes to the console once."""

    def __init__(self, message: str):
        super().__init__(status_code=500, detail=message)

    def __str__(self) -> str:
        return str(self.detail)


def refused(error: BaseException, host_label: str) -> BaseException:
    """The host-facing form of an error inside a CLoRA pass: CLoRA's own refusals answer 422 with
    their message; any other Exception answers 500 with one line (``HostError``); the host's own
    interruptions (BaseException, not Exception) and errors already in that form pass unchanged."""
    if isinstance(error, (CLoRARuntimeError, CLoRAArgsError)):
        message = str(error) if str(error).startswith("CLoRA") else f"CLoRA: {error}"
        print(f"{message} (request refused)")
        return RequestRefused(message)
    if not isinstance(error, Exception) or isinstance(error, host.RefusalBase):
        return error
    text = " ".join(str(error).split())
    if len(text) > 300:
        text = text[:300] + " ..."
    message = (f"CLoRA on {host_label} failed: {type(error).__name__}: {text}. The traceback is in the "
               "console; please report it with the host's version")
    traceback.print_exception(type(error), error, error.__traceback__)
    print(message)
    return HostError(message)


def begin(generations: Generations, p: Any, args: Sequence[Any], host_checks: Callable[[Any], None] | None = None) -> None:
    """The script's ``process``: parse the request and open its generation in ``generations``
    (``host_checks(p)``: the host family's own refusals, raised as ``CLoRARuntimeError``).

    Errors in the arguments cannot be raised here (the host logs and swallows script
    exceptions in ``process``): a generation opened with the error fails at its first
    model call, which fails the request (HTTP 422 through the API), so a request that
    asks for CLoRA is never run without it.
    """
    generations.close_any()  # what a run that never closed its p left open (X/Y/Z plot's copies)
    try:
        parsed = parse_args(args, settings_defaults())
    except CLoRAArgsError as e:
        if wants_clora(args):
            generations.open(p, None, e)
        return
    if not parsed.enabled:
        return
    if not parsed.concepts:
        print("CLoRA: enabled without any concept row (subject + LoRA); nothing to do")
        return
    try:
        if host_checks is not None:
            host_checks(p)
        if not (host.is_txt2img(p) or host.is_img2img(p)):
            raise CLoRARuntimeError(f"CLoRA: {type(p).__name__} is neither txt2img nor img2img; CLoRA runs in those two")
        refuse_refiner(p)
        units = host.controlnet_units_enabled(p)
        if units:
            raise CLoRARuntimeError(controlnet_message(f"ControlNet unit {units[0]} is enabled"))
        for concept in parsed.concepts:
            on_disk(concept.lora)  # fail early, naming a LoRA that is missing
    except CLoRARuntimeError as e:
        generations.open(p, None, e)
        return
    host.set_generation_param(p, infotext.KEY, infotext.dump(parsed))
    generations.open(p, parsed)


def refuse_refiner(p: Any) -> None:
    """The refiner switch loads another checkpoint part way, which the concepts' LoRAs do not fit
    (both glues: the Forge family keeps A1111's switch)."""
    if host.uses_refiner(p):
        raise CLoRARuntimeError("CLoRA: the refiner switch is not supported; turn the refiner off to use CLoRA")


def controlnet_message(what: str) -> str:
    # its UNet hook cannot tell CLoRA's variant rows cond from uncond, and it runs the UNet's
    # encoder without gradients, so the latent updates would silently do nothing
    return (f"CLoRA: {what}; CLoRA does not run together with ControlNet yet. "
            "Disable the ControlNet units or CLoRA")


def previews_of(generations: Generations, p: Any) -> list:
    """The script's ``postprocess``: the gallery previews of ``p``'s generation (none when off)."""
    generation = generations.serving(p)
    if generation is None or generation.args is None or not generation.args.previews:
        return []
    return generation.previews.images()


def wants_clora(args: Sequence[Any]) -> bool:
    if not args:
        return False
    first = args[0]
    return bool(first.get("enabled", True)) if isinstance(first, dict) else bool(first)


class Generations:
    """The owner of CLoRA generations: at most one is open, opened by ``open`` and closed
    only by ``close_any``, when the host closes its ``p`` (after success or failure) or when
    the next generation starts. ``make(p, args, error)`` builds a generation: each glue
    (A1111, Forge) has its own ``Generation`` and shares this owner."""

    def __init__(self, make: Callable[[Any, CLoRAArgs | None, Exception | None], Any]) -> None:
        self._make = make
        self._open: Any = None

    def open(self, p: Any, args: CLoRAArgs | None, error: Exception | None = None) -> Any:
        self.close_any()
        generation = self._make(p, args, error)
        self._open = generation
        host.on_close(p, lambda: self.close_any(p))
        return generation

    def serving(self, p: Any) -> Any:
        """The open generation of ``p``, if any."""
        generation = self._open
        return generation if generation is not None and p is not None and generation.p is p else None

    def close_any(self, p: Any = None) -> None:
        """Close the open generation (only ``p``'s when given); idempotent."""
        generation = self._open
        if generation is None or (p is not None and generation.p is not p):
            return
        self._open = None
        generation.close()


class GenerationState:
    """One CLoRA generation (all batches, both passes), for both glues: its arguments (or the error
    that refuses it), notes, previews and current pass (the glue's own, with ``close()``)."""

    def __init__(self, p: Any, args: CLoRAArgs | None, error: Exception | None):
        self.p = p
        self.args = args
        self.error = error
        self.notes: list[str] = []
        self.previews = PreviewStore()
        self._pass: Any = None

    def note(self, message: str) -> None:
        """Said once in the console and recorded in the infotext entry."""
        message = message.removeprefix("CLoRA: ")
        if message in self.notes:
            return
        self.notes.append(message)
        print(f"CLoRA: {message}")
        host.set_generation_param(self.p, infotext.KEY, infotext.dump(self.args, self.notes))

    warn = note  # the engine's warnings are notes too: in the console and in the infotext

    def close_pass(self) -> None:
        if self._pass is not None:
            self._pass.close()
            self._pass = None

    def close(self) -> None:
        self.close_pass()


class WebUIPort:
    """The part of a ``passes.PassPort`` every web UI host answers the same way, through the
    ``modules`` API they share (``webui.host``): the pass's facts, interrupt, progress line, batch
    iteration and row cap. Each host family's ``Port`` adds its own on top."""

    def __init__(self, p: Any):
        self.p = p

    def facts(self) -> PassFacts:
        return host.pass_facts(self.p)

    def interrupted(self) -> bool:
        return host.interrupted()

    def refine_progress(self, iteration: int, iterations: int) -> None:
        host.set_progress_text(f"CLoRA refine {iteration}/{iterations}")

    def progress_text_kept(self) -> ContextManager[None]:
        return host.progress_text_kept()

    def batch_iteration(self) -> int:
        return host.batch_iteration(self.p)

    def max_rows(self, cond_rows: int) -> int | None:
        return row_cap(cond_rows)

    def console(self, line: str) -> None:
        print(f"CLoRA: {line}")
