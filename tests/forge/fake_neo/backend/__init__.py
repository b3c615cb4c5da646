"""Fake ``backend`` package of Forge Neo (tests/forge only): the parts the Neo glue reaches."""
