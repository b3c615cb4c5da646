"""Options, progress state and the loaded model, like Neo's ``modules.shared``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

OPTIONS: dict[str, Any] = {
    "batch_cond_uncond": True,
    "use_old_scheduling": False,
    "skip_early_cond": 0.0,
    "s_min_uncond_all": False,
}


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False, category_id=None):
        self.default = default
        self.label = label
        self.section = section
        self.category_id = category_id


class Options(SimpleNamespace):
    def add_option(self, key: str, info: OptionInfo) -> None:
        self.data_labels[key] = info
        if not hasattr(self, key):
            setattr(self, key, info.default)


class State:
    def __init__(self) -> None:
        self.interrupted = False
        self.skipped = False
        self.stopping_generation = False
        self.textinfo = None
        self.sampling_step = 0
        self.sampling_steps = 0

    def interrupt(self) -> None:
        self.interrupted = True


opts = Options(data_labels={})
state = State()
sd_model: Any = None


def reset(model: Any = None) -> None:
    """A freshly started host with ``model`` loaded."""
    global opts, state, sd_model
    opts = Options(data_labels={}, **OPTIONS)
    state = State()
    sd_model = model
