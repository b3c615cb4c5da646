"""bench.quality end to end on a few pictures: the report's shape, intervals and grid (no thresholds)."""

from __future__ import annotations

import json
import math

from bench import quality


def test_quick_quality_report_structure(tmp_path):
    methods = ("merge", "update_only", "clora_default")
    report, scored = quality.run_quality(quick=True, methods=methods, samplers=("euler",), steps=4, log=lambda m: None)
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(report))
    report = json.loads(path.read_text())
    assert set(report["methods"]) == set(methods)
    for name, m in report["methods"].items():
        assert m["n"] == sum(report["settings"]["images_per_method"].values())
        for key in ("success", "bleed", "omission", "duplicate", "style_ok"):
            lo, hi = m[f"{key}_ci"]
            assert 0.0 <= lo <= m[key] <= hi <= 1.0
        assert m["seconds_per_image"] > 0
    assert report["methods"]["merge"]["gradient_passes"] == 0 and "mask_iou" not in report["methods"]["merge"]
    assert report["methods"]["clora_default"]["gradient_passes"] > 0
    assert 0.0 <= report["methods"]["clora_default"]["mask_iou"] <= 1.0
    assert set(report["clora_default_minus_merge"]) == {"difference", "ci", "n", "ci_by_seed", "seeds"}
    assert report["settings"]["methods"]["update_only"]["mask_start"] == 1.0
    table = quality.format_table(report)
    assert table.count("| clora_default |") == len(report["suites"])
    grid = quality.image_grid(scored, columns=2)
    assert grid.width > 100 and grid.height > 3 * 32


def test_shards_merge_into_one_run_and_equal_settings_share_pictures(monkeypatch):
    methods = ("merge", "clora_paper", "clora_default")
    kwargs = dict(quick=True, methods=methods, samplers=("euler",), steps=2, log=lambda m: None)
    assert quality.method_settings("clora_default") != quality.method_settings("clora_paper")  # 5 vs 20 iterations
    settings = quality.method_settings
    # defaults equal to the paper's (as until 0.3.0) are rendered once and shared
    monkeypatch.setattr(quality, "method_settings",
                        lambda m: settings("clora_paper" if m == "clora_default" else m))
    parts = [quality.collect(shard=(i, 2), **kwargs) for i in (1, 2)]
    merged = quality.merge(parts)
    assert [s.item for s in merged["merge"]] == [0, 1, 2, 3]
    assert [len(p["merge"]) for p in parts] == [2, 2]
    for a, b in zip(merged["clora_default"], merged["clora_paper"]):
        assert a.result is b.result  # rendered once
    report = quality.build_report(merged, quick=True, steps=2)
    assert report["clora_default_minus_paper"] == {"difference": 0.0, "ci": [0.0, 0.0], "n": 4,
                                                   "ci_by_seed": [0.0, 0.0], "seeds": 2}


def test_wilson_interval():
    from miniworld.evaluate import wilson

    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    lo, hi = wilson(41, 100)
    assert 0.31 < lo < 0.41 < hi < 0.51


def test_paired_difference_by_seed_is_cluster_robust():
    """Pictures of one seed go together: the by-seed interval sums each seed's residuals and uses
    Student's t with seeds - 1 degrees of freedom; correlated seeds widen it past the per-picture one."""
    from scipy import stats

    from bench.quality import paired

    # two seeds: one where the method always wins, one where it always ties (4 pictures each)
    d = [1.0] * 4 + [0.0] * 4
    out = paired(d, [0] * 4 + [1] * 4)
    sums = [4 * (1 - 0.5), 4 * (0 - 0.5)]
    se = math.sqrt(2 / 1 * sum(s * s for s in sums)) / 8
    half = stats.t.ppf(0.975, 1) * se
    assert out["difference"] == 0.5 and out["seeds"] == 2
    assert out["ci_by_seed"] == [round(0.5 - half, 3), round(0.5 + half, 3)]
    assert out["ci_by_seed"][1] - out["ci_by_seed"][0] > out["ci"][1] - out["ci"][0]
    assert "ci_by_seed" not in paired(d)


def test_attribute_suite_puts_a_colour_word_in_one_subjects_phrase_in_both_positions():
    """The attribute suite: the two-LoRA suite's six word orders with a colour word before the first pair
    member's shape (first-named in one order, second in the other), that word part of the subject phrase
    its LoRA is mapped to, in both worlds; the other suites' items keep their positions (merging shards)."""
    from miniworld.model import load_model
    from miniworld.worlds import RELATIONS, lora_spec
    for world in (quality.DEFAULT, RELATIONS):
        model = load_model(world=world)
        full = quality.suites(False, 0, world)
        assert list(full)[:3] == ["two", "three", "style"]
        tasks = list(dict.fromkeys(t for t, _ in full["attribute"]))
        assert len(tasks) == 6 and len(full["attribute"]) == 36
        positions = set()
        for task, two in zip(tasks, dict.fromkeys(t for t, _ in full["two"])):
            assert task.content == two.content
            k = next(i for i, w in enumerate(task.attributes) if w)
            positions.add(k)
            shape = lora_spec(task.content[k]).shape
            word = quality.ATTRIBUTE_WORDS[shape]
            assert f"a {word} {shape}" in task.prompt
            assert task.prompt.replace(f"{word} ", "", 1) == two.prompt
            subjects = [c.concept.subject for c in task.concepts(model)]
            assert subjects[k] == f"{word} {shape}" and subjects[1 - k] == lora_spec(task.content[1 - k]).shape
        assert positions == {0, 1}
