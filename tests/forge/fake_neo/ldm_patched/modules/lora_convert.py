"""``ldm_patched.modules.lora_convert``: reForge renames some foreign key layouts before reading;
the files of these tests are kohya's, which it leaves as they are."""

from __future__ import annotations


def convert_lora(sd: dict) -> dict:
    return sd
