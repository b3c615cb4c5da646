"""The glue for the Forge ``backend`` family (prototype): Forge Neo and lllyasviel Forge 2.x. Both
keep AUTOMATIC1111's script, options, state and Lora listing APIs, which the shared parts of
``clora_ext.a1111`` use (params, infotext, plan, ui, settings, previews, samplers); what is the
family's own (UnetPatcher, KModel, the backend's LoRA loader, the CLIP patcher) is reached only
through ``forge.host``, which also decides where the two hosts differ. ``runtime`` runs a
generation through the host's extension points; ``script`` is the script class the host loads.
"""
