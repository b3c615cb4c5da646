"""The glue for the Forge family (Forge Neo, lllyasviel Forge 2.x, reForge, Forge Classic), over the
shared web-UI layer (``clora_ext.webui``), which keeps A1111's script, options, state and Lora
listing APIs. What is the family's own (UnetPatcher, KModel, the backend's LoRA loader, the CLIP
patcher) is reached only through ``forge.host``, which also decides where its hosts differ.
``runtime`` runs a generation through the host's extension points; ``script`` is the script
class the host loads.
"""
