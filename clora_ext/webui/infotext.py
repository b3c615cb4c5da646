"""The "CLoRA" infotext entry: written after a generation, read back by "Send to txt2img" (pure).

The entry is compact JSON of the non-default parameters plus the extension's
version and, where it applies, a note about what ran differently (e.g. no latent
updates on a multi-call sampler). The host quotes it because it holds ``,`` and ``:``.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from .params import VERSION, CLoRAArgs, CLoRAArgsError, POSITIONAL_LENGTH, to_positional, validate

KEY = "CLoRA"
_META = ("version", "notes")
# defaults that changed: (the first version with the new default, the old defaults); an entry
# written before that version left the old default out, so it is put back when read
CHANGED_DEFAULTS = (("0.2.0", {"refine_tolerance": 0.01}), ("0.4.0", {"refine_iterations": 20}),
                    ("0.5.0", {"mask_tokens": "paper"}), ("0.7.0", {"keeps_means_from": 0}))


def _version(text: Any) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in str(text).split("."))
    except ValueError:
        return ()


def dump(args: CLoRAArgs, notes: list[str] | tuple[str, ...] = ()) -> str:
    data: dict[str, Any] = {"version": VERSION, **args.non_default()}
    if notes:
        data["notes"] = list(notes)
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def load(text: str | Mapping[str, Any]) -> CLoRAArgs:
    """Parse an entry back into enabled arguments; metadata keys are ignored."""
    data = json.loads(text) if isinstance(text, str) else dict(text)
    if not isinstance(data, dict):
        raise CLoRAArgsError("CLoRA: the infotext entry is not a JSON object")
    written = _version(data.get("version", "0"))
    for since, old in CHANGED_DEFAULTS:
        if written < _version(since):
            data = {**old, **data}
    data = {k: v for k, v in data.items() if k not in _META}
    data["enabled"] = True
    return validate(data)


def paste_values(params: Mapping[str, Any]) -> list[Any] | None:
    """Positional UI values for parsed generation parameters.

    No entry: only the enable box is turned off (None elsewhere: leave as is). An
    unreadable entry leaves everything unchanged (None).
    """
    entry = params.get(KEY)
    if entry is None:
        return [False] + [None] * (POSITIONAL_LENGTH - 1)
    try:
        return to_positional(load(entry))
    except (ValueError, CLoRAArgsError) as e:  # json errors are ValueErrors too
        print(f"CLoRA: could not read the infotext entry ({e})")
        return None


_pasted: dict = {}  # the last entry read, shared by all inputs: one paste parses it once


def paste_field(index: int):
    """Infotext paste for the UI input at ``index``: every input reads the one "CLoRA" entry."""

    def paste(params: dict) -> Any:
        key = params.get(KEY)
        if "values" not in _pasted or _pasted["key"] != key:
            _pasted.update(key=key, values=paste_values(params))
        values = _pasted["values"] or [None] * POSITIONAL_LENGTH
        return values[index]

    return paste
