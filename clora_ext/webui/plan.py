"""What a CLoRA generation computes before and around each model call (pure: no host imports).

- the variant encoding plan: which texts to encode under which text-encoder LoRA set,
  deduplicated over the batch;
- the row layout that links the host's rows (B cond rows, then B uncond rows) to the
  engine's variant rows and to the conditioning table, the proxy that hands the fused
  rows back to the host, and one fused step over a batch (``fused_step``);
- token maps per prompt-editing segment, following the host's chunking;
"""

from __future__ import annotations

import difflib

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Protocol, Sequence

import torch

from ..concepts import Composition, PhraseNotFound, Variant
from ..conditioning import ConditioningTable
from ..engine import CLoRAEngine, RowLayout, StepOutput, map_structure
from ..tokens import TokenMapSpec, plan_token_maps
from ..update import DDPMSpace, SigmaSpace

LoRASet = tuple  # ((lora name, multiplier), ...)


class CLoRARuntimeError(RuntimeError):
    """A generation CLoRA cannot run as asked; the message says why and what to change."""

    def __init__(self, message: str):
        super().__init__(message)
        self.status_code = 422
        self.detail = message


# -- variant encoding plan -----------------------------------------------------------------


@dataclass(frozen=True)
class EncodeJob:
    """One text to encode with a set of text-encoder LoRAs active."""

    text: str
    negative: bool
    loras: LoRASet  # ((name, te_weight), ...)


@dataclass
class VariantPlan:
    composition: Composition
    variants: list[list[Variant]]  # [image][variant]
    jobs: list[EncodeJob]  # unique, in first-use order
    cond_job: list[list[int]]  # [image][variant] -> index into jobs
    uncond_job: list[list[int]]
    unet_loras: list[LoRASet]  # [variant] -> ((name, unet weight), ...)

    @property
    def n_variants(self) -> int:
        return len(self.unet_loras)

    def jobs_by_lora_set(self) -> dict[tuple[LoRASet, bool], list[int]]:
        """Job indices grouped so each group is one encoder call with one LoRA set."""
        groups: dict[tuple[LoRASet, bool], list[int]] = {}
        for i, job in enumerate(self.jobs):
            groups.setdefault((job.loras, job.negative), []).append(i)
        return groups


def plan_variants(composition: Composition, prompts: Sequence[str], negatives: Sequence[str]) -> VariantPlan:
    """Variant texts per image, and the unique (text, negative, LoRA set) encodings they need.

    Raises PhraseNotFound (a ValueError) naming the subject and the prompt when a
    subject does not occur in an image's prompt.
    """
    if len(prompts) != len(negatives):
        raise ValueError("one negative prompt per prompt is required")
    variants = [composition.variants(p) for p in prompts]
    reference = variants[0]
    unet_loras: list[LoRASet] = []
    te_loras: list[LoRASet] = []
    for v in reference:
        uses = ([composition.content[v.concept]] if v.concept is not None else []) + composition.styles_for_variant(v)
        unet_loras.append(tuple((c.lora, c.weight) for c in uses))
        te_loras.append(tuple((c.lora, c.te_weight) for c in uses if c.te_weight != 0))
    jobs: dict[EncodeJob, int] = {}

    def job(text: str, negative: bool, loras: LoRASet) -> int:
        return jobs.setdefault(EncodeJob(text, negative, loras), len(jobs))

    cond_job = [[job(v.prompt, False, te_loras[v.index]) for v in image] for image in variants]
    uncond_job = [[job(neg, True, te_loras[v.index]) for v in image] for image, neg in zip(variants, negatives)]
    return VariantPlan(composition, variants, list(jobs), cond_job, uncond_job, unet_loras)


# -- rows ------------------------------------------------------------------------------------


def check_single_conds(repeats: Sequence[int]) -> None:
    """The host repeats an image once per AND sub-prompt; CLoRA composes one prompt per image."""
    if any(n != 1 for n in repeats):
        raise CLoRARuntimeError(
            "CLoRA does not support AND-composed prompts; write one prompt per image and map its subjects to LoRAs"
        )


@dataclass(frozen=True)
class ProxyRows:
    """The rows of one model call, seen from the host and from the engine.

    Host: ``images`` cond rows (image order), then ``images`` uncond rows (absent when
    the host skips uncond at a step). Engine: every image expands into ``variants``
    rows per half (``RowLayout.build``: cond half first, image-major), whose conds
    come from a table stacked as (uncond, variant, image). The engine fuses its rows
    back to one cond and one uncond row per image, stacked [cond rows; uncond rows]:
    exactly the host's order, so host row r is fused row r.
    """

    images: int
    variants: int

    def table_index(self, layout: RowLayout, image_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Row of each engine row in the conditioning table; ``image_ids`` maps a group's images to the batch's."""
        return torch.tensor(self.table_rows(layout, image_ids), dtype=torch.long, device=layout.image.device)

    def table_rows(self, layout: RowLayout, image_ids: torch.Tensor | None = None) -> list[int]:
        """``table_index`` as a list, computed in Python from the layout's values: inside a
        ``torch.func`` gradient pass, tensors made there cannot be read back (``tolist``)."""
        ids = None if image_ids is None else image_ids.tolist()
        return [(int(u) * self.variants + v) * self.images + (i if ids is None else ids[i])
                for i, v, u in zip(layout.image.tolist(), layout.variant.tolist(), layout.uncond.tolist())]

    def serve(self, start: int, count: int) -> torch.Tensor:
        """Fused rows for the host rows ``start .. start+count`` of one forward."""
        if start + count > 2 * self.images:
            raise CLoRARuntimeError(
                f"CLoRA: the host asked for {start + count} rows for {self.images} images; "
                "another extension changes the batch"
            )
        return torch.arange(start, start + count)


class FusedProxy(torch.nn.Module):
    """Stands in for the denoiser's inner model during one forward: serves the fused rows.

    The host may call it once for all rows or several times for consecutive ranges
    (``batch_cond_uncond`` off, uneven cond/uncond lengths, NGMS dropping uncond).
    A module, because the host keeps its inner model as a child module.
    """

    def __init__(self, inner: Any, fused: torch.Tensor, rows: ProxyRows):
        super().__init__()
        self.inner = inner
        self._fused = fused
        self._rows = rows
        self._cursor = 0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        count = x.shape[0]
        out = self._fused[self._rows.serve(self._cursor, count).to(self._fused.device)]
        self._cursor += count
        return out.to(x.dtype)

    def __getattr__(self, name: str) -> Any:  # sigmas, inner_model, ... stay the real model's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


def make_condition(context: torch.Tensor | dict, image_cond: torch.Tensor) -> dict:
    """The host's conditioning dict for its (non-unCLIP) models: SD1/2 tensors, SDXL dicts."""
    if isinstance(context, dict):
        return {**context, "c_concat": [image_cond]}
    return {"c_crossattn": [context], "c_concat": [image_cond]}


def condition_parts(condition: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cross-attention context, SDXL's vector or None) of a ``make_condition`` dict, for a host
    whose model takes them as separate arguments (the Forge family's ``c_crossattn`` and ``y``)."""
    if "crossattn" in condition:
        return condition["crossattn"], condition["vector"]
    return condition["c_crossattn"][0], None


@dataclass
class HostRowModel:
    """The engine's row model over the host's inner model, for the images ``ids`` of the batch."""

    inner: Callable[..., torch.Tensor]
    rows: ProxyRows
    table: ConditioningTable
    ids: torch.Tensor
    sigma: torch.Tensor
    image_cond: torch.Tensor

    # index bookkeeping in Python lists: it also runs inside a torch.func gradient pass (Forge hosts)
    def _table_rows(self, layout: RowLayout) -> list[int]:
        return self.rows.table_rows(layout, self.ids)

    def row_groups(self, layout: RowLayout) -> list[torch.Tensor]:
        return [g.to(layout.image.device) for g in self.table.row_groups(self._table_rows(layout))]

    def __call__(self, x_rows: torch.Tensor, layout: RowLayout) -> torch.Tensor:
        ids = self.ids.tolist()
        images = torch.tensor([ids[i] for i in layout.image.tolist()], dtype=torch.long, device=self.sigma.device)
        cond = make_condition(self.table.select(self._table_rows(layout)),
                              self.image_cond.index_select(0, images.to(self.image_cond.device)))
        return self.inner(x_rows, self.sigma.index_select(0, images), cond=cond)


def fused_step(
    engine: CLoRAEngine,
    inner: Callable[..., torch.Tensor],
    rows: ProxyRows,
    x: torch.Tensor,
    sigma: torch.Tensor,
    image_cond: torch.Tensor,
    table: ConditioningTable,
    maps: Sequence[tuple[TokenMapSpec, ...]],
    step: int,
    total: int,
    k_diffusion: bool,
    allow_update: bool,
    on_group: Callable[[list[int], StepOutput], None] | None = None,
    update_region: torch.Tensor | None = None,
) -> torch.Tensor:
    """One CLoRA step for the whole batch; returns the fused [cond rows; uncond rows].

    ``inner(x, sigma, cond=...)`` is the host's inner model (x0 or eps prediction);
    ``table`` holds every (uncond, variant, image) cond row at this step, each at its
    own token length (rows of different lengths are run in separate calls, as the host does); ``maps[b]``
    are image b's token maps. Images whose token maps differ at most in positions share
    one engine step (one batched UNet call); a group that is not the whole batch is updated on a
    copy that is written back into ``x``, so ``x`` is always updated in place.
    ``update_region`` (the host's inpaint mask: 1 where it repaints; one for the batch or
    one per image) confines the latent update.
    """
    fused_cond = fused_uncond = None
    for group in group_images([map_structure(m) for m in maps]):
        ids = torch.tensor(group, device=x.device)
        whole = group == list(range(x.shape[0]))
        xg = x if whole else x.index_select(0, ids)

        row_model = HostRowModel(inner, rows, table, ids, sigma, image_cond)
        space = SigmaSpace(sigma.index_select(0, ids)) if k_diffusion else DDPMSpace()
        region = update_region
        if region is not None:
            region = region.to(x.device, torch.float32)
            if region.dim() == 4 and region.shape[0] > 1:
                region = region.index_select(0, ids)
        out = engine.step(xg, step, total, space, row_model, allow_update=allow_update, update_region=region,
                          group=tuple(group), token_maps=[maps[b] for b in group], batch_images=group)
        if not whole:
            x[ids] = xg
        if fused_cond is None:
            fused_cond = out.cond.new_empty((x.shape[0], *out.cond.shape[1:]))
            fused_uncond = torch.empty_like(fused_cond)
        fused_cond[ids] = out.cond
        fused_uncond[ids] = out.uncond
        if on_group is not None:
            on_group(group, out)
    return torch.cat([fused_cond, fused_uncond])


def group_images(keys: Sequence[Hashable]) -> list[list[int]]:
    """Images with equal keys (e.g. equal token maps), in first-seen order."""
    groups: dict[Hashable, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return list(groups.values())


# -- token maps per prompt-editing segment ------------------------------------------------------


class HostChunker(Protocol):
    """The parts of the host's prompt chunker (sd_hijack_clip) that token positions need."""

    id_start: int
    id_end: int

    def tokenize_line(self, line: str) -> tuple[list[Any], int]: ...

    def tokenize(self, texts: list[str]) -> list[list[int]]: ...


class ChunkedTokenizer:
    """PromptTokenizer over the host's chunker: BREAK, comma backtracking and embeddings included."""

    def __init__(self, chunker: HostChunker):
        self._chunker = chunker
        self._padding = {chunker.id_end, getattr(chunker, "id_pad", chunker.id_end)}

    def chunks(self, text: str) -> list[list[int]]:
        chunks, _ = self._chunker.tokenize_line(text)
        out = []
        for chunk in chunks:
            content = list(chunk.tokens[1:-1])
            while content and content[-1] in self._padding:
                content.pop()
            out.append(content)
        return out


def pick_segment(ends: Sequence[int], step: int) -> int:
    """Index of the schedule entry in force at ``step`` (the host's rule: first end >= step)."""
    for i, end in enumerate(ends):
        if step <= end:
            return i
    return len(ends) - 1


def token_map_schedule(
    composition: Composition,
    variants: Sequence[Variant],
    tokenizer: Any,
    schedules: Sequence[Sequence[tuple[int, str]]],
) -> list[tuple[int, tuple[TokenMapSpec, ...]]]:
    """[(end_at_step, token maps)] for one image; ``schedules[v]`` is variant v's [(end, text)]."""
    ends = sorted({end for schedule in schedules for end, _ in schedule})
    out = []
    start = 0
    for end in ends:
        texts = [schedule[pick_segment([e for e, _ in schedule], end)][1] for schedule in schedules]
        try:
            specs = plan_token_maps(composition, variants, tokenizer, texts)
        except PhraseNotFound as e:
            if len(ends) == 1:
                raise
            raise CLoRARuntimeError(
                f"CLoRA: subject {e.phrase!r} is not in the prompt during steps {start + 1}-{end} "
                f"(prompt editing gives {e.prompt!r} there); every subject must be present in every segment"
            ) from None
        if out and out[-1][1] == tuple(specs):
            out[-1] = (end, out[-1][1])  # same positions: extend the previous segment
        else:
            out.append((end, tuple(specs)))
        start = end
    return out


def suggest_names(name: str, installed: Sequence[str]) -> str:
    """The end of a "not installed" message: the closest installed names, if any are close."""
    if not installed:
        return "no LoRA is installed (models/Lora)"
    close = difflib.get_close_matches(name, installed, n=3, cutoff=0.5)
    close = close or difflib.get_close_matches(name.lower(), [n.lower() for n in installed], n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return f"{len(installed)} LoRAs are installed (see the Lora tab or GET /sdapi/v1/loras)"
