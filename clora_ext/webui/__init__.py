"""The layer every web UI host shares (AUTOMATIC1111 and the Forge family).

Pure parts (no host imports, tested in CI without a host): ``params`` (the parameter model
behind UI, API, Settings and infotext), ``infotext``, ``plan`` (variant plan, row layout,
token maps per prompt-editing segment, the fused step), ``previews`` and ``samplers``.
Host-facing parts reach the host only through ``host``, the web UI API every supported host
keeps: ``pipeline`` (the generation lifecycle and refusals), ``loras`` (the installed LoRAs),
``settings``, ``ui`` and ``script_base``. ``compat`` decides, when the host loads the
extension, which host family's glue serves it (``clora_ext.a1111`` or ``clora_ext.forge``);
a host family's folder holds only that family's own code and never imports another's.
"""
