"""The Forge Neo glue (prototype). Neo keeps AUTOMATIC1111's script, options, state and Lora
listing APIs, which the shared parts of ``clora_ext.a1111`` use (params, infotext, plan, ui,
settings, previews, samplers); what is Neo's own (UnetPatcher, KModel, the backend's LoRA
loader, the CLIP patcher) is reached only through ``forge.host``. ``runtime`` runs a
generation through Neo's extension points; ``script`` is the script class Neo loads.
"""
