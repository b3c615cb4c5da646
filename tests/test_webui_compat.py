"""The host versions CLoRA accepts."""

from __future__ import annotations

import pytest

from clora_ext.webui.compat import parse_version, unsupported_reason


@pytest.mark.parametrize("tag,version", [
    ("v1.10.1", (1, 10, 1)), ("1.10.1", (1, 10, 1)), ("v1.8.0-RC-3-gabc1234", (1, 8, 0)), ("v1.9", (1, 9, 0)),
    ("<none>", None), ("", None), ("f0.0.17v1.8.0rc-latest-276-g29be1da7", None),
])
def test_version_tags(tag, version):
    assert parse_version(tag) == version


def test_older_hosts_are_refused_with_the_supported_range():
    reason = unsupported_reason("v1.7.0")
    assert "1.8.0 or newer" in reason and "v1.7.0" in reason and "1.10.1" in reason
    assert unsupported_reason("v1.8.0") is None and unsupported_reason("v1.10.1") is None
    assert unsupported_reason("<none>") is None  # a checkout without tags: the glue's own checks apply


def test_the_four_forges_are_served_and_other_forges_named():
    from clora_ext.webui.compat import forge_flavour, forge_reason

    assert forge_flavour("neo", True, False) == "neo"
    assert forge_flavour("2.0.1v1.10.1", True, False) == "forge2"  # lllyasviel Forge 2.x (backend/, no ldm_patched)
    assert forge_flavour("1.0.0v2-v1.10.1RC", False, True) == "reforge"  # reForge (ldm_patched/)
    for version, backend, ldm_patched in [("neo", True, False), ("2.0.1v1.10.1", True, False),
                                          ("1.0.0v2-v1.10.1RC", False, True)]:
        assert forge_reason(version, backend, ldm_patched) is None
    assert forge_flavour("classic", False, True) == "classic" and forge_reason("classic", False, True) is None
    assert "Forge 0.0.x 0.0.17v1.8.0rc" in forge_reason("0.0.17v1.8.0rc", False, True)
    assert forge_flavour("1.0.0v2-v1.10.1RC", True, False) is None  # a reForge version needs ldm_patched
    message = forge_reason("1.0.0", True, False)
    assert "unknown version 1.0.0" in message and "Forge Neo, lllyasviel Forge 2.x, reForge 1.x and Forge Classic" in message
    assert "\n" not in message
