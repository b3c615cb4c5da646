"""Fake ``modules`` package of AUTOMATIC1111 (tests/host only)."""
