"""The host's patch registry (``modules.patches``): one patch per (key, object, field), undoable."""

originals: dict = {}


def patch(key, obj, field, replacement):
    patch_key = (obj, field)
    if patch_key in originals:
        raise RuntimeError(f"patch for {field} is already applied")
    original = getattr(obj, field)
    originals[patch_key] = (key, original)
    setattr(obj, field, replacement)
    return original


def undo(key, obj, field):
    patch_key = (obj, field)
    if patch_key not in originals:
        raise RuntimeError(f"there is no patch for {field} to undo")
    _, original = originals.pop(patch_key)
    setattr(obj, field, original)
