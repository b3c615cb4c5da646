"""Run by the host before start: install only what the extension needs and the host lacks.

A stock A1111 1.x already ships every dependency (torch, safetensors, pydantic 1,
Pillow), so this normally does nothing and prints nothing. Idempotent.
"""

import launch

# import name -> pip requirement
NEEDS = {
    "safetensors": "safetensors",
    "pydantic": "pydantic<2",
}

for module, requirement in NEEDS.items():
    if not launch.is_installed(module):
        launch.run_pip(f"install {requirement!r}", f"{requirement} for sd-webui-clora")
