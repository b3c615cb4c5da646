"""The A1111 glue's parameter model: defaults, both API forms, validation messages (no host needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from clora_ext.webui.params import (
    NO_LORA,
    POSITIONAL_LENGTH,
    CLoRAArgs,
    CLoRAArgsError,
    parse_args,
    to_positional,
)
from clora_ext.concepts import Role
from clora_ext.masks import MaskTokens, MaskUpsampling, Morphology

TWO = {"concepts": [{"subject": "cat", "lora": "cat_lora", "trigger": "sks"}, {"subject": "dog", "lora": "dog_lora"}]}


def test_pure_modules_import_without_the_host():
    code = (
        "import sys; import clora_ext.webui.params, clora_ext.webui.infotext, clora_ext.webui.plan, "
        "clora_ext.webui.previews, clora_ext.webui.passes, clora_ext.webui.samplers; "
        "sys.exit(1 if any(m == 'modules' or m.startswith('modules.') for m in sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_refine_tolerance_zero_is_the_default_and_the_papers_fixed_count():
    assert CLoRAArgs().engine_settings().refine_tolerance is None
    assert parse_args([{**TWO, "refine_tolerance": 0.01}]).engine_settings().refine_tolerance == 0.01
    with pytest.raises(CLoRAArgsError, match="refine_tolerance"):
        parse_args([{**TWO, "refine_tolerance": 2}])


def test_defaults_are_the_papers_but_five_refinement_iterations_and_subject_masks():
    a = CLoRAArgs()
    assert not a.enabled and a.concepts == []
    # the paper refines 20 times; 5 measured no worse at 2.8x fewer gradient passes (docs/quality.md)
    assert (a.step_size, a.update_fraction, a.refine_at, a.refine_iterations) == (20.0, 0.5, [0.0, 0.2, 0.4], 5)
    assert (a.mask_threshold, a.morphology, a.mask_start, a.previews) == (0.4, Morphology.NONE, 0.0, False)
    assert a.mask_tokens is MaskTokens.SUBJECT  # the paper's rule measured worse (docs/quality.md)
    s = a.engine_settings()
    assert s.step_size == 20.0 and s.schedule.refine_at == (0.0, 0.2, 0.4) and s.mask_threshold == 0.4
    # 50 steps: updates at 0-24, refinement at 0, 10, 20 (Attend-and-Excite's schedule)
    assert [i for i in range(50) if s.schedule.updates_at(i, 50)] == list(range(25))
    assert [i for i in range(50) if s.schedule.iterations_at(i, 50) > 1] == [0, 10, 20]


def test_the_parameter_models_defaults_are_the_engines():
    """Every default is written once, in the engine's settings: the request's defaults compute the same."""
    from clora_ext.engine import EngineSettings

    assert CLoRAArgs().engine_settings() == EngineSettings()


def test_dict_form_means_enabled_and_fills_defaults():
    a = parse_args([TWO])
    assert a.enabled and a.active
    assert [c.subject for c in a.concepts] == ["cat", "dog"]
    assert a.concepts[0].trigger == "sks" and a.concepts[1].weight == 1.0 and a.concepts[1].role is Role.CONTENT
    assert parse_args([{**TWO, "enabled": False}]).enabled is False


def test_settings_defaults_fill_what_the_request_leaves_out():
    a = parse_args([TWO], defaults={"step_size": 12.5, "refine_at": "0, 0.1"})
    assert a.step_size == 12.5 and a.refine_at == [0.0, 0.1]
    b = parse_args([{**TWO, "step_size": 30}], defaults={"step_size": 12.5})
    assert b.step_size == 30


def test_positional_round_trip_and_length():
    a = parse_args(
        [{**TWO, "step_size": 10, "morphology": "open", "refine_at": [0.1], "previews": True, "mask_start": 0.25,
          "mask_tokens": "base", "mask_upsampling": "bilinear", "soft_edges_from": 0.75, "keeps_means_from": 0}]
    )
    assert a.engine_settings().mask_tokens is MaskTokens.BASE
    assert a.engine_settings().mask_upsampling is MaskUpsampling.BILINEAR
    assert a.engine_settings().soft_edges_from == 0.75
    assert a.engine_settings().keeps_means_from == 0
    values = to_positional(a)
    assert len(values) == POSITIONAL_LENGTH == 1 + 8 * 6 + 13
    assert values[-4:] == ["base", "bilinear", 0.75, 0]
    assert values[:7] == [True, "cat", "cat_lora", 1.0, 1.0, "sks", "content"]
    assert values[7 + 6 * 6 + 1] == NO_LORA  # an empty row
    assert parse_args(values) == a


def test_positional_list_from_before_mask_tokens_still_parses():
    # clients that send the 58 values of version 0.4 (no mask_tokens, no mask_upsampling) keep working
    a = parse_args([{**TWO, "morphology": "close", "previews": True}])
    old = to_positional(a)[:58]
    assert parse_args(old) == a and parse_args(old, defaults={"mask_tokens": "base"}).mask_tokens is MaskTokens.BASE


def test_positional_list_of_0_6_still_parses():
    # clients that send the 61 values of version 0.6 (no keeps_means_from) get the current default
    a = parse_args([{**TWO, "soft_edges_from": 0.5}])
    old = to_positional(a)[:61]
    assert parse_args(old) == a and a.keeps_means_from == 3


def test_short_positional_list_keeps_defaults():
    a = parse_args([True, "cat", "cat_lora"])
    assert a.enabled and a.concepts[0].lora == "cat_lora" and a.concepts[0].weight == 1.0
    assert a.step_size == 20.0
    assert parse_args([]).enabled is False


def test_role_accepts_values_and_ui_labels():
    a = parse_args(
        [
            {
                "concepts": [
                    {"subject": "cat", "lora": "a"},
                    {"subject": "", "lora": "watercolor", "role": "style (whole image)"},
                    {"subject": "cat", "lora": "ink", "role": "style_subjects"},
                ]
            }
        ]
    )
    assert [c.role for c in a.concepts] == [Role.CONTENT, Role.STYLE, Role.STYLE_SUBJECTS]
    comp = a.composition()
    assert len(comp.content) == 1 and len(comp.styles) == 2


@pytest.mark.parametrize(
    "bad, field, allowed",
    [
        ({"concepts": [{"subject": "cat", "lora": "a", "weight": 9}]}, "concepts[0].weight", "a number from -4 to 4"),
        ({"concepts": [{"subject": "cat", "lora": "a", "role": "bg"}]}, "concepts[0].role", "'style_subjects'"),
        ({"concepts": [{"subject": "cat"}]}, "concepts[0].lora", "installed LoRA"),
        ({"concepts": [{"subject": "cat", "lora": "a", "lr": 1}]}, "concepts[0].lr", "te_weight"),
        ({"stepsize": 3}, "stepsize", "step_size"),
        ({"refine_iterations": "many"}, "refine_iterations", "an integer from 0 to 100"),
        ({"refine_at": "0, 2"}, "refine_at[1]", "between 0 and 1"),
        ({"morphology": "blur"}, "morphology", "'close'"),
        ({"mask_tokens": "trigger"}, "mask_tokens", "'base_subject'"),
        ({"mask_upsampling": "bicubic"}, "mask_upsampling", "'bilinear'"),
        ({"mask_threshold": -0.1}, "mask_threshold", "a number from 0 to 1"),
        ({"concepts": [{"subject": "cat", "lora": "a"}] * 9}, "concepts", "at most 8"),
    ],
)
def test_invalid_arguments_name_the_field_and_what_is_allowed(bad, field, allowed):
    with pytest.raises(CLoRAArgsError) as e:
        parse_args([bad])
    message = str(e.value)
    assert f"{field}:" in message and allowed in message
    assert e.value.status_code == 422 and e.value.detail == message


def test_composition_errors_are_readable():
    with pytest.raises(CLoRAArgsError, match="mapped twice"):
        parse_args([{"concepts": [{"subject": "cat", "lora": "a"}, {"subject": "Cat", "lora": "b"}]}])
    with pytest.raises(CLoRAArgsError, match="not a content subject"):
        parse_args([{"concepts": [{"subject": "cat", "lora": "a"}, {"subject": "dog", "lora": "s", "role": "style_subjects"}]}])


def test_a_row_with_a_subject_but_no_lora_is_an_error():
    values = to_positional(parse_args([TWO]))
    values[1 + 2 * 6] = "bird"  # row 3: subject, LoRA still "None"
    with pytest.raises(CLoRAArgsError, match=r"concepts\[2\]\.lora"):
        parse_args(values)


def test_too_many_positional_args():
    with pytest.raises(CLoRAArgsError, match="at most"):
        parse_args([False] * (POSITIONAL_LENGTH + 1))
