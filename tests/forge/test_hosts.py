"""Which Forge-family host gets what, as the entry script (scripts/clora.py) decides at load:
Forge Neo and lllyasviel Forge 2.x the Forge glue, the others one line and no CLoRA script."""

from __future__ import annotations

import os
import runpy
import sys
import types

import pytest

import modules_forge.forge_version as forge_version
from clora_ext.a1111 import compat
from clora_ext.forge import host

ENTRY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "scripts", "clora.py")


@pytest.mark.parametrize("version, flavour, name", [
    ("neo", "neo", "Forge Neo"), ("2.0.1v1.10.1", "forge2", "Forge 2.x"),
])
def test_neo_and_forge2_get_the_forge_glue(monkeypatch, capsys, version, flavour, name):
    monkeypatch.setattr(forge_version, "version", version)
    assert compat.host_glue() == ("forge", None)
    assert host.flavour() == flavour and host.host_name() == name
    # the entry imports the Forge glue's script class (stood in for: the fake host has no Gradio UI)
    script = types.ModuleType("clora_ext.forge.script")
    script.CLoRAScript = type("CLoRAScript", (), {})
    monkeypatch.setitem(sys.modules, "clora_ext.forge.script", script)
    namespace = runpy.run_path(ENTRY)
    assert namespace["CLoRAScript"] is script.CLoRAScript
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("version, ldm_patched, name", [
    ("1.0.0v2-v1.10.1RC", True, "reForge or Forge 0.0.x 1.0.0v2-v1.10.1RC"),
    ("classic", True, "Forge Classic classic"),
    ("0.0.17v1.8.0rc", True, "reForge or Forge 0.0.x 0.0.17v1.8.0rc"),
    ("1.0.0", False, "a Forge with the backend package but an unknown version 1.0.0"),
])
def test_other_forges_get_one_line_and_no_script(monkeypatch, tmp_path, capsys, version, ldm_patched, name):
    monkeypatch.setattr(forge_version, "version", version)
    if ldm_patched:  # reForge and Classic have ldm_patched (and the fake Neo's backend stays findable)
        (tmp_path / "ldm_patched").mkdir()
        (tmp_path / "ldm_patched" / "__init__.py").write_text("")
        monkeypatch.syspath_prepend(str(tmp_path))
    namespace = runpy.run_path(ENTRY)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"CLoRA runs on AUTOMATIC1111 1.8.0 to 1.10.1, Forge Neo and lllyasviel Forge 2.x; this host is "
                     f"{name}, not supported yet. The extension is not loaded."]
    assert "CLoRAScript" not in namespace
