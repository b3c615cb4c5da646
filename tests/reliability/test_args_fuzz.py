"""API argument validation under generated input: accepted, or refused with a message naming the field."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@contextlib.contextmanager
def ieee_floats():
    """hypothesis (and pydantic's hypothesis plugin, at import) refuse to run while denormals flush to zero."""
    torch.set_flush_denormal(False)
    try:
        yield
    finally:
        torch.set_flush_denormal(True)


with ieee_floats():
    from clora_ext.webui.params import POSITIONAL_LENGTH, CLoRAArgs, CLoRAArgsError, ConceptArgs, parse_args
    from clora_ext.concepts import Role


@pytest.fixture(autouse=True, scope="module")
def _ieee_floats():
    with ieee_floats():
        yield

FIELDS = set(CLoRAArgs.__fields__) | set(ConceptArgs.__fields__) | {"arguments", "positional arguments"}

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10**6, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.floats(-2, 3), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
numbers = st.one_of(st.floats(-300, 300), st.integers(-5, 200), junk)
roles = st.one_of(st.sampled_from([r.value for r in Role] + [r.label for r in Role]), junk)
concept = st.fixed_dictionaries(
    {},
    optional={
        "subject": st.one_of(st.sampled_from(["cat", "dog", "red car", "", "cat, dog"]), junk),
        "lora": st.one_of(st.sampled_from(["loraA", "loraB", "None", "", "../x", "a/b"]), junk),
        "weight": numbers,
        "te_weight": numbers,
        "trigger": st.one_of(st.sampled_from(["", "sks", "ohwx style"]), junk),
        "role": roles,
        "bogus": junk,
    },
)
named = st.fixed_dictionaries(
    {},
    optional={
        "enabled": st.one_of(st.booleans(), junk),
        "concepts": st.one_of(st.lists(concept, max_size=10), junk),
        "step_size": numbers,
        "update_fraction": numbers,
        "refine_at": st.one_of(st.lists(st.floats(-1, 2), max_size=5), st.sampled_from(["0, 0.2, 0.4", "x", ""]), junk),
        "refine_iterations": numbers,
        "mask_threshold": numbers,
        "morphology": st.one_of(st.sampled_from(["none", "erode", "dilate", "open", "close"]), junk),
        "mask_start": numbers,
        "previews": st.one_of(st.booleans(), junk),
        "mask_tokens": st.one_of(st.sampled_from(["paper", "subject", "base", "base_subject"]), junk),
        "mask_upsampling": st.one_of(st.sampled_from(["nearest", "bilinear", "contour"]), junk),
        "soft_edges_from": numbers,
        "keeps_means_from": numbers,
        "not_a_field": junk,
    },
)
positional = st.lists(
    st.one_of(junk, st.sampled_from(["cat", "dog", "loraA", "None", "content", "style (whole image)"])),
    max_size=POSITIONAL_LENGTH + 3,
)


def check(args: list) -> None:
    try:
        result = parse_args(args)
    except CLoRAArgsError as e:
        message = str(e)
        assert message.startswith("CLoRA"), message
        assert any(name in message for name in FIELDS), message
        assert "\n" not in message and len(message) < 2000
        return
    assert isinstance(result, CLoRAArgs)
    for value in (result.step_size, result.update_fraction, result.mask_threshold, result.mask_start,
                  result.soft_edges_from):
        assert math.isfinite(value)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(named)
def test_named_form(data):
    check([data])


@FUZZ
@given(positional)
def test_positional_form(values):
    check(values)
