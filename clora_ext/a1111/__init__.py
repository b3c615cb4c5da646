"""The AUTOMATIC1111 glue: what only A1111 has, over the shared web-UI layer (``clora_ext.webui``).

``host`` is the one module that reaches A1111's own internals (the CFG denoiser, the prompt
machinery, the Lora extension's networks); ``runtime`` (the denoiser hook and the proxy),
``lora_bridge`` (LoRAs through the built-in Lora extension's loader), ``encoding`` (variant
prompts through the host's prompt machinery) and ``script`` (the AlwaysOn script A1111 loads)
build on it. All are host-facing, imported only by the host or a fake host in the tests.
"""
