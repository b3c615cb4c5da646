"""Which Forge-family host gets what, as the entry script (scripts/clora.py) decides at load:
Forge Neo the Neo glue, the others one line and no CLoRA script."""

from __future__ import annotations

import os
import runpy

import pytest

import modules_forge.forge_version as forge_version
from clora_ext.a1111 import compat

ENTRY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "scripts", "clora.py")


def test_neo_gets_the_neo_glue():
    assert compat.host_glue() == ("neo", None)


@pytest.mark.parametrize("version, ldm_patched, name", [
    ("2.0.1v1.10.1", False, "lllyasviel Forge 2.0.1v1.10.1"),
    ("1.0.0v2-v1.10.1RC", True, "reForge or Forge 0.0.x 1.0.0v2-v1.10.1RC"),
    ("classic", True, "Forge Classic classic"),
])
def test_other_forges_get_one_line_and_no_script(monkeypatch, tmp_path, capsys, version, ldm_patched, name):
    monkeypatch.setattr(forge_version, "version", version)
    if ldm_patched:  # reForge and Classic have ldm_patched (and the fake Neo's backend stays findable)
        (tmp_path / "ldm_patched").mkdir()
        (tmp_path / "ldm_patched" / "__init__.py").write_text("")
        monkeypatch.syspath_prepend(str(tmp_path))
    namespace = runpy.run_path(ENTRY)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"CLoRA runs on AUTOMATIC1111 1.8.0 to 1.10.1 and Forge Neo; this host is {name}, "
                     "not supported yet. The extension is not loaded."]
    assert "CLoRAScript" not in namespace
