"""Options, progress state and the loaded model, like the host's ``modules.shared``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

# What the glue reads that differs between the supported hosts
VERSIONS: dict[str, dict[str, Any]] = {
    "1.8.0": {
        "options": {},
        "samplers": ["sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpmpp_2m", "ddim", "unipc",
                     "sample_lcm"],
        "apply_refiner_takes_sigma": False,
        "dora": False,
    },
    "1.10.1": {
        # 1.10 options the 1.8 host does not have
        "options": {"skip_early_cond": 0.0, "s_min_uncond_all": False, "pad_cond_uncond_v0": False},
        "samplers": ["sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpmpp_2m", "ddim", "ddim_cfgpp",
                     "unipc", "sample_lcm"],
        "apply_refiner_takes_sigma": True,
        "dora": True,
    },
}

COMMON_OPTIONS: dict[str, Any] = {
    "batch_cond_uncond": True,
    "pad_cond_uncond": False,
    "use_old_scheduling": False,
    "CLIP_stop_at_last_layers": 1,
    "emphasis": "Original",
    "sdxl_crop_left": 0,
    "sdxl_crop_top": 0,
    "comma_padding_backtrack": 20,
}

version = "1.10.1"


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
        self.textinfo = None
        self.sampling_step = 0
        self.sampling_steps = 0

    def interrupt(self) -> None:
        self.interrupted = True


opts = Options(data_labels={})
state = State()
sd_model: Any = None


def features() -> dict[str, Any]:
    return VERSIONS[version]


def reset(host_version: str = "1.10.1", model: Any = None) -> None:
    """A freshly started host of ``host_version`` with ``model`` loaded."""
    global version, opts, state, sd_model
    version = host_version
    opts = Options(data_labels={}, **COMMON_OPTIONS, **VERSIONS[host_version]["options"])
    state = State()
    sd_model = model
