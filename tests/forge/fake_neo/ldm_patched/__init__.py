"""reForge's ``ldm_patched`` package, as far as the Forge glue reaches into it (written for these tests)."""
