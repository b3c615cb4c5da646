"""A generation driven as Neo drives it, with the CLoRA script in it (tests/forge only)."""

from __future__ import annotations

import contextlib

from modules import processing

from clora_ext.forge import runtime


class ScriptAdapter:
    """What the Neo CLoRA script (clora_ext/forge/script.py) does, without its Gradio UI; its
    arguments are the first of ``p.script_args``."""

    args_from, args_to = 0, 1

    def title(self):
        return "CLoRA"

    def process(self, p, *args):
        runtime.begin(p, args)

    def process_before_every_sampling(self, p, *args, **kwargs):
        runtime.before_sampling(p)

    def postprocess(self, p, processed, *args):
        processed.images.extend(runtime.previews_of(p))


def generate(p, with_script: bool = True, others: tuple = ()) -> processing.Processed:
    """One generation as the host runs it: ``with closing(p)``; ``others``: more alwayson scripts, run after CLoRA."""
    with contextlib.closing(p):
        return processing.process_images(p, ([ScriptAdapter()] if with_script else []) + list(others))


def clora(*concepts: tuple[str, str], **settings) -> dict:
    """API args for CLoRA with ``concepts`` [(subject, LoRA)]; 2 refine iterations keep CI short."""
    settings.setdefault("refine_iterations", 2)
    return {"enabled": True, "concepts": [{"subject": s, "lora": lora} for s, lora in concepts], **settings}
