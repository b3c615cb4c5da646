"""The LoRA listing of Neo's built-in ``sd_forge_lora`` extension (its ``networks`` module), as the
glue uses it: ``available_networks``/``available_network_aliases`` of entries with ``filename``,
and ``list_available_networks()``. Written for these tests."""

from __future__ import annotations

import os

lora_dir = ""
available_networks: dict[str, "NetworkOnDisk"] = {}
available_network_aliases: dict[str, "NetworkOnDisk"] = {}
loaded_networks: list = []


class NetworkOnDisk:
    def __init__(self, name: str, filename: str):
        self.name = self.alias = name
        self.filename = filename


def list_available_networks() -> None:
    available_networks.clear()
    available_network_aliases.clear()
    for file in sorted(os.listdir(lora_dir)) if lora_dir else []:
        name, ext = os.path.splitext(file)
        if ext in (".safetensors", ".pt"):
            entry = NetworkOnDisk(name, os.path.join(lora_dir, file))
            available_networks[name] = entry
            available_network_aliases[name] = entry
