"""Fake ``modules`` package of Forge Neo (tests/forge only)."""
