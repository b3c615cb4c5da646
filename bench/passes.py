"""Per-pass cost micro-benchmark: where does (d)'s time go, and what would alternatives cost?

``.venv/bin/python -m bench.passes [--model sd15-full] [--latent 16] [--loras 2] [--repeat 3]``

Median wall time (and CPU time) of single UNet passes on one latent, with the
benchmark's fast attention:

* ``plain2``: a plain batch-2 call (cond + uncond, no LoRA): configuration (a)'s step;
* ``fused``: the engine's fused pass over all 2(K+1) rows (routing + capture): (c)'s step;
* ``grad``: the engine's gradient pass over the K+1 cond rows (forward stopped after
  the last H/32 layer, backward to the latent): one (d) update iteration;
* ``grad_nostop``: the same without the early stop (what the stop saves);
* ``grad_functional``: the gradient pass as the Forge hosts run it (``functional_gradient``:
  ``torch.func.vjp`` of the functionalised forward, inside inference mode, no autograd graph
  on the weights), against ``grad`` (autograd, A1111);
* ``fused_grad``: an alternative: the fused pass itself run with autograd, cond-row maps
  captured with a graph, and the gradient taken from it (the reference's stale
  prediction, which would make a separate gradient pass unnecessary at update steps
  that do not refine);
* ``routing_setup``: installing and removing one fused pass's routing hooks, without
  running the model (what a routing table cached per row layout would save per call);
* ``reference_round``: one refinement iteration of configuration (b): K+1 sequential
  batch-2 calls with explicit attention everywhere and autograd, then the backward;
  ``reference_forward``: the same without the backward (b's non-update step);
* per-block forward time of a gradient pass (which blocks the truncated forward runs);
* ``peak_above_start_mib``: the peak memory of one call of ``fused``, ``grad`` and
  ``grad_functional`` above the level before it (``bench.memory``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch

from clora_ext.attention import CaptureRequest, map_size
from clora_ext.engine import CLoRAEngine, EngineSettings, RowLayout, gradient_ready
from clora_ext.devtools.pipeline import UNetRows, VariantConds, prepare_clora

from clora_ext.loss import contrastive_loss
from clora_ext.routing import Route, RowRouter

from .attention import MapRecorder, explicit_attention, fast_attention
from .memory import PeakMemory
from .reference import reference_forward
from .run import NEGATIVE, BenchOptions, build_setup, prompt_for


def _round_robin(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, dict[str, float]]:
    """Time every candidate ``repeat`` times, interleaved (so load from other processes spreads
    over all of them), after one untimed call each. The minimum is the least disturbed run."""
    for fn in fns.values():
        fn()
    walls: dict[str, list[float]] = {k: [] for k in fns}
    cpus: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            walls[name].append(time.perf_counter() - w)
            cpus[name].append(time.process_time() - c)
    return {
        k: {
            "wall_min": min(walls[k]),
            "wall_median": statistics.median(walls[k]),
            "cpu_min": min(cpus[k]),
            "cpu_median": statistics.median(cpus[k]),
        }
        for k in fns
    }


def pass_inputs(setup: Any, n: int, latent: int) -> tuple[VariantConds, list, list, torch.Tensor, torch.Tensor, UNetRows]:
    """What one pass of ``n`` LoRAs is timed on: the variants' conds, UNet LoRA lists and token maps of the
    benchmark's prompt, a seeded latent of side ``latent``, the timestep and a row model over the UNet."""
    conds, unet_loras, token_maps = prepare_clora(setup.model, prompt_for(n), NEGATIVE, setup.concepts(n))
    x = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    return conds, unet_loras, token_maps, x, t, UNetRows(setup.model.unet, conds, t, 0.1)


def reference_pass(unet: torch.nn.Module, conds: VariantConds, unet_loras: list, token_maps: list, x: torch.Tensor,
                   t: torch.Tensor, hw: tuple[int, int]) -> Callable[[bool], None]:
    """One round of configuration (b) at latent ``x``: its K+1 sequential batch-2 calls with explicit
    attention and a graph, then (``backward``) the gradient of the contrastive loss."""
    recorder = MapRecorder(map_size(hw)[0] * map_size(hw)[1])
    router = RowRouter(unet)
    routes = [[Route(u.deltas, [0, 1], u.multiplier, u.name) for u in uses] for uses in unet_loras]
    contexts = [torch.stack([conds.cond[v], conds.uncond[v]]) for v in range(len(unet_loras))]
    labels = torch.tensor([s.concept for s in token_maps])

    def reference(backward: bool) -> None:
        with explicit_attention(unet, recorder), gradient_ready(unet), torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            _, maps = reference_forward(unet, recorder, router, routes, contexts, leaf, t, 0.1, token_maps, map_size(hw))
            if backward:
                torch.autograd.grad(contrastive_loss(maps, labels), leaf)

    return reference


def measure(opts: BenchOptions, n: int, repeat: int, log=print) -> dict[str, object]:
    import tempfile

    with tempfile.TemporaryDirectory() as workdir:
        setup = build_setup(BenchOptions(**{**opts.__dict__, "loras": (n,)}), workdir)
    unet = setup.model.unet
    conds, unet_loras, token_maps, x, t, row_model = pass_inputs(setup, n, opts.latent)
    hw = (opts.latent, opts.latent)

    out: dict[str, object] = {"latent": opts.latent, "loras": n, "variants": len(unet_loras)}
    from clora_ext.records import StepRecord

    with fast_attention(unet), CLoRAEngine(unet, unet_loras, token_maps, EngineSettings()) as engine:
        V = engine.n_variants
        ctx2 = torch.stack([conds.cond[0], conds.uncond[0]])
        plainV = RowLayout.build(1, V, with_uncond=True)

        @torch.no_grad()
        def plain2():
            unet(x.expand(2, -1, -1, -1) * 0.1, t.expand(2), context=ctx2)

        @torch.no_grad()
        def plain_all_rows_no_routing():
            row_model(x.index_select(0, plainV.image), plainV)

        @torch.no_grad()
        def fused():
            engine._fused_pass(x, 0, 20, row_model, StepRecord(0))

        # gradient pass, forward and backward separately (the engine's own path, timed via the row model)
        split = {"forward": [], "backward": []}

        def timed_model(x_rows, layout):
            start = time.perf_counter()
            try:
                return row_model(x_rows, layout)
            finally:
                end = time.perf_counter()
                split["forward"].append(end - start)
                x_rows.register_hook(lambda g: split["backward"].append(time.perf_counter() - end))

        def grad():
            engine.loss_and_gradient(x, timed_model)

        def grad_functional():
            engine.functional_gradient = True
            try:
                with torch.inference_mode():
                    engine.loss_and_gradient(x, row_model)
            finally:
                engine.functional_gradient = False

        cond_rows = RowLayout.build(1, V, with_uncond=False)
        all_rows = RowLayout.build(1, V, with_uncond=True)

        def custom_gradient(layout: RowLayout, stop_early: bool) -> None:
            with torch.enable_grad(), gradient_ready(unet):
                leaf = x.detach().requires_grad_(True)
                base = engine._request(cond_rows, x, grad=True)
                request = CaptureRequest(base.rows, base.cols, map_size(hw), grad=True, stop_early=stop_early)
                with engine.router.routed(engine._routes(layout), len(layout)), engine.capture.capturing(request):
                    row_model(leaf.index_select(0, layout.image), layout)
                maps = engine.capture.maps().reshape(1, len(token_maps), *request.map_hw)
                loss = engine._image_losses(maps).sum()
                torch.autograd.grad(loss, leaf)

        def routing_setup() -> None:
            """What caching the routing per row layout could save: set-up and removal of one fused pass's hooks."""
            with engine.router.routed(engine._routes(all_rows), len(all_rows)):
                pass

        reference = reference_pass(unet, conds, unet_loras, token_maps, x, t, hw)

        out.update(
            _round_robin(
                {
                    "reference_forward": lambda: reference(False),
                    "reference_round": lambda: reference(True),
                    "plain2": plain2,
                    "plain_all_rows_no_routing": plain_all_rows_no_routing,
                    "fused": fused,
                    "grad": grad,
                    "grad_functional": grad_functional,
                    "grad_nostop": lambda: custom_gradient(cond_rows, False),
                    "fused_grad": lambda: custom_gradient(all_rows, False),
                    "routing_setup": routing_setup,
                },
                repeat,
            )
        )
        peaks = {}
        for name, fn in {"fused": fused, "grad": lambda: engine.loss_and_gradient(x, row_model),
                         "grad_functional": grad_functional}.items():
            with PeakMemory("cpu") as meter:
                fn()
            peaks[name] = round(meter.reading.delta_bytes / 2**20, 1)
        out["peak_above_start_mib"] = peaks
        out["grad_forward_min"] = min(split["forward"])
        out["grad_backward_min"] = min(split["backward"])

        # per-block forward time of one gradient pass
        blocks = [(f"input_blocks.{i}", b) for i, b in enumerate(unet.input_blocks)]
        blocks += [("middle_block", unet.middle_block)]
        blocks += [(f"output_blocks.{i}", b) for i, b in enumerate(unet.output_blocks)]
        spent: dict[str, float] = {}
        handles = []
        for name, block in blocks:
            handles.append(block.register_forward_pre_hook(lambda m, a, name=name: spent.__setitem__(name, -time.perf_counter())))
            handles.append(block.register_forward_hook(
                lambda m, a, o, name=name: spent.__setitem__(name, spent[name] + time.perf_counter())))
        try:
            engine.loss_and_gradient(x, row_model)
            grad_blocks = dict(spent)
            spent.clear()
            with torch.no_grad():
                engine._fused_pass(x, 0, 20, row_model, StepRecord(0))
            fused_blocks = dict(spent)
        finally:
            for h in handles:
                h.remove()
        out["grad_forward_blocks"] = {k: round(v, 4) for k, v in grad_blocks.items() if v > 0}
        out["fused_forward_blocks"] = {k: round(v, 4) for k, v in fused_blocks.items()}
        out["grad_forward_blocks_run"] = sorted(grad_blocks, key=lambda k: list(dict(blocks)).index(k))[-1]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.passes", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd15-full", choices=["sd15-full", "sd15"])
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--loras", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    opts = BenchOptions(model=args.model, latent=args.latent, rank=args.rank, loras=(args.loras,))
    result = measure(opts, args.loras, args.repeat)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
