"""The benchmark proper: one process, one model, four configurations, per LoRA count.

(a) plain txt2img with every concept LoRA merged into the weights (what users do today);
(b) the reference implementation's cost structure (:mod:`bench.reference`);
(c) our engine with latent updates disabled: masked fusion of all variants only;
(d) our engine with its default settings and the (scaled) paper schedule.

All four share the model, the Euler sampler, the seed, the prompt, the negative
prompt, the CFG scale, the step count and the latent size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from clora_ext.concepts import Concept
from clora_ext.engine import EngineSettings
from clora_ext.lora_file import MappedLoRA, map_lora, read_lora_file
from clora_ext.routing import merged
from clora_ext.update import Schedule
from clora_ext.devtools import tiny_sd
from clora_ext.devtools.loras import write_kohya_lora
from clora_ext.devtools.pipeline import ConceptLoRA, InnerModel, TinySD, generate

from .attention import fast_attention
from .memory import PeakMemory
from .reference import generate_reference

SUBJECTS = ("cat", "dog", "fox", "horse", "bird", "cow", "sheep", "frog")
NEGATIVE = "blurry, low quality, deformed"
PAPER_STEPS = 50
CONFIG_NAMES = {
    "a": "plain, LoRAs merged",
    "b": "reference cost structure",
    "c": "fusion only (no update)",
    "d": "our CLoRA",
}
MiB = 2**20


def prompt_for(n: int) -> str:
    """'a photo of a cat and a dog in a garden', with n distinct one-token subjects."""
    if not 1 <= n <= len(SUBJECTS):
        raise ValueError(f"LoRA count must be 1..{len(SUBJECTS)}, got {n}")
    subjects = [f"a {s}" for s in SUBJECTS[:n]]
    listed = subjects[0] if n == 1 else ", ".join(subjects[:-1]) + " and " + subjects[-1]
    return f"a photo of {listed} in a garden"


@dataclass
class BenchOptions:
    model: str = "sd15-full"  # tiny_sd layout: "sd15-full" (real SD1.5 UNet shape) or "sd15" (tiny)
    device: str = "cpu"
    dtype: str = "fp32"  # fp32 | fp16 (fp16: CUDA only, under autocast)
    latent: int = 16  # latent side (image side / 8)
    steps: int = 20
    loras: tuple[int, ...] = (2, 8)
    configs: str = "abcd"
    b_max_loras: int = 2  # (b) is skipped above this LoRA count (its cost explodes)
    refine_iterations: int | None = None  # None: the shipped default (5; the paper: 20), at any step count
    refine_tolerance: float | None = EngineSettings.refine_tolerance  # None: fixed refine count in (d)
    rank: int = 16
    seed: int = 0
    cfg_scale: float = 7.0
    threads: int | None = 1
    warmup: bool = True
    probe: bool = True  # time two plain UNet calls before and after every configuration
    preset: str = "default"
    rounds: int = 3  # interleaved rounds (a b c d, a b c d, ...); ratios are medians of per-round ratios
    max_rows: int | None = None  # (c), (d): the most UNet rows one call may take (the hosts' row cap)

    @property
    def schedule(self) -> Schedule:
        shipped = EngineSettings().schedule
        if self.refine_iterations is None:
            return shipped
        return dataclasses.replace(shipped, refine_iterations=self.refine_iterations)

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16}[self.dtype]

    def validate(self) -> None:
        if set(self.configs) - set("abcd") or not self.configs:
            raise ValueError(f"--configs takes letters from 'abcd', got {self.configs!r}")
        if self.dtype == "fp16" and not self.device.startswith("cuda"):
            raise ValueError("fp16 needs --device cuda (CPU half precision is not what the host runs)")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda but torch has no CUDA")
        for n in self.loras:
            prompt_for(n)
        if self.rounds < 1:
            raise ValueError("--rounds must be at least 1")
        if self.model not in ("sd15", "sd15-full"):
            raise ValueError("--model is sd15-full or sd15 (tiny)")


def quick_options(**overrides: Any) -> BenchOptions:
    """The tiny test model: same structure as the default run, a few seconds per configuration."""
    return dataclasses.replace(BenchOptions(model="sd15", rank=4, preset="quick"), **overrides)


def paper_options(**overrides: Any) -> BenchOptions:
    """The unscaled 50-step schedule (refinement at 0, 10, 20 with 20 iterations), 2 LoRAs."""
    return dataclasses.replace(BenchOptions(steps=PAPER_STEPS, loras=(2,), preset="paper"), **overrides)


# -- model and LoRAs -----------------------------------------------------------------------------


@dataclass
class Setup:
    model: TinySD
    loras: list[MappedLoRA]
    build_seconds: float
    device: torch.device

    def concepts(self, n: int) -> list[ConceptLoRA]:
        return [
            ConceptLoRA(Concept(subject=SUBJECTS[k], lora=self.loras[k].name), self.loras[k]) for k in range(n)
        ]


def build_setup(opts: BenchOptions, workdir: str) -> Setup:
    start = time.perf_counter()
    device = torch.device(opts.device)
    unet = tiny_sd.build_tiny_unet(opts.model, seed=opts.seed)
    hidden = tiny_sd.DEFAULT_CONTEXT_DIM[opts.model]
    text_encoder = tiny_sd.build_tiny_text_encoder(seed=opts.seed, hidden=hidden)
    loras = []
    for k in range(max(opts.loras)):
        path = os.path.join(workdir, f"concept{k}.safetensors")
        write_kohya_lora(path, unet, text_encoder, seed=1000 + k, rank=opts.rank, alpha=opts.rank / 2)
        loras.append(map_lora(read_lora_file(path), unet, text_encoder))
    unet.to(device, opts.torch_dtype)
    text_encoder.to(device, opts.torch_dtype)
    if device.type != "cpu" or opts.torch_dtype != torch.float32:
        # once, up front: the router would otherwise convert every delta on every pass
        for lora in loras:
            for part in (lora.unet, lora.text_encoder):
                for name, delta in part.items():
                    part[name] = delta.to(device, opts.torch_dtype)
    return Setup(TinySD(unet, text_encoder), loras, time.perf_counter() - start, device)


@dataclass
class SumDelta:
    """Several LoRAs' deltas of one module, summed (one weight backup per module when merging)."""

    parts: list[tuple[float, Any]]
    built_per_pass = False  # what routing.merged asks of a delta: its parts build themselves in ``dense``

    def dense(self, weight_shape: torch.Size) -> torch.Tensor:
        return sum(w * d.dense(weight_shape) for w, d in self.parts)


def summed_deltas(loras: Sequence[tuple[float, Mapping[str, Any]]]) -> dict[str, SumDelta]:
    out: dict[str, SumDelta] = {}
    for weight, deltas in loras:
        for name, delta in deltas.items():
            out.setdefault(name, SumDelta([])).parts.append((weight, delta))
    return out


# -- timing ----------------------------------------------------------------------------------------


class PassTimer:
    """Wraps the inner model: wall time of forward passes with and without autograd, and of the
    backward of each gradient pass (from the end of its forward to the moment the gradient
    reaches the pass's input rows; the loss in between is negligible)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.seconds: dict[str, float] = {"fused": 0.0, "grad_forward": 0.0, "grad_backward": 0.0}
        self.calls: dict[str, int] = {"fused": 0, "grad_forward": 0, "grad_backward": 0}
        self.rows: dict[str, int] = {"fused": 0, "grad_forward": 0}
        self.step = 0  # advanced by ``on_step``
        self.fused_passes: list[float] = []  # wall seconds of every no-grad pass
        self.gradient_passes: list[dict[str, float]] = []  # step, forward, backward (0: no backward ran)

    def on_step(self, step: int, engine: object = None) -> None:
        self.step = step + 1

    def regular_and_refinement(self) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
        """The first gradient pass of every step (the regular update) and the others (refinement)."""
        seen: set[float] = set()
        regular, refinement = [], []
        for p in self.gradient_passes:
            (refinement if p["step"] in seen else regular).append(p)
            seen.add(p["step"])
        return regular, refinement

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _add(self, kind: str, seconds: float) -> None:
        self.seconds[kind] += seconds
        self.calls[kind] += 1

    def wrap(self, fn: InnerModel) -> InnerModel:
        def timed(x_rows: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            grad = torch.is_grad_enabled() and x_rows.requires_grad
            kind = "grad_forward" if grad else "fused"
            self.rows[kind] += x_rows.shape[0]
            self.sync()
            start = time.perf_counter()
            try:
                return fn(x_rows, sigma, **kwargs)
            finally:
                self.sync()
                end = time.perf_counter()
                self._add(kind, end - start)
                if grad:
                    record = {"step": self.step, "forward": end - start, "backward": 0.0}
                    self.gradient_passes.append(record)

                    def backward_done(g: torch.Tensor, end: float = end, record: dict = record) -> None:
                        self.sync()
                        record["backward"] = time.perf_counter() - end
                        self._add("grad_backward", record["backward"])

                    x_rows.register_hook(backward_done)
                else:
                    self.fused_passes.append(end - start)

        return timed


@contextlib.contextmanager
def _autocast(opts: BenchOptions) -> Iterator[None]:
    if opts.dtype == "fp16":
        with torch.autocast(device_type="cuda", dtype=torch.float16):
            yield
    else:
        yield


@dataclass
class Measured:
    seconds: float
    cpu_seconds: float
    peak_bytes: int
    before_bytes: int
    memory_method: str
    latent: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "peak_bytes": self.peak_bytes,
            "peak_mib": self.peak_bytes / MiB,
            "before_bytes": self.before_bytes,
            "peak_over_start_mib": max(0, self.peak_bytes - self.before_bytes) / MiB,
            "memory_method": self.memory_method,
            **self.extra,
        }


def _measure(opts: BenchOptions, device: torch.device, body: Callable[[], tuple[torch.Tensor, dict]],
             setup_ctx: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Measured:
    """Time ``body`` (inside ``setup_ctx``, whose memory counts but whose time does not)."""
    load_before = _loadavg()
    with PeakMemory(device) as memory:
        with setup_ctx():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            with _autocast(opts):
                latent, extra = body()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    reading = memory.reading
    assert reading is not None
    # other processes on the machine: the 1-minute load average around the run, and the share
    # of the wall time this process got the CPU (1.0 with one thread and no contention)
    extra = {**extra, "loadavg_1min": [load_before, _loadavg()], "cpu_share": cpu_seconds / max(seconds, 1e-9)}
    return Measured(seconds, cpu_seconds, reading.peak_bytes, reading.before_bytes, reading.method,
                    latent.detach().float().cpu(), extra)


def _loadavg() -> float | None:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# -- the four configurations -----------------------------------------------------------------------


def _common(opts: BenchOptions, n: int) -> dict[str, Any]:
    return dict(
        seed=opts.seed, steps=opts.steps, cfg_scale=opts.cfg_scale, latent_hw=(opts.latent, opts.latent)
    )


def run_a(opts: BenchOptions, setup: Setup, n: int) -> Measured:
    concepts = setup.concepts(n)
    model = setup.model
    unet_deltas = summed_deltas([(c.concept.weight, c.lora.unet) for c in concepts])
    te_deltas = summed_deltas([(c.concept.te_weight, c.lora.text_encoder) for c in concepts])
    modules = {**dict(model.unet.named_modules()), **{f"te.{k}": v for k, v in model.text_encoder.named_modules()}}
    backup = sum(modules[k].weight.numel() * modules[k].weight.element_size() for k in unet_deltas)
    backup += sum(modules[f"te.{k}"].weight.numel() * modules[f"te.{k}"].weight.element_size() for k in te_deltas)
    timer = PassTimer(setup.device)
    merge_seconds = {}

    @contextlib.contextmanager
    def merge() -> Iterator[None]:
        start = time.perf_counter()
        with merged(model.unet, unet_deltas), merged(model.text_encoder, te_deltas):
            merge_seconds["merge"] = time.perf_counter() - start
            yield

    def body():
        x, _ = generate(model, prompt_for(n), NEGATIVE, sampler="euler", inner_wrapper=timer.wrap,
                        on_step=timer.on_step,
                        **_common(opts, n))
        return x, {
            "unet_calls": timer.calls["fused"],
            "unet_rows": timer.rows["fused"],
            "unet_seconds": timer.seconds["fused"],
            "unet_call_min_seconds": min(timer.fused_passes),
            "merge_seconds": merge_seconds.get("merge"),
            "merge_backup_bytes": backup,
        }

    return _measure(opts, setup.device, body, merge)


def _engine_settings(opts: BenchOptions) -> EngineSettings:
    return EngineSettings(schedule=opts.schedule, refine_tolerance=opts.refine_tolerance)


def run_cd(opts: BenchOptions, setup: Setup, n: int, update: bool) -> Measured:
    concepts = setup.concepts(n)
    timer = PassTimer(setup.device)
    settings = _engine_settings(opts)

    def body():
        x, engine = generate(setup.model, prompt_for(n), NEGATIVE, sampler="euler", concepts=concepts,
                             settings=settings, allow_update=update, inner_wrapper=timer.wrap,
                             on_step=timer.on_step, max_rows=opts.max_rows,
                             **_common(opts, n))
        assert engine is not None
        records = engine.records
        passes = sum(len(r.losses) for r in records)
        schedule = settings.schedule
        regular, refinement = timer.regular_and_refinement()
        extra = {
            "fused_calls": timer.calls["fused"],
            "fused_rows": timer.rows["fused"],
            "fused_seconds": timer.seconds["fused"],
            "gradient_passes": passes,
            "gradient_passes_max": sum(schedule.iterations_at(r.step, opts.steps) for r in records) if update else 0,
            "gradient_rows": timer.rows["grad_forward"],
            "grad_forward_seconds": timer.seconds["grad_forward"],
            "grad_backward_seconds": timer.seconds["grad_backward"],
            "gradient_backward_passes": timer.calls["grad_backward"],  # a pass that stops refinement has none
            "fused_pass_min_seconds": min(timer.fused_passes),
            # regular: the first gradient pass of each update step; refinement: the extra ones
            "regular_update_passes": len(regular),
            "regular_update_seconds": sum(p["forward"] + p["backward"] for p in regular),
            "refinement_passes": len(refinement),
            "refinement_backward_passes": sum(p["backward"] > 0 for p in refinement),
            "refinement_seconds": sum(p["forward"] + p["backward"] for p in refinement),
            "gradient_pass_min_seconds": min((p["forward"] + p["backward"] for p in regular), default=None),
            "latent_updates": sum(r.iterations for r in records),
            "mean_overlap_after": sum(r.overlap_after or 0.0 for r in records) / max(1, len(records)),
            "loss_after_last_update_step": _last_update_loss(records, schedule, opts.steps),
            # per update step: the loss of every gradient pass run (early stopping shows here)
            "losses_per_step": {str(r.step): r.losses for r in records if r.losses},
        }
        return x, extra

    return _measure(opts, setup.device, body)


def _last_update_loss(records, schedule: Schedule, steps: int) -> float | None:
    updating = [r for r in records if schedule.updates_at(r.step, steps)]
    return updating[-1].loss_after if updating else None


def run_b(opts: BenchOptions, setup: Setup, n: int) -> Measured:
    concepts = setup.concepts(n)
    sync = (lambda: torch.cuda.synchronize(setup.device)) if setup.device.type == "cuda" else (lambda: None)

    def body():
        x, stats = generate_reference(setup.model, prompt_for(n), NEGATIVE, concepts, schedule=opts.schedule,
                                      sync=sync, **_common(opts, n))
        return x, {
            "unet_calls": stats.unet_calls,
            "forward_rounds": stats.forward_rounds,
            "backward_passes": stats.backward_passes,
            "forward_seconds": stats.forward_seconds,
            "backward_seconds": stats.backward_seconds,
            "refine_rounds": stats.refine_rounds,
            "refine_seconds": stats.refine_seconds,
            # the loss at b's last gradient pass (b's maps average the cond and uncond rows, so this is
            # close to, not the same quantity as, d's loss_after_last_update_step)
            "loss_at_last_gradient_pass": stats.losses[-1] if stats.losses else None,
        }

    return _measure(opts, setup.device, body)


# -- orchestration ---------------------------------------------------------------------------------


def machine_info(opts: BenchOptions) -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    ram = None
    try:
        with open("/proc/meminfo") as f:
            ram = int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "ram_bytes": ram,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    if opts.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(opts.device))
    return info


def _settings_info(opts: BenchOptions) -> dict[str, Any]:
    s = opts.schedule
    return {
        "preset": opts.preset,
        "model": opts.model,
        "device": opts.device,
        "dtype": opts.dtype,
        "latent": opts.latent,
        "steps": opts.steps,
        "sampler": "euler",
        "cfg_scale": opts.cfg_scale,
        "seed": opts.seed,
        "lora_rank": opts.rank,
        "update_steps": sum(s.updates_at(i, opts.steps) for i in range(opts.steps)),
        "refine_steps": sorted({i for i in range(opts.steps) if s.iterations_at(i, opts.steps) > 1}),
        "refine_iterations": s.refine_iterations,
        "refine_tolerance": opts.refine_tolerance,
        # what (d) ran: the shipped engine defaults unless an option above overrides them
        "engine_settings": _json_ready(dataclasses.asdict(_engine_settings(opts))),
        "rounds": opts.rounds,
        "max_rows": opts.max_rows,
        "attention": "SDPA (instance-patched) for a, c, d; explicit softmax in every layer for b",
        "negative": NEGATIVE,
    }


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return getattr(value, "value", str(value))  # enums


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def _rel_diff(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm().clamp_min(1e-12))


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _round_ratio(rounds: Mapping[str, Sequence[Measured]], num: str, den: str, attr: str = "seconds") -> float | None:
    """The median over rounds of the per-round ratio (the two ran back to back in each round)."""
    if num not in rounds or den not in rounds:
        return None
    ratios = [getattr(x, attr) / getattr(y, attr) for x, y in zip(rounds[num], rounds[den]) if getattr(y, attr) > 0]
    return _median(ratios) if ratios else None


def _representative(runs: Sequence[Measured]) -> Measured:
    """The round with the median wall time (its extras describe a typical run), carrying every
    round's times and the highest memory peak over the rounds."""
    ordered = sorted(runs, key=lambda m: m.seconds)
    m = ordered[(len(ordered) - 1) // 2]
    peak = max(runs, key=lambda r: r.peak_bytes - r.before_bytes)
    extra = {**m.extra, "seconds_rounds": [r.seconds for r in runs], "cpu_seconds_rounds": [r.cpu_seconds for r in runs]}
    return dataclasses.replace(m, seconds=_median([r.seconds for r in runs]),
                               cpu_seconds=_median([r.cpu_seconds for r in runs]),
                               peak_bytes=peak.peak_bytes, before_bytes=peak.before_bytes, extra=extra)


def summarise(n: int, rounds: dict[str, list[Measured]], opts: BenchOptions, machine: dict[str, Any]) -> dict[str, Any]:
    """Ratios and per-configuration figures for one LoRA count from ``rounds[c]`` (one Measured per round)."""
    results = {c: _representative(runs) for c, runs in rounds.items()}

    def sec(c):
        return results[c].seconds if c in results else None

    def cpu(c):
        return results[c].cpu_seconds if c in results else None

    def peak(c):
        return results[c].peak_bytes if c in results else None

    def over(c):
        return max(1, results[c].peak_bytes - results[c].before_bytes) if c in results else None

    def norm(c):
        """Seconds in units of the probe (the mean of the probes before and after the configuration)."""
        p = results[c].extra.get("probe_seconds") if c in results else None
        if not p or None in p:
            return None
        return results[c].seconds / (sum(p) / len(p))

    entry: dict[str, Any] = {
        "loras": n,
        "prompt": prompt_for(n),
        "rounds": opts.rounds,
        # medians of the per-round ratios (load cannot favour one configuration: each round runs all)
        "d_over_a_median": _round_ratio(rounds, "d", "a"),
        "d_over_c_median": _round_ratio(rounds, "d", "c"),
        "b_over_d_median": _round_ratio(rounds, "b", "d"),
        "cpu_d_over_a_median": _round_ratio(rounds, "d", "a", "cpu_seconds"),
        "cpu_d_over_c_median": _round_ratio(rounds, "d", "c", "cpu_seconds"),
        "cpu_b_over_d_median": _round_ratio(rounds, "b", "d", "cpu_seconds"),
        # ratios of the configurations' median times
        "d_over_a": _ratio(sec("d"), sec("a")),
        "d_over_c": _ratio(sec("d"), sec("c")),
        "b_over_d": _ratio(sec("b"), sec("d")),
        "mem_d_over_a": _ratio(peak("d"), peak("a")),
        "probe_norm_d_over_a": _ratio(norm("d"), norm("a")),
        "probe_norm_d_over_c": _ratio(norm("d"), norm("c")),
        "probe_norm_b_over_d": _ratio(norm("b"), norm("d")),
        "cpu_d_over_a": _ratio(cpu("d"), cpu("a")),
        "cpu_d_over_c": _ratio(cpu("d"), cpu("c")),
        "cpu_b_over_d": _ratio(cpu("b"), cpu("d")),
        "mem_b_over_d": _ratio(peak("b"), peak("d")),
        "configs": {c: {"name": CONFIG_NAMES[c], **results[c].summary()} for c in sorted(results)},
        "settings": _settings_info(opts),
        "machine": machine,
    }
    if "a" in results and "d" in results:
        # memory above the process's level before the configuration (the model excluded); (a)'s
        # peak holds the weight backup merging keeps (A1111 keeps one too), reported apart
        backup = results["a"].extra.get("merge_backup_bytes") or 0
        entry["a_merge_backup_mib"] = backup / MiB
        entry["mem_over_start_d_over_a"] = _ratio(over("d"), max(1, over("a") - backup))
        entry["mem_over_start_d_over_a_with_merge_backup"] = _ratio(over("d"), over("a"))
        entry["mem_d_over_a_without_merge_backup"] = _ratio(peak("d"), results["a"].peak_bytes - backup)
    if "c" in results:
        for c in ("a", "b", "d"):
            if c in results:
                entry["configs"][c]["latent_rel_diff_vs_c"] = _rel_diff(results[c].latent, results["c"].latent)
    if "d" in results:
        d = results["d"].extra
        entry["d_gradient_passes"] = d["gradient_passes"]
        entry["d_gradient_passes_max"] = d["gradient_passes_max"]
        other = results["d"].seconds - d["fused_seconds"] - d["grad_forward_seconds"] - d["grad_backward_seconds"]
        # d/c from d alone: its fused passes ARE configuration c's work, interleaved step by step with
        # its gradient passes, so load from other processes hits both alike
        entry["d_over_c_interleaved"] = _ratio(results["d"].seconds, d["fused_seconds"] + other)
        entry["d_breakdown"] = {
            "fused_passes_seconds": d["fused_seconds"],
            "gradient_forward_seconds": d["grad_forward_seconds"],
            "gradient_backward_seconds": d["grad_backward_seconds"],
            "gradient_seconds": d["grad_forward_seconds"] + d["grad_backward_seconds"],
            "regular_update_passes": d["regular_update_passes"],
            "regular_update_seconds": d["regular_update_seconds"],
            "refinement_passes": d["refinement_passes"],
            "refinement_seconds": d["refinement_seconds"],
            "other_seconds": other,
        }
    if "b" in results and "d" in results:
        # like for like: (b) and (d) ran the same number of gradient passes (d at the shipped fixed count)
        b_passes, d_passes = results["b"].extra["backward_passes"], results["d"].extra["gradient_passes"]
        entry["b_over_d_same_passes"] = entry["b_over_d_median"] if b_passes == d_passes else None
        entry["gradient_passes_b_d"] = [b_passes, d_passes]
    entry["targets"] = {
        "d_over_c_median<=1.5": _at_most(entry["d_over_c_median"], 1.5),
        "b_over_d_same_passes>=2.5": None if entry.get("b_over_d_same_passes") is None
        else entry["b_over_d_same_passes"] >= 2.5,
        "mem_over_start_d_over_a<=1.5": _at_most(entry.get("mem_over_start_d_over_a"), 1.5),
    }
    return entry


def _at_most(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def _warmup(opts: BenchOptions, setup: Setup, log: Callable[[str], None]) -> None:
    """One short untimed run of each code path, so lazy initialisation lands nowhere."""
    start = time.perf_counter()
    short = dataclasses.replace(opts, steps=2, refine_iterations=1)
    n = min(opts.loras)
    with _autocast(opts):
        generate(setup.model, prompt_for(n), NEGATIVE, **_common(short, n))
        generate(setup.model, prompt_for(n), NEGATIVE, concepts=setup.concepts(n),
                 settings=_engine_settings(short), **_common(short, n))
    log(f"warm-up {time.perf_counter() - start:.1f} s")


def probe(opts: BenchOptions, setup: Setup) -> float:
    """The machine's speed right now: the faster of two plain batch-2 UNet calls (no LoRA).

    On a shared machine a neighbour's load slows this memory-bound workload without taking
    our CPU time (shared cache and memory bandwidth); a probe before and after every
    configuration shows it, and the probe-normalised ratios divide it out.
    """
    unet = setup.model.unet
    dtype = next(unet.parameters()).dtype
    x = torch.randn(2, 4, opts.latent, opts.latent, generator=torch.Generator().manual_seed(1)).to(setup.device)
    context = torch.randn(2, 77, tiny_sd.DEFAULT_CONTEXT_DIM[opts.model], generator=torch.Generator().manual_seed(2))
    context = context.to(setup.device, dtype)
    t = torch.full((2,), 500.0, device=setup.device)
    times = []
    with torch.no_grad(), _autocast(opts):
        for _ in range(2):
            if setup.device.type == "cuda":
                torch.cuda.synchronize(setup.device)
            start = time.perf_counter()
            unet(x, t, context=context)
            if setup.device.type == "cuda":
                torch.cuda.synchronize(setup.device)
            times.append(time.perf_counter() - start)
    return min(times)


def run_benchmark(opts: BenchOptions, log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run every requested configuration for every LoRA count; results keyed by the count as a string."""
    opts.validate()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.set_flush_denormal(True)
    machine = machine_info(opts)
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="clora-bench-") as workdir:
        setup = build_setup(opts, workdir)
        log(f"model {opts.model} built with {max(opts.loras)} LoRAs in {setup.build_seconds:.1f} s "
            f"({sum(p.numel() for p in setup.model.unet.parameters()) / 1e6:.0f}M UNet parameters)")
        with fast_attention(setup.model.unet):
            if opts.warmup:
                _warmup(opts, setup, log)
            for n in opts.loras:
                configs = [c for c in "abcd" if c in opts.configs]
                if "b" in configs and n > opts.b_max_loras:
                    log(f"{n} LoRAs: (b) skipped (above --b-max-loras {opts.b_max_loras})")
                    configs.remove("b")
                rounds: dict[str, list[Measured]] = {c: [] for c in configs}
                for r in range(opts.rounds):  # interleaved: a b c d, a b c d, ...
                    for c in configs:
                        probe_before = probe(opts, setup) if opts.probe else None
                        if c == "a":
                            m = run_a(opts, setup, n)
                        elif c == "b":
                            m = run_b(opts, setup, n)
                        else:
                            m = run_cd(opts, setup, n, update=(c == "d"))
                        if opts.probe:
                            m.extra["probe_seconds"] = [probe_before, probe(opts, setup)]
                        rounds[c].append(m)
                        log(f"{n} LoRAs, round {r + 1}/{opts.rounds}, ({c}) {CONFIG_NAMES[c]}: {m.seconds:.1f} s "
                            f"(CPU {m.cpu_seconds:.1f} s), peak {m.peak_bytes / MiB:.0f} MiB "
                            f"(+{max(0, m.peak_bytes - m.before_bytes) / MiB:.0f})")
                        if not bool(torch.isfinite(m.latent).all()):
                            log(f"warning: ({c}) produced a non-finite latent")
                out[str(n)] = summarise(n, rounds, opts, machine)
    return out


# -- presentation ----------------------------------------------------------------------------------


def _f(v: Any, fmt: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, fmt)


def _probes(p: Sequence[float | None] | None) -> str:
    if not p:
        return "–"
    return " / ".join(_f(v) for v in p)


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: per-configuration numbers, then the ratios, then (d)'s time split."""
    lines = [
        "| LoRAs | config | s / image (median) | CPU s (median) | probe s (before / after) | peak MiB | peak over start MiB "
        "| UNet rows (fused / grad) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for key, entry in results.items():
        for c, r in entry["configs"].items():
            if c == "a":
                rows = f"{r['unet_rows']}"
            elif c == "b":
                rows = f"{r['unet_calls']} batch-2 calls, {r['backward_passes']} backward"
            else:
                rows = f"{r['fused_rows']} / {r['gradient_rows']}"
            lines.append(
                f"| {key} | ({c}) {r['name']} | {_f(r['seconds'], '.1f')} | {_f(r['cpu_seconds'], '.1f')} | "
                f"{_probes(r.get('probe_seconds'))} | "
                f"{_f(r['peak_mib'], '.0f')} | {_f(r['peak_over_start_mib'], '.0f')} | {rows} |"
            )
    lines += [
        "",
        "Ratios: medians over the rounds of each round's ratio (CPU time beside wall time).",
        "",
        "| LoRAs | rounds | d/c | d/a | b/d (same gradient passes) | CPU d/c, d/a, b/d | mem over start d/a "
        "(with a's merge backup) | d/c interleaved | gradient passes b / d |",
        "|---|---:|---:|---:|---:|---|---|---:|---|",
    ]
    for key, e in results.items():
        passes = " / ".join(str(v) for v in e["gradient_passes_b_d"]) if "gradient_passes_b_d" in e else (
            f"– / {e['d_gradient_passes']}" if "d_gradient_passes" in e else "–")
        same = e.get("b_over_d_same_passes")
        b_d = _f(same) if same is not None else (f"{_f(e.get('b_over_d_median'))} (passes differ)"
                                                 if e.get("b_over_d_median") is not None else "–")
        lines.append(
            f"| {key} | {e.get('rounds', 1)} | {_f(e.get('d_over_c_median'))} | {_f(e.get('d_over_a_median'))} | {b_d} | "
            f"{_f(e.get('cpu_d_over_c_median'))}, {_f(e.get('cpu_d_over_a_median'))}, {_f(e.get('cpu_b_over_d_median'))} | "
            f"{_f(e.get('mem_over_start_d_over_a'))} ({_f(e.get('mem_over_start_d_over_a_with_merge_backup'))}) | "
            f"{_f(e.get('d_over_c_interleaved'))} | {passes} |"
        )
    split = [(k, e["d_breakdown"]) for k, e in results.items() if "d_breakdown" in e]
    if split:
        lines += [
            "",
            "| LoRAs | (d) fused passes s | gradient forward s | gradient backward s | regular updates: passes, s "
            "| refinement: passes, s | other s |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for key, b in split:
            lines.append(
                f"| {key} | {_f(b['fused_passes_seconds'], '.1f')} | {_f(b['gradient_forward_seconds'], '.1f')} | "
                f"{_f(b['gradient_backward_seconds'], '.1f')} | "
                f"{b['regular_update_passes']}, {_f(b['regular_update_seconds'], '.1f')} | "
                f"{b['refinement_passes']}, {_f(b['refinement_seconds'], '.1f')} | "
                f"{_f(b['other_seconds'], '.1f')} |"
            )
    refs = [(k, e["configs"]["b"]) for k, e in results.items() if "b" in e["configs"]]
    if refs:
        lines += [
            "",
            "| LoRAs | (b) forward s | backward s | of which refinement s | batch-2 UNet calls | backward passes |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for key, r in refs:
            lines.append(
                f"| {key} | {_f(r['forward_seconds'], '.1f')} | {_f(r['backward_seconds'], '.1f')} | "
                f"{_f(r['refine_seconds'], '.1f')} | {r['unet_calls']} | {r['backward_passes']} |"
            )
    return "\n".join(lines)
