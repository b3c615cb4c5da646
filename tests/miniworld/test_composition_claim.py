"""The claim end to end: with the shipped defaults, CLoRA composes two LoRAs where merging them fails.

The full quality benchmark (docs/quality.md) measured the margin on the two-LoRA suite;
this test checks it on a few seeds the benchmark never used, with the shipped defaults,
20 Euler steps and CFG 5 (the benchmark's setting). The allowance for the small sample
is stated next to the threshold; the seeds were fixed before looking at their pictures.
"""

from __future__ import annotations

import pytest

from clora_ext.engine import EngineSettings
from miniworld.compose import Task, run
from miniworld.loras import BY_SHAPE
from miniworld.model import load_model

SEEDS = range(1000, 1008)  # outside the benchmark's seeds (0-5 chose, 100-105 reported); Euler
# the word order the paper's mask rule never composed (0/12 on seeds 0-5 and on 100-105)
TASK = Task("a square and a circle", (BY_SHAPE["square"].name, BY_SHAPE["circle"].name))
# docs/quality.md, held-out seeds 100-105, Euler and DDIM, this prompt: clora_default (0.5.0, masks
# from the subject words) 8/12, merge 0/12; the whole two-LoRA suite 0.78 [0.67, 0.86]. This is the
# suite's weakest order but one for the shipped rule.
MEASURED_MARGIN = 8 / 12
# 8 pictures: a one-sided 95 % allowance with the widest binomial spread (p = 0.5),
# 1.645 * sqrt(0.25 / 8) = 0.29, rounded up to 3 pictures of 8
ALLOWANCE = 3 / 8


@pytest.fixture(scope="module")
def model():
    return load_model()


def test_clora_defaults_beat_merged_loras(model):
    concepts = TASK.concepts(model)
    clora = [run(model, TASK, "clora", s, settings=EngineSettings(), concepts=concepts) for s in SEEDS]
    merged = [run(model, TASK, "merge", s, concepts=concepts) for s in SEEDS]
    wins = sum(r.verdict["success"] for r in clora) - sum(r.verdict["success"] for r in merged)
    threshold = MEASURED_MARGIN - ALLOWANCE
    assert wins / len(SEEDS) >= threshold, (
        f"CLoRA succeeded on {sum(r.verdict['success'] for r in clora)}/{len(SEEDS)}, merging on "
        f"{sum(r.verdict['success'] for r in merged)}/{len(SEEDS)}; the benchmark's margin {MEASURED_MARGIN} "
        f"less the allowance {ALLOWANCE:.2f} needs {threshold:.2f}"
    )
