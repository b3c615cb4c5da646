"""Variants and token positions against the real CLIP BPE tokenizer."""

from __future__ import annotations

import pytest

from clora_ext.concepts import Composition, Concept, PhraseNotFound, Role, insert_before_phrase
from clora_ext.devtools.tiny_sd import BOS, EOS
from clora_ext.tokens import BPEChunkTokenizer, pad_chunks, phrase_positions, plan_token_maps

LONG = ", ".join(["a very detailed painting of a quiet harbour at dawn"] * 9)  # > 75 tokens


@pytest.fixture(scope="module")
def tok(clip_bpe):
    return BPEChunkTokenizer(clip_bpe.encode)


def reference_positions(bpe, text: str, phrase: str) -> list[list[int]]:
    """Independent oracle: encode, pad into 77-id chunks, scan the padded ids."""
    ids = bpe.encode(text)
    chunks = [ids[i : i + 75] for i in range(0, len(ids), 75)] or [[]]
    padded = [t for c in chunks for t in [BOS, *c, EOS] + [EOS] * (75 - len(c))]
    needle = bpe.encode(phrase)
    content = [i for i, t in enumerate(padded) if i % 77 not in (0, 76) and i % 77 <= len(chunks[i // 77])]
    hits = []
    for a in range(len(content) - len(needle) + 1):
        pos = content[a : a + len(needle)]
        if [padded[p] for p in pos] == needle:
            hits.append(pos)
    return hits


CASES = [
    ("a cat and a dog", "cat", [[2]]),
    ("a cat and a dog", "dog", [[5]]),
    ("a photo of a cat", "photo", [[2]]),
    ("a cat chasing a cat", "cat", [[2], [5]]),  # a word that occurs twice
    ("a teddy bear next to a red sports car", "teddy bear", None),  # multi-token phrase
    ("a red sports car and a blue sports car", "sports car", None),
    ("an astronaut riding a horse on mars", "astronaut", None),
    ("portrait of a samurai, ukiyo-e style", "ukiyo-e", None),  # punctuation inside the phrase
    ("A Cat and a DOG", "dog", None),  # case-insensitive
    (LONG + ", a cat and a dog", "dog", None),  # beyond the first chunk
    (LONG + ", a cat and a dog", "cat", None),
    ("a quiet harbour, " + LONG, "harbour", None),  # repeated across both chunks
    ("sks cat, a dog", "sks cat", None),
]


@pytest.mark.parametrize("text,phrase,expected", CASES)
def test_positions_match_clip_tokenizer(tok, clip_bpe, text, phrase, expected):
    got = phrase_positions(tok, text, phrase)
    assert got == reference_positions(clip_bpe, text, phrase)
    if expected is not None:
        assert got == expected
    # every position points at the phrase's tokens in the padded chunk ids
    flat = [t for c in pad_chunks(tok.chunks(text), BOS, EOS) for t in c]
    for occurrence in got:
        assert [flat[p] for p in occurrence] == clip_bpe.encode(phrase)


def test_long_prompt_uses_second_chunk(tok):
    text = LONG + ", a cat and a dog"
    assert len(tok.chunks(text)) >= 2
    (dog,) = phrase_positions(tok, text, "dog")
    assert dog[0] > 77  # past BOS..EOS of the first chunk
    assert dog[0] % 77 not in (0, 76)


def test_missing_phrase_names_phrase_and_prompt(tok):
    with pytest.raises(PhraseNotFound) as e:
        phrase_positions(tok, "a cat and a dog", "horse")
    assert "horse" in str(e.value) and "a cat and a dog" in str(e.value)


def test_insert_before_every_occurrence():
    assert insert_before_phrase("a cat chasing a cat toy", "cat", "sks") == "a sks cat chasing a sks cat toy"
    assert insert_before_phrase("a Cat, (cat:1.2)", "cat", "sks") == "a sks Cat, (sks cat:1.2)"
    # whole words only: "cats" and "bobcat" are not "cat"
    with pytest.raises(PhraseNotFound):
        insert_before_phrase("two cats and a bobcat", "cat", "sks")


def test_variants_and_groups(tok):
    comp = Composition.from_concepts(
        [Concept("cat", "loraA", trigger="sks"), Concept("dog", "loraB", trigger="zwx dog style")]
    )
    variants = comp.variants("a cat and a dog")
    assert [v.prompt for v in variants] == [
        "a cat and a dog",
        "a sks cat and a dog",
        "a cat and a zwx dog style dog",
    ]
    specs = plan_token_maps(comp, variants, tok)
    by = {(s.variant, s.position): s for s in specs}
    # subject tokens in every variant, labelled with their concept
    assert by[(0, 2)].concept == 0 and not by[(0, 2)].mask
    assert by[(0, 5)].concept == 1 and not by[(0, 5)].mask
    # V_1: "a sks cat and a dog": trigger at 2, cat at 3 (mask), dog at 6 (not V_1's mask)
    assert by[(1, 2)].concept == 0 and by[(1, 2)].mask and by[(1, 2)].trigger
    assert by[(1, 3)].concept == 0 and by[(1, 3)].mask and not by[(1, 3)].trigger
    assert by[(1, 6)].concept == 1 and not by[(1, 6)].mask
    # V_2: multi-token trigger "zwx dog style" + subject "dog"; every token is concept 1 and masks V_2
    v2 = sorted(s.position for s in specs if s.variant == 2 and s.mask)
    assert v2 == list(range(5, 5 + len(tok.chunks("zwx dog style")[0]) + 1))
    assert all(s.concept == 1 for s in specs if s.variant == 2 and s.mask)
    # V_0 has no mask tokens
    assert not any(s.mask for s in specs if s.variant == 0)


def test_style_roles():
    comp = Composition.from_concepts(
        [
            Concept("cat", "A", trigger="sks"),
            Concept("dog", "B"),
            Concept("", "S", trigger="oil painting", role=Role.STYLE),
            Concept("dog", "T", trigger="tstyle", role=Role.STYLE_SUBJECTS),
        ]
    )
    variants = comp.variants("a cat and a dog")
    assert variants[0].prompt == "a cat and a dog, oil painting"
    assert variants[2].prompt == "a cat and a tstyle dog, oil painting"
    assert [s.lora for s in comp.styles_for_variant(variants[0])] == ["S"]
    assert [s.lora for s in comp.styles_for_variant(variants[1])] == ["S"]
    assert [s.lora for s in comp.styles_for_variant(variants[2])] == ["S", "T"]


@pytest.mark.parametrize(
    "concepts,match",
    [
        ([Concept("cat", "A"), Concept("Cat", "B")], "mapped twice"),
        ([Concept("cat", f"L{i}") for i in range(9)], "at most 8"),
        ([Concept("cat", "A"), Concept("horse", "S", role=Role.STYLE_SUBJECTS)], "not a content subject"),
        ([Concept("  ", "A")], "empty subject"),
        ([Concept("cat", "A"), Concept("cat toy", "B")], "'cat' and 'cat toy' overlap"),
        ([Concept("red  Cat", "A"), Concept("big red cat", "B")], "overlap"),
    ],
)
def test_composition_rejects(concepts, match):
    with pytest.raises(ValueError, match=match):
        Composition.from_concepts(concepts)


def test_subjects_sharing_a_word_but_not_contained_are_fine():
    comp = Composition.from_concepts([Concept("black cat", "A"), Concept("black dog", "B"), Concept("category", "C")])
    assert [c.subject for c in comp.content] == ["black cat", "black dog", "category"]


def _labels(tok, concepts, prompt):
    comp = Composition.from_concepts(concepts)
    variants = comp.variants(prompt)
    return variants, plan_token_maps(comp, variants, tok)


def _words_at(tok, text, positions):
    flat = [t for c in pad_chunks(tok.chunks(text), BOS, EOS) for t in c]
    return [flat[p] for p in sorted(positions)]


def test_trigger_tokens_are_the_inserted_ones_only(tok):
    # the cat's trigger "black" is inserted before "cat"; the dog's own "black" stays the dog's
    variants, specs = _labels(tok, [Concept("cat", "A", trigger="black"), Concept("dog", "B")], "a cat and a black dog")
    assert variants[1].prompt == "a black cat and a black dog"
    cat_masks = {s.position for s in specs if s.variant == 1 and s.mask}
    assert cat_masks == {2, 3}  # "black cat", not the 6th token ("black" of the dog)
    assert not any(s.concept == 0 for s in specs if s.variant == 1 and s.position == 6)


def test_subject_words_inside_other_words_are_not_subjects(tok):
    # "girl" inside "1girl" is not the subject "girl"
    _, specs = _labels(tok, [Concept("girl", "A"), Concept("dog", "B")], "1girl, a girl and a dog")
    girl = tok.chunks("1girl, a girl and a dog")[0].index(tok.chunks("girl")[0][0], 2) + 1
    assert {s.position for s in specs if s.variant == 0 and s.concept == 0} == {girl}
    with pytest.raises(PhraseNotFound):
        _labels(tok, [Concept("girl", "A"), Concept("dog", "B")], "1girl and a dog")


def test_punctuation_of_an_activation_text_is_not_a_concept_token(tok):
    variants, specs = _labels(tok, [Concept("girl", "A", trigger="1girl, alice"), Concept("dog", "B")],
                              "a girl and a dog")
    text = variants[1].prompt
    assert text == "a 1girl, alice girl and a dog"
    own = {s.position for s in specs if s.variant == 1 and s.mask}
    comma = tok.chunks(",")[0]
    assert comma[0] not in _words_at(tok, text, own)
    assert _words_at(tok, text, own) == tok.chunks("1girl alice girl")[0]


def test_subject_word_inside_a_trigger_belongs_to_the_trigger(tok):
    # the dog's trigger mentions "cat"; that "cat" is the dog's token, not the cat's
    variants, specs = _labels(tok, [Concept("cat", "A"), Concept("dog", "B", trigger="cat-chasing")],
                              "a cat and a dog")
    assert variants[2].prompt == "a cat and a cat-chasing dog"
    cat_positions = {s.position for s in specs if s.variant == 2 and s.concept == 0}
    assert cat_positions == {2}
