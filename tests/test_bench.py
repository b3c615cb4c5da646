"""The benchmark's quick path runs end to end through its Python API (no timing thresholds)."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("ldm")

from bench import format_table, quick_options, run_benchmark  # noqa: E402
from bench.attention import attention_modules  # noqa: E402
from tolerance import close


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_quick_bench_structure(tmp_path):
    opts = quick_options(steps=4, loras=(2,), configs="abcd", latent=8, warmup=False, rounds=2, refine_iterations=1)
    results = run_benchmark(opts, log=lambda message: None)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(results))  # JSON-serialisable
    results = json.loads(path.read_text())

    assert set(results) == {"2"}
    entry = results["2"]
    for key in ("d_over_a", "d_over_c", "b_over_d", "mem_d_over_a", "cpu_d_over_a", "cpu_b_over_d", "probe_norm_d_over_c",
                "d_over_c_median", "cpu_d_over_c_median", "b_over_d_same_passes", "mem_over_start_d_over_a"):
        assert _positive(entry[key]), (key, entry[key])
    assert entry["rounds"] == 2 and entry["settings"]["engine_settings"]["refine_tolerance"] is None
    for c, r in entry["configs"].items():  # every round measured, the median reported
        assert len(r["seconds_rounds"]) == 2 and min(r["seconds_rounds"]) <= r["seconds"] <= max(r["seconds_rounds"]), c
    # the per-round median ratio lies between the rounds' own ratios
    d_c = [d / c for d, c in zip(entry["configs"]["d"]["seconds_rounds"], entry["configs"]["c"]["seconds_rounds"])]
    assert min(d_c) - 1e-9 <= entry["d_over_c_median"] <= max(d_c) + 1e-9
    assert entry["gradient_passes_b_d"][0] == entry["gradient_passes_b_d"][1]  # like for like
    assert set(entry["configs"]) == {"a", "b", "c", "d"}
    for c, r in entry["configs"].items():
        assert _positive(r["seconds"]) and r["peak_bytes"] > 0, c
        assert r["peak_bytes"] >= r["before_bytes"] or r["memory_method"].startswith("sampled"), c

    a, b, c, d = (entry["configs"][k] for k in "abcd")
    assert a["unet_rows"] == 2 * 4  # one batch-2 call per step
    assert c["fused_rows"] == d["fused_rows"] == 2 * 3 * 4  # cond+uncond x (base + 2 LoRAs) x steps
    assert c["gradient_passes"] == 0 and c["gradient_rows"] == 0
    assert 1 <= d["gradient_passes"] <= d["gradient_passes_max"]
    assert d["gradient_rows"] == 3 * d["gradient_passes"]  # cond rows only
    # (b): every round runs all 3 variants as batch-2 calls; a fixed refine count, no early stop
    settings = entry["settings"]
    assert b["unet_calls"] == 3 * b["forward_rounds"]
    assert b["backward_passes"] == d["gradient_passes_max"]
    assert b["refine_rounds"] == settings["refine_iterations"] * len(settings["refine_steps"])
    assert set(entry["d_breakdown"]) >= {"fused_passes_seconds", "gradient_seconds", "refinement_seconds", "other_seconds"}
    assert d["regular_update_passes"] == settings["update_steps"]  # one regular pass per update step
    assert d["regular_update_passes"] + d["refinement_passes"] == d["gradient_passes"]
    assert entry["d_gradient_passes"] == d["gradient_passes"]
    assert "| 2 |" in format_table(results)


def test_attention_swaps_are_per_instance_and_restored(tiny_unet):
    import torch

    from bench.attention import explicit_attention, fast_attention

    modules = attention_modules(tiny_unet)
    assert modules and all("forward" not in m.__dict__ for m in modules.values())
    cls_forward = {type(m): type(m).forward for m in modules.values()}
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 77, 32)
    with torch.no_grad():
        base = tiny_unet(x, t, context=ctx)
        with fast_attention(tiny_unet):
            assert all("forward" in m.__dict__ for m in modules.values())
            fast = tiny_unet(x, t, context=ctx)
            with explicit_attention(tiny_unet):
                eager = tiny_unet(x, t, context=ctx)
            assert all("forward" in m.__dict__ for m in modules.values())  # the outer swap is back
    assert all("forward" not in m.__dict__ for m in modules.values())
    assert {type(m): type(m).forward for m in modules.values()} == cls_forward
    close(fast, base, 1e-4)
    close(eager, base, 1e-4)


def test_per_pass_estimate_composes_the_schedule_and_checks_itself():
    from bench.geometry import compose, format_per_pass, pass_counts, run_per_pass
    from clora_ext.engine import EngineSettings

    schedule = EngineSettings().schedule
    # the shipped schedule at 20 steps: 10 updating steps, refinement of 5 at steps 0, 4 and 8
    assert pass_counts(schedule, 20) == {"steps": 20, "gradient_passes": 25, "updating_steps": 10}
    costs = {"plain2": 1.0, "fused": 3.0, "grad": 2.0, "reference_forward": 4.0, "reference_round": 10.0}
    assert compose(costs, pass_counts(schedule, 20)) == {"a": 20.0, "c": 60.0, "d": 110.0, "b": 10 * 4.0 + 25 * 10.0}

    opts = quick_options(steps=20, loras=(2,), configs="abcd", latent=8, warmup=False, rounds=2, refine_iterations=1)
    results = run_per_pass(opts, log=lambda message: None, check_steps=2)
    entry = json.loads(json.dumps(results))["2"]
    assert entry["method"] == "per_pass" and entry["counts"] == pass_counts(opts.schedule, 20)
    for key in ("d_over_a_median", "d_over_c_median", "b_over_d_median", "c_over_a_median", "mem_over_start_d_over_a"):
        assert _positive(entry[key]), (key, entry[key])
    rounds = [compose(walls, entry["counts"]) for walls in entry["pass_seconds_per_round"]]
    assert len(rounds) == 2
    d_a = [r["d"] / r["a"] for r in rounds]
    assert min(d_a) - 1e-9 <= entry["d_over_a_median"] <= max(d_a) + 1e-9
    check = entry["check"]  # a whole generation of 2 steps, against the per-pass prediction
    assert check["steps"] == 2 and check["gradient_passes"] == pass_counts(opts.schedule, 2)["gradient_passes"]
    assert _positive(check["d_measured_s"]) and _positive(check["d_predicted_s"])
    assert "| 2 | 8 |" in format_per_pass(results)
