"""The AUTOMATIC1111 glue: the only code of this extension that imports the host's ``modules``.

Pure parts (no host imports, tested in CI): ``params`` (the parameter model behind UI,
API and infotext), ``infotext`` and ``plan`` (variant encoding plan, row layout, token
maps per prompt-editing segment). Host-facing parts, imported only by the host:
``script`` (the AlwaysOn script and its UI), ``runtime`` (the denoiser hook and the
proxy), ``lora_bridge`` (the built-in Lora extension) and ``encoding`` (variant
prompts through the host's prompt machinery).
"""
