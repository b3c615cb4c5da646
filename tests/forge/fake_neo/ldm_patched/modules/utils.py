"""``ldm_patched.modules.utils`` as the glue uses it: reading a LoRA file (the fake Neo's reader)."""

from backend.utils import load_torch_file  # noqa: F401
