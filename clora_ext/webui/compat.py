"""Which hosts CLoRA runs on, and which glue serves them, decided when the host loads the extension.

AUTOMATIC1111 gets the A1111 glue (``clora_ext.a1111``); Forge Neo, lllyasviel Forge 2.x (the
``backend`` family), reForge and Forge Classic (``ldm_patched``) the Forge glue (``clora_ext.forge``); the other
Forge-family hosts (old Forge 0.0.x) get one line naming what is supported, and
no CLoRA script.

The glue reads host options and modules that AUTOMATIC1111 added in 1.8.0 (``emphasis``,
``sd_samplers_cfg_denoiser``, the CFG denoiser's step counters), so an older host gets
one clear line at start instead of a traceback, and no CLoRA script.
"""

from __future__ import annotations

import importlib
import importlib.util
import re

MINIMUM = (1, 8, 0)
SUPPORTED = "AUTOMATIC1111 1.8.0 to 1.10.1"

_VERSION = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?")


def parse_version(tag: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) of the host's version tag ("v1.10.1", "v1.8.0-RC-3-gabc", "1.10.1"), or None."""
    match = _VERSION.match(tag.strip())
    if match is None:
        return None
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def unsupported_reason(tag: str) -> str | None:
    """Why a host with version ``tag`` cannot run CLoRA, or None. An unreadable tag (a
    development checkout without tags) is let through: the glue's own checks still apply."""
    version = parse_version(tag)
    if version is None or version >= MINIMUM:
        return None
    return (f"CLoRA needs AUTOMATIC1111 {'.'.join(map(str, MINIMUM))} or newer; this host is {tag.strip()}. "
            f"Supported: {SUPPORTED}. The extension is not loaded.")


def host_reason() -> str | None:
    """``unsupported_reason`` for the running host (call from the entry script). The one host access
    outside ``host``: on an older host, ``host``'s own imports would fail before any message."""
    try:
        from modules import launch_utils
    except ImportError:  # before 1.3 the host had no launch_utils
        return unsupported_reason("1.2")
    return unsupported_reason(launch_utils.git_tag())


NEO, FORGE2, REFORGE, CLASSIC = "neo", "forge2", "reforge", "classic"
FORGE = "forge"
SUPPORTED_ALL = f"{SUPPORTED}, Forge Neo, lllyasviel Forge 2.x, reForge 1.x and Forge Classic"
_FORGE2 = re.compile(r"2\.\d+")
_REFORGE = re.compile(r"1\.\d+\.\d+")


def forge_flavour(version: str | None, has_backend: bool, has_ldm_patched: bool) -> str | None:
    """Which host of the Forge family the Forge glue serves ("neo", "forge2", "reforge", "classic"),
    or None when it serves none. ``version``: ``modules_forge.forge_version.version`` ("neo";
    "2.0.1v1.10.1" for lllyasviel Forge 2.x; "1.0.0v2-v1.10.1RC" for reForge; "classic");
    ``has_backend``/``has_ldm_patched``: which backend package the host has (Neo and Forge 2.x:
    ``backend``; reForge, Forge Classic and the old Forge 0.0.x: ``ldm_patched``)."""
    if version == NEO:
        return NEO
    if has_backend and version and _FORGE2.match(version):
        return FORGE2
    if has_ldm_patched and version and _REFORGE.match(version):
        return REFORGE
    if has_ldm_patched and version == CLASSIC:
        return CLASSIC
    return None


def forge_reason(version: str | None, has_backend: bool, has_ldm_patched: bool) -> str | None:
    """Why a Forge-family host cannot run CLoRA (None for the hosts ``forge_flavour`` names)."""
    if forge_flavour(version, has_backend, has_ldm_patched) is not None:
        return None
    if has_ldm_patched:
        name = "Forge 0.0.x" if version and version.startswith("0.") else "a Forge with ldm_patched"
    elif has_backend:
        name = "a Forge with the backend package but an unknown version"
    else:
        name = "an unknown Forge"
    shown = f" {version}" if version else ""
    return f"CLoRA runs on {SUPPORTED_ALL}; this host is {name}{shown}, not supported yet. The extension is not loaded."


def host_glue() -> tuple[str, str | None]:
    """("a1111" or "forge", why the running host cannot run CLoRA or None) (call from the entry script).
    "forge" is the glue of Forge Neo, lllyasviel Forge 2.x, reForge and Forge Classic."""
    if importlib.util.find_spec("modules_forge") is None:
        return "a1111", host_reason()
    try:
        version = str(importlib.import_module("modules_forge.forge_version").version)
    except (ImportError, AttributeError):
        version = None
    has_backend = importlib.util.find_spec("backend") is not None
    has_ldm_patched = importlib.util.find_spec("ldm_patched") is not None
    return FORGE, forge_reason(version, has_backend, has_ldm_patched)
