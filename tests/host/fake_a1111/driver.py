"""A generation driven as the host drives it, with the CLoRA script in it (tests/host only)."""

from __future__ import annotations

import contextlib

from modules import processing

from clora_ext.a1111 import runtime


class ScriptAdapter:
    """What the CLoRA script does in the host's process/postprocess (script.py without its UI)."""

    def process(self, p, *args):
        runtime.begin(p, args)

    def postprocess(self, p, processed, *args):
        processed.images.extend(runtime.previews_of(p))


def generate(p, with_script: bool = True) -> processing.Processed:
    """One generation as the host runs it: ``with closing(p)``."""
    with contextlib.closing(p):
        return processing.process_images(p, [ScriptAdapter()] if with_script else [])


def clora(*concepts: tuple[str, str], **settings) -> dict:
    """API args for CLoRA with ``concepts`` [(subject, LoRA)]; 2 refine iterations instead of 20 keep CI short."""
    settings.setdefault("refine_iterations", 2)
    return {"enabled": True, "concepts": [{"subject": s, "lora": lora} for s, lora in concepts], **settings}
