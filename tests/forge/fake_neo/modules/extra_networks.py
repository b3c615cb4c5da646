"""User metadata of extra networks (the .json beside a file), like ``modules.extra_networks``."""

import json
import os


def get_user_metadata(filename: str) -> dict:
    path = os.path.splitext(filename)[0] + ".json"
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf8") as f:
        return json.load(f)
