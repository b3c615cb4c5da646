"""The contrastive loss against pytorch-metric-learning, masks and fusion."""

from __future__ import annotations

import pytest
import torch

from clora_ext.loss import concept_overlap, contrastive_loss, minmax_normalise, nt_xent
from clora_ext.masks import MaskOverlap, MaskTokens, MaskUpsampling, Morphology, fuse, mask_sources, morph, resize_masks, variant_masks
from clora_ext.tokens import TokenMapSpec
from tolerance import close


@pytest.mark.parametrize("seed", range(8))
def test_nt_xent_matches_pytorch_metric_learning(seed):
    from pytorch_metric_learning.losses import NTXentLoss

    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(4, 24, (1,), generator=gen))
    concepts = int(torch.randint(2, 5, (1,), generator=gen))
    maps = torch.rand(n, 8, 6, generator=gen) ** 3
    labels = torch.randint(0, concepts, (n,), generator=gen)
    labels[:concepts] = torch.arange(concepts)  # every concept present
    ours = contrastive_loss(maps, labels, tau=0.5)
    oracle = NTXentLoss(temperature=0.5)(minmax_normalise(maps), labels)
    close(ours, oracle, 1e-5)


def test_nt_xent_gradient_matches_oracle():
    from pytorch_metric_learning.losses import NTXentLoss

    gen = torch.Generator().manual_seed(3)
    emb = torch.randn(10, 16, generator=gen)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    a = emb.clone().requires_grad_(True)
    b = emb.clone().requires_grad_(True)
    nt_xent(a, labels, 0.5).backward()
    NTXentLoss(temperature=0.5)(b, labels).backward()
    close(a.grad, b.grad, 1e-5)


def test_loss_degenerate_cases():
    maps = torch.rand(4, 5, 5)
    assert contrastive_loss(maps, torch.zeros(4, dtype=torch.long)) == 0  # no negatives
    assert contrastive_loss(maps, torch.arange(4)) == 0  # no positives
    flat = torch.ones(3, 4, 4)  # constant maps: the epsilon keeps it finite
    assert torch.isfinite(contrastive_loss(flat, torch.tensor([0, 0, 1])))


def test_separated_maps_have_lower_loss_and_overlap():
    left = torch.zeros(8, 8)
    left[:, :4] = 1
    right = 1 - left
    labels = torch.tensor([0, 0, 1, 1])
    separated = torch.stack([left, left, right, right]) + 0.01 * torch.rand(4, 8, 8)
    mixed = torch.stack([left, right, left, right]) + 0.01 * torch.rand(4, 8, 8)
    assert contrastive_loss(separated, labels) < contrastive_loss(mixed, labels)
    assert concept_overlap(separated, labels) < concept_overlap(mixed, labels)


def test_masks_are_row_major_not_transposed():
    h, w = 3, 5
    maps = torch.zeros(2, h, w)
    maps[0, 0, 4] = 1.0  # top-right corner
    maps[1, 2, 0] = 1.0  # bottom-left corner
    masks = variant_masks(maps, mask_for=torch.tensor([1, 2]), n_variants=3, threshold=0.5)
    assert masks.shape == (3, h, w)
    assert masks[1, 0, 4] == 1 and masks[1].sum() == 1
    assert masks[2, 2, 0] == 1 and masks[2].sum() == 1
    assert torch.equal(masks[0], 1 - masks[1] - masks[2])  # background covers the rest
    big = resize_masks(masks, (12, 20))
    assert big.shape == (3, 12, 20)
    assert big[1, :4, 16:].eq(1).all() and big[1].sum() == 16


def test_bilinear_masks_have_soft_edges_and_still_cover_every_pixel():
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(4, 8, 8, generator=gen)
    masks = variant_masks(maps, torch.tensor([1, 1, 2, 2]), 3, threshold=0.6)
    hard = resize_masks(masks, (32, 32))
    soft = resize_masks(masks, (32, 32), MaskUpsampling.BILINEAR)
    assert soft.min() >= 0 and soft.max() <= 1
    assert ((soft > 0) & (soft < 1)).any() and not ((hard > 0) & (hard < 1)).any()
    assert soft.sum(0).min() >= 1 - 1e-6  # fuse never meets an uncovered pixel
    # away from the edges the two agree: the cells' centres (4x4 blocks, centre pixels 1-2)
    centres = soft[:, 1::4, 1::4] + soft[:, 2::4, 2::4]
    inside = (masks == masks.roll(1, -1)) & (masks == masks.roll(-1, -1)) & (masks == masks.roll(1, -2)) & (masks == masks.roll(-1, -2))
    assert torch.equal(((centres / 2)[inside]).round(), masks[inside])
    assert torch.equal(resize_masks(torch.ones(2, 3, 3), (12, 12), "bilinear"), torch.ones(2, 12, 12))


def test_union_over_tokens_and_threshold():
    maps = torch.zeros(3, 4, 4)
    maps[0, 0, 0], maps[0, 0, 1] = 1.0, 0.35
    maps[1, 3, 3] = 0.2  # second token of the same variant, weak in absolute terms
    maps[2, 2, 2] = 1.0  # a token that is not a mask token
    masks = variant_masks(maps, torch.tensor([1, 1, -1]), 2, threshold=0.4)
    # 0.35 < 0.4 * 1.0 is out; the second token counts relative to its own peak
    assert masks[1].nonzero().tolist() == [[0, 0], [3, 3]]


def test_exclusive_overlap_gives_each_pixel_to_the_relatively_strongest_variant():
    maps = torch.zeros(3, 2, 4)
    maps[0, 0] = torch.tensor([1.0, 0.9, 0.5, 0.0])  # variant 1, peak 1.0
    maps[1, 0] = torch.tensor([0.0, 0.8, 2.0, 1.0])  # variant 2, peak 2.0: relative 0, 0.4, 1.0, 0.5
    maps[2, 1] = torch.tensor([0.0, 3.0, 3.0, 0.0])  # variant 2's second word, relative 1.0 on row 1
    mask_for = torch.tensor([1, 2, 2])
    shared = variant_masks(maps, mask_for, 3, threshold=0.4)
    exclusive = variant_masks(maps, mask_for, 3, threshold=0.4, overlap=MaskOverlap.EXCLUSIVE)
    # shared: columns 1 and 2 of row 0 are in both masks
    assert shared[1, 0].tolist() == [1, 1, 1, 0] and shared[2, 0].tolist() == [0, 1, 1, 1]
    # exclusive: column 1 goes to variant 1 (0.9 > 0.4), column 2 to variant 2 (1.0 > 0.5)
    assert exclusive[1, 0].tolist() == [1, 1, 0, 0] and exclusive[2, 0].tolist() == [0, 0, 1, 1]
    assert exclusive[2, 1].tolist() == [0, 1, 1, 0]  # the variant's strongest word counts
    assert torch.equal(exclusive.sum(0), torch.ones(2, 4))  # one owner per pixel, the base where no one
    assert exclusive[0].tolist() == [[0, 0, 0, 0], [1, 0, 0, 1]]
    # below the threshold nothing changes: the masks only lose overlaps
    assert torch.equal(exclusive[1:] <= shared[1:], torch.ones_like(shared[1:], dtype=torch.bool))


def test_overlapping_masks_fuse_to_a_convex_combination():
    preds = torch.stack([torch.full((2, 4, 4), float(v)) for v in (0.0, 10.0, 20.0)])
    masks = torch.zeros(3, 4, 4)
    masks[1, :, :3] = 1
    masks[2, :, 1:] = 1  # columns 1-2 are covered by both
    masks[0] = (masks[1:].sum(0) == 0).float()
    out = fuse(preds, masks)
    weights = masks / masks.sum(0, keepdim=True)
    assert torch.allclose(weights.sum(0), torch.ones(4, 4))  # normalised weights sum to one
    assert torch.allclose(out[:, :, 0], torch.full((2, 4), 10.0))
    assert torch.allclose(out[:, :, 1:3], torch.full((2, 4, 2), 15.0))
    assert torch.allclose(out[:, :, 3], torch.full((2, 4), 20.0))


def test_morphology():
    m = torch.zeros(1, 7, 7)
    m[0, 2:5, 2:5] = 1
    m[0, 0, 6] = 1  # a speck
    assert morph(m, Morphology.ERODE)[0].nonzero().tolist() == [[3, 3]]
    assert morph(m, "dilate")[0, 1:6, 1:6].eq(1).all()
    opened = morph(m, Morphology.OPEN)
    assert opened[0, 0, 6] == 0 and opened[0, 2:5, 2:5].eq(1).all()
    holed = m.clone()
    holed[0, 3, 3] = 0
    assert morph(holed, Morphology.CLOSE)[0, 3, 3] == 1
    assert torch.equal(morph(m, Morphology.NONE), m)


def test_mask_token_rules_pick_the_maps_of_each_variants_mask():
    """Variants: 0 base, 1 (cat, trigger "sks"), 2 (dog). Maps: base cat, base dog; V_1's trigger,
    its cat, its dog; V_2's cat, its dog."""
    specs = [TokenMapSpec(0, 2, 0, False), TokenMapSpec(0, 5, 1, False),
             TokenMapSpec(1, 2, 0, True, trigger=True), TokenMapSpec(1, 3, 0, True), TokenMapSpec(1, 6, 1, False),
             TokenMapSpec(2, 2, 0, False), TokenMapSpec(2, 5, 1, True)]
    rules = {rule: mask_sources(specs, rule).tolist() for rule in MaskTokens}
    assert rules[MaskTokens.PAPER] == [-1, -1, 1, 1, -1, -1, 2]  # own trigger and subject
    assert rules[MaskTokens.SUBJECT] == [-1, -1, -1, 1, -1, -1, 2]  # the trigger left out
    assert rules[MaskTokens.BASE] == [1, 2, -1, -1, -1, -1, -1]  # the base prompt's subject maps
    assert rules[MaskTokens.BASE_SUBJECT] == [1, 2, -1, 1, -1, -1, 2]
    # the masks follow: a trigger map that sits on the other object no longer makes V_1's mask
    maps = torch.zeros(len(specs), 2, 2)
    maps[:, 0, 0] = 1.0  # everything on the top-left pixel (cat) ...
    maps[2] = torch.tensor([[0.0, 0.0], [0.0, 1.0]])  # ... but V_1's trigger, on the dog
    maps[[1, 4, 6]] = torch.tensor([[0.0, 0.0], [0.0, 1.0]])  # and the dog maps
    paper = variant_masks(maps, torch.tensor(rules[MaskTokens.PAPER]), 3, threshold=0.5)
    subject = variant_masks(maps, torch.tensor(rules[MaskTokens.SUBJECT]), 3, threshold=0.5)
    assert paper[1].tolist() == [[1.0, 0.0], [0.0, 1.0]] and subject[1].tolist() == [[1.0, 0.0], [0.0, 0.0]]


def test_half_precision_threshold_is_the_papers_product_form():
    """A >= lambda * max A, as the paper writes it: in fp16 the quotient form A / max A >= lambda
    rounds the other way for this pair (0.34302 / 0.85791 passes it, the product form does not)."""
    maps = torch.zeros(2, 1, 2, dtype=torch.float16)
    maps[0, 0] = torch.tensor([0.85791015625, 0.343017578125], dtype=torch.float16)
    maps[1, 0, 1] = 1.0  # the other variant's map, on the other pixel
    assert bool(maps[0, 0, 1] / maps[0, 0, 0] >= 0.4)  # the quotient form would keep the pixel
    for overlap in MaskOverlap:
        masks = variant_masks(maps, torch.tensor([1, 2]), 3, threshold=0.4, overlap=overlap)
        assert masks[1, 0].tolist() == [1.0, 0.0] and masks[2, 0].tolist() == [0.0, 1.0]
