"""The "CLoRA" infotext entry: only non-default values, version, round trip through the UI values."""

from __future__ import annotations

import json

from clora_ext.webui import infotext
from clora_ext.webui.params import POSITIONAL_LENGTH, VERSION, parse_args, to_positional

ARGS = {
    "concepts": [
        {"subject": "cat", "lora": "cat_lora", "trigger": "sks, fluffy", "weight": 0.8},
        {"subject": "dog", "lora": "dog_lora", "te_weight": 0.0},
        {"subject": "cat, dog", "lora": "ink: v2", "role": "style_subjects"},
    ],
    "step_size": 15,
    "refine_at": [0.0, 0.3],
    "morphology": "close",
    "mask_tokens": "base_subject",
    "mask_upsampling": "bilinear",
}


def _host_quote(text: str) -> str:
    # the host JSON-quotes values holding ',', ':' or newlines, and unquotes them with json
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def test_entry_holds_version_and_only_non_default_values():
    entry = json.loads(infotext.dump(parse_args([ARGS])))
    assert entry["version"] == VERSION
    assert set(entry) == {"version", "concepts", "step_size", "refine_at", "morphology", "mask_tokens", "mask_upsampling"}
    assert entry["concepts"][0] == {"subject": "cat", "lora": "cat_lora", "weight": 0.8, "trigger": "sks, fluffy"}
    assert entry["concepts"][1] == {"subject": "dog", "lora": "dog_lora", "te_weight": 0.0}
    assert entry["concepts"][2]["role"] == "style_subjects"
    defaults_only = json.loads(infotext.dump(parse_args([{"concepts": ARGS["concepts"][:1]}])))
    assert set(defaults_only) == {"version", "concepts"}


def test_round_trip_through_the_host_quoting():
    args = parse_args([ARGS])
    quoted = _host_quote(infotext.dump(args, notes=["hires pass: masks and routing only"]))
    assert quoted.startswith('"')
    assert infotext.load(json.loads(quoted)) == args


def test_paste_restores_every_row_and_setting():
    args = parse_args([{**ARGS, "previews": True, "mask_start": 0.1, "update_fraction": 0.3}])
    values = infotext.paste_values({"Prompt": "a cat and a dog", infotext.KEY: infotext.dump(args)})
    assert values == to_positional(args)
    assert parse_args(values) == args


def test_paste_without_entry_only_turns_clora_off():
    values = infotext.paste_values({"Prompt": "a cat"})
    assert values[0] is False and len(values) == POSITIONAL_LENGTH
    assert all(v is None for v in values[1:])


def test_unreadable_entry_changes_nothing(capsys):
    assert infotext.paste_values({infotext.KEY: "{not json"}) is None
    assert infotext.paste_values({infotext.KEY: json.dumps({"step_size": 1e9})}) is None
    assert "could not read" in capsys.readouterr().out


def test_entries_of_older_versions_keep_the_defaults_they_were_made_with():
    concepts = ARGS["concepts"][:1]
    old = infotext.load(json.dumps({"version": "0.1.0", "concepts": concepts}))
    assert old.refine_tolerance == 0.01  # 0.1.0 stopped refining at a 1 % improvement by default
    assert infotext.load(json.dumps({"version": "0.1.0", "concepts": concepts, "refine_tolerance": 0.05})).refine_tolerance == 0.05
    assert old.refine_iterations == 20
    before_04 = infotext.load(json.dumps({"version": "0.3.0", "concepts": concepts}))
    assert before_04.refine_iterations == 20 and before_04.refine_tolerance == 0.0  # 0.3.0 refined 20 times
    current = infotext.load(json.dumps({"version": VERSION, "concepts": concepts}))
    assert current.refine_tolerance == 0.0 and current.engine_settings().refine_tolerance is None
    assert current.refine_iterations == 5 and current.mask_tokens.value == "subject"
    before_05 = infotext.load(json.dumps({"version": "0.4.0", "concepts": concepts}))
    assert before_05.mask_tokens.value == "paper" and before_05.refine_iterations == 5  # 0.4.0 masked by the paper's rule


def test_entries_before_0_7_keep_the_update_they_were_made_with():
    concepts = ARGS["concepts"][:1]
    before_07 = infotext.load(json.dumps({"version": "0.6.0", "concepts": concepts}))
    assert before_07.keeps_means_from == 0 and before_07.engine_settings().keeps_means_from == 0
    assert infotext.load(json.dumps({"version": VERSION, "concepts": concepts})).keeps_means_from == 3
