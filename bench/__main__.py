"""Command line: ``.venv/bin/python -m bench [--quick | --paper] [options]``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from .geometry import format_per_pass, run_per_pass
from .run import BenchOptions, format_table, paper_options, quick_options, run_benchmark


def _tolerance(text: str) -> float | None:
    return None if text.lower() in ("none", "fixed", "off") else float(text)


def parse_args(argv: list[str] | None = None) -> BenchOptions:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="CLoRA cost benchmark: (a) plain merged-LoRA generation, (b) the reference's cost "
        "structure, (c) fusion only, (d) our CLoRA; one process, same model/sampler/seed/size.",
    )
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="tiny test model (a few seconds per configuration)")
    preset.add_argument("--paper", action="store_true", help="unscaled 50-step paper schedule, 2 LoRAs")
    p.add_argument("--model", choices=["sd15-full", "sd15"], help="UNet: full SD1.5 shape (default) or tiny")
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--dtype", choices=["fp32", "fp16"], help="fp16 needs cuda (the GPU run: --latent 64)")
    p.add_argument("--latent", type=int, help="latent side, image side / 8 (default 16)")
    p.add_argument("--steps", type=int, help="sampling steps (default 20; --paper 50)")
    p.add_argument("--loras", help="comma-separated LoRA counts (default 2,8; --paper 2)")
    p.add_argument("--configs", help="subset of abcd (default abcd)")
    p.add_argument("--b-max-loras", type=int, help="skip (b) above this LoRA count (default 2)")
    p.add_argument("--refine-iterations", type=int, help="refine count (default: the shipped 5; the paper: 20)")
    p.add_argument("--rounds", type=int, help="interleaved rounds of all configurations (default 3)")
    p.add_argument("--max-rows", type=int, help="(c), (d): the most UNet rows one call may take (default: no cap)")
    p.add_argument("--refine-tolerance", type=_tolerance, default=argparse.SUPPRESS,
                   help="(d) early-stop tolerance; 'none' = the paper's fixed count (the default)")
    p.add_argument("--rank", type=int, help="LoRA rank (default 16; --quick 4)")
    p.add_argument("--seed", type=int)
    p.add_argument("--cfg-scale", type=float)
    p.add_argument("--threads", type=int, help="torch threads (default 1; 0 = leave torch's default)")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--no-probe", action="store_true", help="skip the speed probes around each configuration")
    p.add_argument("--per-pass", action="store_true",
                   help="CPU only: ratios from per-pass costs and the schedule's pass counts (bench.geometry), "
                        "for geometries whose whole generations take hours on a CPU (--latent 64)")
    p.add_argument("--check-steps", type=int, default=4,
                   help="--per-pass: steps of the whole generation of (a) and (d) that checks the estimate (0: none)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON, keyed by LoRA count")
    args = p.parse_args(argv)

    opts = quick_options() if args.quick else paper_options() if args.paper else BenchOptions()
    overrides = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "latent": args.latent,
        "steps": args.steps,
        "loras": tuple(int(x) for x in args.loras.split(",")) if args.loras else None,
        "configs": args.configs,
        "b_max_loras": args.b_max_loras,
        "refine_iterations": args.refine_iterations,
        "rounds": args.rounds,
        "max_rows": args.max_rows,
        "rank": args.rank,
        "seed": args.seed,
        "cfg_scale": args.cfg_scale,
        "threads": args.threads,
    }
    opts = dataclasses.replace(opts, **{k: v for k, v in overrides.items() if v is not None})
    if hasattr(args, "refine_tolerance"):
        opts = dataclasses.replace(opts, refine_tolerance=args.refine_tolerance)
    if args.no_warmup:
        opts = dataclasses.replace(opts, warmup=False)
    if args.no_probe:
        opts = dataclasses.replace(opts, probe=False)
    if opts.threads == 0:
        opts = dataclasses.replace(opts, threads=None)
    opts.json_path = args.json  # type: ignore[attr-defined]
    opts.per_pass = args.per_pass  # type: ignore[attr-defined]
    opts.check_steps = args.check_steps  # type: ignore[attr-defined]
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    json_path = getattr(opts, "json_path", None)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", file=sys.stderr, flush=True)

    if getattr(opts, "per_pass", False):
        results = run_per_pass(opts, log, check_steps=opts.check_steps)  # type: ignore[attr-defined]
        print(format_per_pass(results))
    else:
        results = run_benchmark(opts, log)
        print(format_table(results))
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
        log(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
