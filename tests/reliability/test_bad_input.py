"""Bad input gets one clear line naming the problem (the parts that need no host)."""

from __future__ import annotations

import pytest

from clora_ext.webui.params import CLoRAArgsError, parse_args
from clora_ext.webui.plan import suggest_names

CAT_DOG = [{"subject": "cat", "lora": "cat_lora"}, {"subject": "dog", "lora": "dog_lora"}]


@pytest.mark.parametrize("name", ["../secret", "a/b", "sub\\dir", "..", "x/../y"])
def test_lora_names_that_are_paths_are_refused(name):
    with pytest.raises(CLoRAArgsError) as e:
        parse_args([{"concepts": [{"subject": "cat", "lora": name}]}])
    message = str(e.value)
    assert "concepts[0].lora" in message and "not a path" in message and "\n" not in message


@pytest.mark.parametrize(
    "change,field",
    [
        ({"concepts": CAT_DOG + [{"subject": "cat", "lora": "x"}]}, "mapped twice"),
        ({"concepts": [{"subject": f"s{i}", "lora": f"l{i}"} for i in range(9)]}, "concepts"),
        ({"step_size": -1}, "step_size"),
        ({"refine_iterations": 101}, "refine_iterations"),
        ({"mask_threshold": 1.5}, "mask_threshold"),
        ({"update_fraction": 2}, "update_fraction"),
        ({"mask_start": -0.1}, "mask_start"),
        ({"refine_at": [0.1, 3]}, "refine_at"),
        ({"step_size": float("nan")}, "step_size"),
    ],
)
def test_out_of_range_and_duplicates_name_the_field(change, field):
    with pytest.raises(CLoRAArgsError) as e:
        parse_args([{"concepts": CAT_DOG, **change}])
    assert field in str(e.value) and "\n" not in str(e.value)


def test_unknown_lora_suggests_the_closest_installed_names():
    installed = ["cat_lora_v2", "dog_lora", "watercolor_style", "Cat-LoRA-XL"]
    hint = suggest_names("cat_lora", installed)
    assert "did you mean" in hint and "'cat_lora_v2'" in hint
    assert "dog" not in hint.split("did you mean")[0]
    assert "4 LoRAs are installed" in suggest_names("zzz", installed)
    assert "no LoRA is installed" in suggest_names("cat", [])
