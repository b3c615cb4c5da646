"""World 2 ("relations"): its captions, its triggers, its prompts in the benchmark; and world 1 left as it was.
(Its weights: test_world2_weights.py.)"""

from __future__ import annotations

import os
import re

import numpy as np

from clora_ext.devtools.tiny_sd import clip_bpe
from miniworld import loras
from miniworld.model import MANIFEST, WEIGHTS_DIR
from miniworld.scenes import CONCEPT_COLOURS, RELATION_WORDS, SHAPES as SHAPE_WORDS, random_scene
from miniworld.train_lora import trigger_tokens
from miniworld.worlds import DEFAULT, RELATIONS, SHAPES, WEIGHTS_ROOT, CaptionStyle, get_world, lora_spec

_PHRASE = re.compile(r"a (?:(\w+) )?(circle|square|triangle)")


def _parse(caption: str) -> tuple[list[str], list[str]]:
    """(shape words in order, the text joining each neighbouring pair: ", ", " and ", " left of ", ...)."""
    matches = list(_PHRASE.finditer(caption))
    assert matches and matches[0].start() == 0, caption
    joins = [caption[a.end():b.start()] for a, b in zip(matches, matches[1:])]
    return [m.group(2) for m in matches], joins


def _holds(relation: str, a, b) -> bool:
    """Whether ``a relation b`` is plainly true: the objects' extents apart on that axis (y grows down)."""
    return {
        "left of": a.cx + a.r < b.cx - b.r,
        "right of": a.cx - a.r > b.cx + b.r,
        "above": a.cy + a.r < b.cy - b.r,
        "below": a.cy - a.r > b.cy + b.r,
        "next to": True,
    }[relation]


# --- the worlds -----------------------------------------------------------------------------------------------


def test_world1_is_the_default_and_keeps_its_files_and_loras():
    assert get_world() is DEFAULT is SHAPES
    assert SHAPES.weights_dir == WEIGHTS_DIR == WEIGHTS_ROOT and SHAPES.manifest == MANIFEST
    assert SHAPES.base_seed == 0 and SHAPES.caption_style is CaptionStyle.LIST
    assert {n: (s.trigger, s.shape, s.colour) for n, s in loras.LORAS.items()} == {
        "circle_sks": ("sks", "circle", "magenta"), "square_ohwx": ("ohwx", "square", "cyan"),
        "triangle_zwx": ("zwx", "triangle", "white"), "grain_style": ("grainy", None, None)}
    assert loras.LORAS["circle_sks"].path == os.path.join(WEIGHTS_DIR, "circle_sks.safetensors")
    assert loras.STYLE.name == "grain_style" and set(loras.BY_SHAPE) == set(SHAPE_WORDS)


def test_world1_captions_are_the_list_captions_and_draw_nothing_from_the_rng():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = random_scene(rng)
        before = rng.bit_generator.state
        assert SHAPES.caption(scene, rng) == scene.caption()
        assert SHAPES.caption(scene, rng, words={"circle": "sks"}, suffix=", grainy") == \
            scene.caption(words={"circle": "sks"}, suffix=", grainy")
        assert rng.bit_generator.state == before


def test_world2_has_its_own_folder_seed_colours_and_triggers():
    assert RELATIONS.weights_dir == os.path.join(WEIGHTS_ROOT, "relations") and RELATIONS.base_seed != SHAPES.base_seed
    assert RELATIONS.caption_style is CaptionStyle.RELATIONS
    assert {s.colour for s in RELATIONS.content} == set(CONCEPT_COLOURS)
    for shape in SHAPE_WORDS:  # every LoRA colour on another shape than in world 1
        assert RELATIONS.by_shape[shape].colour != SHAPES.by_shape[shape].colour
    world1_triggers = {s.trigger for s in SHAPES.loras}
    assert all(s.trigger not in world1_triggers for s in RELATIONS.loras)
    assert all(lora_spec(s.name) is s for w in (SHAPES, RELATIONS) for s in w.loras)


def test_world2_has_a_single_token_and_a_multi_token_trigger():
    bpe = clip_bpe()
    counts = {s.trigger: len(bpe.encode(s.trigger)) for s in RELATIONS.content}
    assert min(counts.values()) == 1 and max(counts.values()) >= 2, counts
    assert counts == {"bnha": 1, "kvx": 2, "qwrtz": 3}
    assert trigger_tokens("qwrtz") == ["q", "wr", "tz</w>"] and trigger_tokens("bnha") == ["bnha</w>"]
    for word in RELATION_WORDS:  # relation words are plain CLIP words, never a shape word
        assert not set(bpe.encode(word)) & {bpe.encode(s)[0] for s in SHAPE_WORDS}


# --- world 2's captions ---------------------------------------------------------------------------------------


def test_world2_captions_are_true_to_the_layout():
    rng = np.random.default_rng(11)
    seen: dict[str, int] = {}
    for _ in range(400):
        scene = random_scene(rng)
        caption = RELATIONS.caption(scene, rng)
        shapes, joins = _parse(caption)
        assert shapes == [o.shape for o in scene.ordered()], caption
        by_shape = {o.shape: o for o in scene.objects}
        for k, join in enumerate(joins):
            word = join.strip()
            if word in (",", "and"):
                assert join in (", ", " and ") and (join == " and ") == (k == len(joins) - 1), caption
            else:
                assert word in RELATION_WORDS, caption
                assert _holds(word, by_shape[shapes[k]], by_shape[shapes[k + 1]]), (caption, scene)
            seen[word] = seen.get(word, 0) + 1
    assert set(seen) == {",", "and", *RELATION_WORDS}, seen  # every form occurs
    relations = sum(seen[w] for w in RELATION_WORDS)
    assert 0.35 < relations / sum(seen.values()) < 0.65, seen


def test_world2_captions_name_colours_as_world1_and_take_trigger_words():
    rng = np.random.default_rng(12)
    named = total = 0
    for _ in range(300):
        scene = random_scene(rng)
        for m in _PHRASE.finditer(RELATIONS.caption(scene, rng)):
            obj = next(o for o in scene.objects if o.shape == m.group(2))
            assert m.group(1) == (obj.colour if obj.named_colour else None)
            named, total = named + (m.group(1) is not None), total + 1
    assert 0.7 < named / total < 0.9
    scene = random_scene(np.random.default_rng(0), shapes=("square",), colours={"square": "white"})
    assert RELATIONS.caption(scene, rng, words={"square": "qwrtz"}) == "a qwrtz square"
    assert RELATIONS.caption(scene, rng, suffix=", speckled").endswith(" square, speckled")


def test_relation_words_follow_the_centres():
    from miniworld.scenes import SceneObject, true_relations

    def obj(cx, cy, r=4.0):
        return SceneObject("circle", "red", cx, cy, r, (1.0, 0.0, 0.0))

    assert true_relations(obj(6, 16), obj(26, 16)) == ["left of"]
    assert true_relations(obj(26, 16), obj(6, 16)) == ["right of"]
    assert true_relations(obj(16, 5), obj(16, 26)) == ["above"]
    assert true_relations(obj(16, 26), obj(16, 5)) == ["below"]
    assert true_relations(obj(6, 5), obj(26, 26)) == ["left of", "above"]
    assert true_relations(obj(10, 8), obj(16, 24)) == ["above"]  # 6 px apart across: not clearly left


# --- the benchmark's world option -----------------------------------------------------------------------------


def test_quality_suites_of_world2_name_relations_and_its_loras():
    from bench import quality

    world1, world2 = quality.suites(False), quality.suites(False, world=RELATIONS)
    assert [t.prompt for t, _ in quality.suites(False, world=SHAPES)["two"]] == [t.prompt for t, _ in world1["two"]]
    assert world1["two"][0][0].prompt == "a circle and a square"
    names = {s.name for s in RELATIONS.loras}
    orders = set()
    for suite in ("two", "three"):
        for task, _ in world2[suite]:
            shapes, joins = _parse(task.prompt)
            assert len(set(shapes)) == len(shapes) == len(task.content)  # each subject named once
            assert [lora_spec(n).shape for n in task.content] == shapes and set(task.content) <= names
            assert any(j.strip() in RELATION_WORDS for j in joins), task.prompt
            orders.add(tuple(shapes))
    for a, b in [("circle", "square"), ("circle", "triangle"), ("square", "triangle")]:
        assert (a, b) in orders and (b, a) in orders  # both word orders for every pair
    assert {t.style for t, _ in world2["style"]} == {RELATIONS.style.name}
    assert [len(v) for v in world2.values()] == [len(v) for v in world1.values()]
