"""Which Forge-family host gets what, as the entry script (scripts/clora.py) decides at load:
Forge Neo, lllyasviel Forge 2.x, reForge and Forge Classic the Forge glue, the others one line and no CLoRA script."""

from __future__ import annotations

import os
import runpy
import sys
import types

import pytest

import modules_forge.forge_version as forge_version
from clora_ext.webui import compat
from clora_ext.forge import host

ENTRY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "scripts", "clora.py")


def _hide(monkeypatch, package: str) -> None:
    """The fake host holds both backend packages; a real host has one (find_spec reads None as absent)."""
    monkeypatch.setitem(sys.modules, package, None)


@pytest.mark.parametrize("version, flavour, name", [
    ("neo", "neo", "Forge Neo"), ("2.0.1v1.10.1", "forge2", "Forge 2.x"), ("1.0.0v2-v1.10.1RC", "reforge", "reForge"),
    ("classic", "classic", "Forge Classic"),
])
def test_the_four_forges_get_the_forge_glue(monkeypatch, capsys, version, flavour, name):
    monkeypatch.setattr(forge_version, "version", version)
    _hide(monkeypatch, "backend" if flavour in ("reforge", "classic") else "ldm_patched")
    assert compat.host_glue() == ("forge", None)
    assert host.flavour() == flavour and host.host_name() == name
    # the entry imports the Forge glue's script class (stood in for: the fake host has no Gradio UI)
    script = types.ModuleType("clora_ext.forge.script")
    script.CLoRAScript = type("CLoRAScript", (), {})
    monkeypatch.setitem(sys.modules, "clora_ext.forge.script", script)
    namespace = runpy.run_path(ENTRY)
    assert namespace["CLoRAScript"] is script.CLoRAScript
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("version, package, name", [
    ("0.0.17v1.8.0rc", "ldm_patched", "Forge 0.0.x 0.0.17v1.8.0rc"),
    ("1.0.0v2-v1.10.1RC", "backend", "a Forge with the backend package but an unknown version 1.0.0v2-v1.10.1RC"),
    ("1.0.0", "backend", "a Forge with the backend package but an unknown version 1.0.0"),
    ("classic", "backend", "a Forge with the backend package but an unknown version classic"),
])
def test_other_forges_get_one_line_and_no_script(monkeypatch, capsys, version, package, name):
    monkeypatch.setattr(forge_version, "version", version)
    _hide(monkeypatch, "backend" if package == "ldm_patched" else "ldm_patched")
    namespace = runpy.run_path(ENTRY)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"CLoRA runs on AUTOMATIC1111 1.8.0 to 1.10.1, Forge Neo, lllyasviel Forge 2.x, reForge 1.x and "
                     f"Forge Classic; this host is {name}, not supported yet. The extension is not loaded."]
    assert "CLoRAScript" not in namespace
