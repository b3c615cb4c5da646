"""Neo's sampling function, as the glue relies on it (written for these tests).

The CFG denoiser hands it the sampler's x (the very object, outside inpainting). It
1. runs the UnetPatcher's ``conditioning_modifiers`` with
   ``(model, x, timestep, uncond, cond, cond_scale, model_options, seed)``;
2. batches the conds (``model_conds``: ``c_crossattn``, and SDXL's vector as ``y``, from the
   host's dict conds): cond and uncond of the same token length run in one call, uncond
   first (``cond_or_uncond == [1, 0]``); otherwise cond, then uncond, in calls of their
   own; no uncond at CFG scale 1;
3. calls ``model_options["model_function_wrapper"](model.apply_model, {"input", "timestep",
   "c", "cond_or_uncond"})`` where set (else ``apply_model``), and
4. combines the outputs with CFG.

An AND prompt gives ``cond`` one entry per sub-prompt position (the rows of that sub-prompt for
every image, with its weight as ``strength``), as Neo's ``compile_weighted_conditions`` does; the
weighted sum of their predictions is the cond prediction.
"""

from __future__ import annotations

import math

import torch

COND, UNCOND = 0, 1


def _conds(cond: torch.Tensor | dict) -> list[dict]:
    if isinstance(cond, dict):  # SDXL
        return [{"model_conds": {"c_crossattn": cond["crossattn"], "y": cond["vector"]}}]
    return [{"model_conds": {"c_crossattn": cond}}]


def _weighted_conds(cond: torch.Tensor | dict, conds_list: list) -> list[dict]:
    (whole,) = _conds(cond)
    return [{"model_conds": {key: rows[[i for i, _ in position]] for key, rows in whole["model_conds"].items()},
             "strength": position[0][1]}
            for position in zip(*conds_list)]


def calc_cond_uncond_batch(model, cond, uncond, x, timestep, model_options):
    """(the cond prediction: the ``strength``-weighted sum over ``cond``'s entries, the uncond one)."""
    to_run = [(c, (COND, k)) for k, c in enumerate(cond)] + ([(u, UNCOND) for u in uncond] if uncond is not None else [])
    out = {UNCOND: None}
    while to_run:
        first = to_run[0][0]["model_conds"]["c_crossattn"]
        batch = [i for i, (c, _) in enumerate(to_run) if c["model_conds"]["c_crossattn"].shape == first.shape]
        batch.reverse()  # Neo's order: the last that fits first (uncond before cond)
        picked = [to_run[i] for i in batch]
        for i in batch:
            to_run.pop(i)
        kinds = [kind for _, kind in picked]
        chunks = [UNCOND if kind == UNCOND else COND for kind in kinds]
        transformer_options = dict(model_options.get("transformer_options", {}))
        transformer_options["cond_or_uncond"] = chunks[:]
        transformer_options["sigmas"] = timestep
        c = {key: torch.cat([entry["model_conds"][key] for entry, _ in picked]) for key in picked[0][0]["model_conds"]}
        c["transformer_options"] = transformer_options
        input_x = torch.cat([x] * len(chunks))
        timestep_ = torch.cat([timestep] * len(chunks))
        if "model_function_wrapper" in model_options:
            output = model_options["model_function_wrapper"](model.apply_model, {
                "input": input_x, "timestep": timestep_, "c": c, "cond_or_uncond": chunks})
        else:
            output = model.apply_model(input_x, timestep_, **c)
        for kind, rows in zip(kinds, output.chunk(len(chunks))):
            out[kind] = rows
    cond_pred = sum(out[(COND, k)] * c.get("strength", 1.0) for k, c in enumerate(cond))
    return cond_pred, out[UNCOND]


def sampling_function(denoiser, x, timestep, cond_tensor, uncond_tensor, cond_scale, sampling_sigmas, conds_list):
    from modules import shared

    unet_patcher = shared.sd_model.forge_objects.unet
    model = unet_patcher.model
    model_options = dict(unet_patcher.model_options)
    model_options["transformer_options"] = {**model_options.get("transformer_options", {}),
                                            "sampling_sigmas": sampling_sigmas}
    cond, uncond = _weighted_conds(cond_tensor, conds_list), _conds(uncond_tensor)
    seed = denoiser.p.seed
    for modifier in model_options.get("conditioning_modifiers", []):
        model, x, timestep, uncond, cond, cond_scale, model_options, seed = modifier(
            model, x, timestep, uncond, cond, cond_scale, model_options, seed)
    uncond_ = None if math.isclose(cond_scale, 1.0) else uncond
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)
    if uncond_pred is None:
        return cond_pred
    return uncond_pred + (cond_pred - uncond_pred) * cond_scale
