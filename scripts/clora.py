# Entry point the host loads; everything lives in clora_ext.a1111.
from clora_ext.a1111.compat import host_reason

_unsupported = host_reason()
if _unsupported:
    print(_unsupported)
else:
    from clora_ext.a1111.script import CLoRAScript  # noqa: F401
