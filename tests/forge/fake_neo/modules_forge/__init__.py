"""Fake ``modules_forge`` of Forge Neo (tests/forge only)."""
