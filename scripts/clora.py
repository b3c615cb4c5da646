# Entry point the host loads; everything lives in clora_ext.a1111.
from clora_ext.a1111.script import CLoRAScript  # noqa: F401
