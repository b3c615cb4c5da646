"""The users' geometry on the CPU: whole-generation ratios from per-pass costs (``python -m bench --per-pass``).

At a 64x64 latent (SD1.5 at 512 px) one CPU generation of (d) with 8 LoRAs takes hours, so the
ratios are built from what a generation is made of, measured in one process:

* per-pass wall times, in interleaved rounds (each round times one pass of every kind, after one
  untimed call of each): ``plain2`` (a plain batch-2 call: one step of (a), whose LoRAs are merged
  into the weights), ``fused`` (the engine's fused pass over every row: one step of (c) and of
  (d)), ``grad`` (one gradient pass: one update iteration of (d)); for (b), ``reference_forward``
  (its K+1 sequential batch-2 calls with explicit attention and a graph) and ``reference_round``
  (the same with the backward);
* the schedule's pass counts (the benchmark's schedule, the shipped one by default, at ``steps``): S fused passes and G
  gradient passes for (d); S plain calls for (a); for (b) ``(S - U)`` forward rounds and G
  forward-and-backward rounds (U: the steps that update);
* per round: a = S plain2, c = S fused, d = c + G grad, b = (S - U) reference_forward + G
  reference_round; each ratio is the median of its per-round ratios, as in the default run;
* memory: the peak above the level before one pass of each kind (d: the larger of fused and
  grad; a: plain2), which leaves out what a generation holds between passes (the LoRAs' device
  copies, the latent): an estimate, not the default run's measurement;
* ``check``: one whole generation of (a) and (d) at ``check_steps`` steps at the same geometry,
  against what the per-pass costs predict for that shorter schedule.

The JSON has the default run's keys (``d_over_a_median``, ``d_over_c_median``,
``b_over_d_median``, ``mem_over_start_d_over_a``) per LoRA count, and ``method: "per_pass"``.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from typing import Any, Callable

import torch

from clora_ext.engine import CLoRAEngine, EngineSettings
from clora_ext.records import StepRecord

from .attention import fast_attention
from .memory import PeakMemory
from .passes import pass_inputs, reference_pass
from .run import BenchOptions, Measured, build_setup, machine_info, prompt_for, run_a, run_cd

MiB = 2**20


def pass_counts(schedule: Any, steps: int) -> dict[str, int]:
    """Fused passes, gradient passes and updating steps of one generation of ``steps`` steps."""
    gradient = sum(schedule.iterations_at(i, steps) for i in range(steps))
    updating = sum(1 for i in range(steps) if schedule.updates_at(i, steps))
    return {"steps": steps, "gradient_passes": gradient, "updating_steps": updating}


def compose(costs: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
    """Seconds of a, b, c, d for one generation from per-pass seconds and the schedule's counts."""
    s, g, u = counts["steps"], counts["gradient_passes"], counts["updating_steps"]
    out = {"a": s * costs["plain2"], "c": s * costs["fused"]}
    out["d"] = out["c"] + g * costs["grad"]
    if "reference_round" in costs:
        out["b"] = (s - u) * costs["reference_forward"] + g * costs["reference_round"]
    return out


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def measure_passes(opts: BenchOptions, setup: Any, n: int, rounds: int, with_reference: bool,
                   log: Callable[[str], None]) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Per-round wall seconds of every pass kind, and the peak memory above start (MiB) of one of each."""
    unet = setup.model.unet
    conds, unet_loras, token_maps, x, t, row_model = pass_inputs(setup, n, opts.latent)
    hw = (opts.latent, opts.latent)
    with fast_attention(unet), CLoRAEngine(unet, unet_loras, token_maps, EngineSettings()) as engine:
        context2 = torch.stack([conds.cond[0], conds.uncond[0]])

        @torch.no_grad()
        def plain2() -> None:
            unet(x.expand(2, -1, -1, -1) * 0.1, t.expand(2), context=context2)

        @torch.no_grad()
        def fused() -> None:
            engine._fused_pass(x, 0, 20, row_model, StepRecord(0))

        def grad() -> None:
            engine.loss_and_gradient(x, row_model)

        kinds: dict[str, Callable[[], None]] = {"plain2": plain2, "fused": fused, "grad": grad}
        if with_reference:
            reference = reference_pass(unet, conds, unet_loras, token_maps, x, t, hw)
            kinds["reference_forward"] = lambda: reference(False)
            kinds["reference_round"] = lambda: reference(True)
        peaks = {}
        for name, fn in kinds.items():  # the untimed first call of each, its peak memory measured
            with PeakMemory("cpu") as meter:
                fn()
            peaks[name] = meter.reading.delta_bytes / MiB
            log(f"{n} LoRAs: first {name} pass done, peak above start {peaks[name]:.0f} MiB")
        per_round = []
        for r in range(rounds):
            walls = {}
            for name, fn in kinds.items():
                start = time.perf_counter()
                fn()
                walls[name] = time.perf_counter() - start
            per_round.append(walls)
            log(f"{n} LoRAs: round {r + 1}/{rounds}: " + ", ".join(f"{k} {v:.1f} s" for k, v in walls.items()))
    return per_round, peaks


def _check(opts: BenchOptions, setup: Any, n: int, costs: dict[str, float], log: Callable[[str], None]) -> dict:
    """One whole generation of (a) and (d) at ``opts.steps`` steps against the per-pass prediction."""
    measured: dict[str, Measured] = {"a": run_a(opts, setup, n), "d": run_cd(opts, setup, n, update=True)}
    counts = pass_counts(opts.schedule, opts.steps)
    counts["gradient_passes"] = measured["d"].extra["gradient_passes"]  # what d really ran
    predicted = compose(costs, counts)
    out = {"steps": opts.steps, "gradient_passes": counts["gradient_passes"]}
    for c in ("a", "d"):
        out[f"{c}_measured_s"] = measured[c].seconds
        out[f"{c}_predicted_s"] = predicted[c]
        out[f"{c}_measured_over_predicted"] = measured[c].seconds / predicted[c]
    out["d_over_a_measured"] = measured["d"].seconds / measured["a"].seconds
    out["d_over_a_predicted"] = predicted["d"] / predicted["a"]
    log(f"check, {n} LoRAs, {opts.steps} steps: a {out['a_measured_s']:.1f} s (predicted {predicted['a']:.1f}), "
        f"d {out['d_measured_s']:.1f} s (predicted {predicted['d']:.1f})")
    return out


def run_per_pass(opts: BenchOptions, log: Callable[[str], None] = print, check_steps: int = 4) -> dict[str, dict[str, Any]]:
    """Ratios for every LoRA count of ``opts`` from per-pass costs at ``opts.latent``; with ``check_steps``,
    a whole generation of that many steps checks the composition (first LoRA count only)."""
    opts.validate()
    if opts.device != "cpu":
        raise ValueError("the per-pass estimate is for the CPU; on a GPU run whole generations")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.set_flush_denormal(True)
    machine = machine_info(opts)
    counts = pass_counts(opts.schedule, opts.steps)
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="clora-bench-") as workdir:
        setup = build_setup(opts, workdir)
        for k, n in enumerate(opts.loras):
            with_reference = "b" in opts.configs and n <= opts.b_max_loras
            per_round, peaks = measure_passes(opts, setup, n, opts.rounds, with_reference, log)
            generations = [compose(walls, counts) for walls in per_round]

            def median_ratio(num: str, den: str) -> float | None:
                if num not in generations[0] or den not in generations[0]:
                    return None
                return statistics.median(g[num] / g[den] for g in generations)

            costs = {name: statistics.median(w[name] for w in per_round) for name in per_round[0]}
            memory_d = max(peaks["fused"], peaks["grad"])
            entry: dict[str, Any] = {
                "loras": n,
                "prompt": prompt_for(n),
                "method": "per_pass",
                "latent": opts.latent,
                "rounds": opts.rounds,
                "d_over_a_median": median_ratio("d", "a"),
                "d_over_c_median": median_ratio("d", "c"),
                "b_over_d_median": median_ratio("b", "d"),
                "c_over_a_median": median_ratio("c", "a"),
                "mem_over_start_d_over_a": _ratio(memory_d, peaks["plain2"]),
                "pass_seconds_median": costs,
                "pass_seconds_per_round": per_round,
                "pass_peak_above_start_mib": peaks,
                "counts": counts,
                "generation_seconds_median": {c: statistics.median(g[c] for g in generations) for c in generations[0]},
                "machine": machine,
            }
            if check_steps and k == 0:
                entry["check"] = _check(dataclasses.replace(opts, steps=check_steps, loras=(n,)), setup, n, costs, log)
            entry["targets"] = {
                "d_over_a_median<=2.0 (2 LoRAs)": None if n != 2 else entry["d_over_a_median"] <= 2.0,
                "d_over_a_median<=4.0 (8 LoRAs)": None if n != 8 else entry["d_over_a_median"] <= 4.0,
            }
            out[str(n)] = entry
    return out


def format_per_pass(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| LoRAs | latent | plain2 s | fused s | grad s | d/a | d/c | b/d | c/a | mem d/a (per pass) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}"

    for n, e in results.items():
        s = e["pass_seconds_median"]
        lines.append(f"| {n} | {e['latent']} | {s['plain2']:.1f} | {s['fused']:.1f} | {s['grad']:.1f} | "
                     f"{f(e['d_over_a_median'])} | {f(e['d_over_c_median'])} | {f(e['b_over_d_median'])} | "
                     f"{f(e['c_over_a_median'])} | {f(e['mem_over_start_d_over_a'])} |")
    return "\n".join(lines)
