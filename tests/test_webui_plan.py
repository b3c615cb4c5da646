"""The glue's pure planning: variant encoding plan, proxy row layout, token maps per segment, padding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from clora_ext.webui.plan import (
    ChunkedTokenizer,
    CLoRARuntimeError,
    FusedProxy,
    ProxyRows,
    check_single_conds,
    condition_parts,
    group_images,
    make_condition,
    pick_segment,
    plan_variants,
    token_map_schedule,
)
from clora_ext.concepts import Composition, Concept, PhraseNotFound, Role
from clora_ext.devtools.tiny_sd import BOS, EOS
from clora_ext.engine import RowLayout

CAT = Concept("cat", "cat_lora", weight=0.9, te_weight=0.7, trigger="sks")
DOG = Concept("dog", "dog_lora", weight=1.1, te_weight=0.0)
INK = Concept("", "ink", weight=0.5, te_weight=0.5, trigger="ink style", role=Role.STYLE)


# -- variant encoding plan -----------------------------------------------------------------------


def test_plan_encodes_each_variant_once_for_the_whole_batch():
    comp = Composition.from_concepts([CAT, DOG])
    plan = plan_variants(comp, ["a cat and a dog"] * 3, ["blurry"] * 3)
    assert plan.n_variants == 3
    assert [v.prompt for v in plan.variants[2]] == ["a cat and a dog", "a sks cat and a dog", "a cat and a dog"]
    # cond: V0 bare, V1 with the cat TE LoRA; V2 has te_weight 0, so it is V0's encoding
    texts = {(j.text, j.negative, j.loras) for j in plan.jobs}
    assert texts == {
        ("a cat and a dog", False, ()),
        ("a sks cat and a dog", False, (("cat_lora", 0.7),)),
        ("blurry", True, ()),
        ("blurry", True, (("cat_lora", 0.7),)),
    }
    assert len(plan.jobs) == 4
    assert plan.cond_job[0] == plan.cond_job[2] and plan.cond_job[0][0] == plan.cond_job[0][2]
    assert plan.uncond_job[1][1] != plan.uncond_job[1][0]  # each variant's negative under its own LoRA set
    assert plan.unet_loras == [(), (("cat_lora", 0.9),), (("dog_lora", 1.1),)]
    groups = plan.jobs_by_lora_set()
    assert sorted(len(v) for v in groups.values()) == [1, 1, 1, 1]


def test_plan_per_image_prompts_and_global_style():
    comp = Composition.from_concepts([CAT, DOG, INK])
    plan = plan_variants(comp, ["a cat and a dog", "a dog chasing a cat"], ["", "ugly"])
    assert plan.variants[1][1].prompt == "a dog chasing a sks cat, ink style"
    assert all(("ink", 0.5) in loras for loras in plan.unet_loras)
    assert plan.cond_job[0][1] != plan.cond_job[1][1]
    assert plan.jobs[plan.uncond_job[1][0]].text == "ugly"


def test_plan_reports_a_missing_subject():
    comp = Composition.from_concepts([CAT, DOG])
    with pytest.raises(PhraseNotFound, match="'dog'"):
        plan_variants(comp, ["a cat and a dog", "a cat alone"], ["", ""])


def test_and_prompts_are_refused():
    check_single_conds([1, 1, 1])
    with pytest.raises(CLoRARuntimeError, match="AND"):
        check_single_conds([1, 2])


# -- proxy row layout ------------------------------------------------------------------------------


def _tag(uncond: int, variant: int, image: int) -> float:
    return 1000.0 * uncond + 100.0 * variant + image


@pytest.mark.parametrize("images", [1, 3])
@pytest.mark.parametrize("loras", [2, 4])
def test_rows_expand_into_variants_and_fuse_back_to_the_host_order(images, loras):
    variants = loras + 1
    rows = ProxyRows(images, variants)
    layout = RowLayout.build(images, variants, with_uncond=True)
    assert len(layout) == 2 * images * variants
    # the conditioning table is stacked (uncond, variant, image); each engine row finds its own cond
    table = torch.tensor([_tag(u, v, b) for u in (0, 1) for v in range(variants) for b in range(images)])
    got = table.index_select(0, rows.table_index(layout))
    want = torch.tensor([_tag(int(u), int(v), int(b)) for u, v, b in zip(layout.uncond, layout.variant, layout.image)])
    assert torch.equal(got, want)
    # the engine's prediction per row, fused per image and half as the engine does it (mean as a stand-in)
    per_row = got[:, None].float()
    per_image = per_row.reshape(2, images, variants, 1)
    fused = torch.cat([per_image[0].mean(dim=1), per_image[1].mean(dim=1)])  # (2B, 1)
    mean_variant = 100.0 * (variants - 1) / 2
    host = [(r % images, r >= images) for r in range(2 * images)]
    expected = torch.tensor([[1000.0 * u + mean_variant + b] for b, u in host])
    # one call with every row, or the host's split calls (batch_cond_uncond off), or NGMS (cond rows only)
    for chunks in ([2 * images], [images, images], [images]):
        inner = torch.nn.Module()
        inner.sigmas = "real"
        proxy = FusedProxy(inner, fused, rows)
        served = torch.cat([proxy(torch.zeros(n, 4, 8, 8), torch.zeros(n)) for n in chunks])
        assert torch.allclose(served, expected[: sum(chunks)])
        assert proxy.sigmas == "real"


def test_rows_of_an_image_group_address_the_whole_batch_table():
    rows = ProxyRows(images=3, variants=2)
    ids = torch.tensor([2, 0])  # a group: batch images 2 and 0
    layout = RowLayout.build(2, 2, with_uncond=True)
    index = rows.table_index(layout, ids)
    expected = [(int(u) * 2 + int(v)) * 3 + int(ids[b]) for u, v, b in zip(layout.uncond, layout.variant, layout.image)]
    assert index.tolist() == expected


def test_proxy_refuses_more_rows_than_prepared():
    proxy = FusedProxy(torch.nn.Module(), torch.zeros(2, 1), ProxyRows(1, 3))
    proxy(torch.zeros(2, 1), torch.zeros(2))
    with pytest.raises(CLoRARuntimeError, match="another extension"):
        proxy(torch.zeros(1, 1), torch.zeros(1))


def test_group_images():
    assert group_images(["a", "b", "a", "c", "b"]) == [[0, 2], [1, 4], [3]]


# -- token maps --------------------------------------------------------------------------------------


class FakeChunker:
    """The host chunker's behaviour that matters here: BREAK starts a new chunk, 75 tokens per chunk."""

    id_start, id_end = BOS, EOS

    def __init__(self, bpe):
        self.bpe = bpe

    def tokenize(self, texts):
        return [self.bpe.encode(t) for t in texts]

    def tokenize_line(self, line):
        chunks = []
        for part in line.split(" BREAK "):
            ids = self.bpe.encode(part)
            for i in range(0, max(len(ids), 1), 75):
                content = ids[i : i + 75]
                chunks.append(SimpleNamespace(tokens=[BOS, *content] + [EOS] * (76 - len(content))))
        return chunks, sum(len(c.tokens) for c in chunks)


def test_token_positions_follow_the_host_chunks(clip_bpe):
    comp = Composition.from_concepts([CAT, DOG])
    variants = comp.variants("a cat BREAK a dog")
    tok = ChunkedTokenizer(FakeChunker(clip_bpe))
    assert tok.chunks("a cat BREAK a dog") == [clip_bpe.encode("a cat"), clip_bpe.encode("a dog")]
    [(end, specs)] = token_map_schedule(comp, variants, tok, [[(20, v.prompt)] for v in variants])
    assert end == 20
    dog = {(s.variant, s.position) for s in specs if s.concept == 1}
    assert dog == {(0, 79), (1, 79), (2, 79)}  # chunk 1, content token 1 ("a" is 0)
    cat_v1 = sorted(s.position for s in specs if s.concept == 0 and s.variant == 1)
    assert cat_v1 == [2, 3]  # "sks" then "cat"


def test_token_maps_per_prompt_editing_segment(clip_bpe):
    comp = Composition.from_concepts([CAT, DOG])
    variants = comp.variants("a cat and a dog")
    tok = ChunkedTokenizer(FakeChunker(clip_bpe))
    schedules = [
        [(5, v.prompt.replace("a cat", "a cat in a forest")), (10, v.prompt.replace("a cat", "a big cat"))]
        for v in variants
    ]
    segments = token_map_schedule(comp, variants, tok, schedules)
    assert [end for end, _ in segments] == [5, 10]
    cat_v0 = [[s.position for s in specs if s.concept == 0 and s.variant == 0] for _, specs in segments]
    assert cat_v0 == [[2], [3]]  # "big" shifts the subject in the second segment
    assert pick_segment([5, 10], 0) == 0 and pick_segment([5, 10], 5) == 0 and pick_segment([5, 10], 6) == 1
    assert pick_segment([5, 10], 99) == 1


def test_a_subject_edited_away_is_reported_with_its_steps(clip_bpe):
    comp = Composition.from_concepts([CAT, DOG])
    variants = comp.variants("a cat and a dog")
    tok = ChunkedTokenizer(FakeChunker(clip_bpe))
    schedules = [[(4, v.prompt), (10, v.prompt.replace("dog", "fox"))] for v in variants]
    with pytest.raises(CLoRARuntimeError, match=r"'dog' is not in the prompt during steps 5-10"):
        token_map_schedule(comp, variants, tok, schedules)


def test_condition_parts_reads_back_what_make_condition_builds():
    context, vector, image_cond = torch.randn(2, 77, 8), torch.randn(2, 6), torch.zeros(2, 5, 1, 1)
    sd1 = condition_parts(make_condition(context, image_cond))
    assert sd1[0] is context and sd1[1] is None
    sdxl = condition_parts(make_condition({"crossattn": context, "vector": vector}, image_cond))
    assert sdxl[0] is context and sdxl[1] is vector
