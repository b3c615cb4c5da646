"""The patch registry (``modules.patches``); the Neo glue does not patch, the module only has to exist."""

originals: dict = {}


def patch(key, obj, field, replacement):
    originals[(obj, field)] = (key, getattr(obj, field))
    setattr(obj, field, replacement)
