"""Development-only helpers (tiny random models); never imported by the A1111 glue."""
