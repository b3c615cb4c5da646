# Entry point the host loads: the glue for this host (A1111, or Forge Neo / Forge 2.x / reForge), or one line naming what is supported.
from clora_ext.webui.compat import host_glue

_glue, _unsupported = host_glue()
if _unsupported:
    print(_unsupported)
elif _glue == "forge":
    from clora_ext.forge.script import CLoRAScript  # noqa: F401
else:
    from clora_ext.a1111.script import CLoRAScript  # noqa: F401
