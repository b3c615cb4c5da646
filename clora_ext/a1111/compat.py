"""Which hosts CLoRA runs on, decided when the host loads the extension.

The glue reads host options and modules that AUTOMATIC1111 added in 1.8.0 (``emphasis``,
``sd_samplers_cfg_denoiser``, the CFG denoiser's step counters), so an older host gets
one clear line at start instead of a traceback, and no CLoRA script.
"""

from __future__ import annotations

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
