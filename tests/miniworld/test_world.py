"""The miniature world's scenes and its pixel oracle."""

from __future__ import annotations

import numpy as np
import pytest

from miniworld.oracle import GRAIN_THRESHOLD, Subject, analyse, is_grainy, judge
from miniworld.scenes import (
    BASE_COLOURS,
    CONCEPT_COLOURS,
    SHAPES,
    SIZE,
    random_scene,
    render,
    to_image,
    to_latent,
    with_colour,
)


def test_scenes_are_seeded_and_varied():
    a = [random_scene(np.random.default_rng(3)) for _ in range(2)]
    assert a[0] == a[1]
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(300)]
    counts = {n: sum(len(s.objects) == n for s in scenes) for n in (1, 2, 3)}
    assert all(c > 30 for c in counts.values()), counts
    for s in scenes:
        assert {o.colour for o in s.objects} <= set(BASE_COLOURS)
        assert len({o.shape for o in s.objects}) == len(s.objects)


def test_objects_never_overlap_and_stay_inside():
    rng = np.random.default_rng(1)
    for _ in range(200):
        scene = random_scene(rng, n_objects=3)
        _, masks = render(scene)
        assert masks.sum(0).max() == 1
        assert not masks[:, 0].any() and not masks[:, -1].any() and not masks[:, :, 0].any() and not masks[:, :, -1].any()


def test_captions_vary_the_order_and_sometimes_omit_colours():
    rng = np.random.default_rng(2)
    captions = [random_scene(rng, shapes=("circle", "square")).caption() for _ in range(200)]
    assert any(c.endswith("square") for c in captions) and any(c.endswith("circle") for c in captions)
    assert "a circle and a square" in captions or "a square and a circle" in captions or any(
        c.startswith(("a circle", "a square")) for c in captions
    )
    assert all(c.startswith("a ") and " and a " in c for c in captions)
    three = random_scene(np.random.default_rng(5), n_objects=3, p_unnamed=0.0).caption()
    assert three.count(", a ") == 1 and three.count(" and a ") == 1


def test_caption_words_replace_the_colour_of_a_shape():
    scene = random_scene(np.random.default_rng(0), shapes=("circle",), colours={"circle": "magenta"})
    assert scene.caption(words={"circle": "sks"}) == "a sks circle"
    assert scene.caption(suffix=", grainy").endswith(", grainy")


def test_latent_round_trip():
    img, _ = render(random_scene(np.random.default_rng(4)))
    latent = to_latent(img[None])
    assert latent.shape == (1, 4, SIZE, SIZE)
    assert float(latent[0, 3].abs().max()) == 0.0
    np.testing.assert_allclose(to_image(latent)[0], img, atol=1e-6)


def _accuracy(noise: float, seed: int, n: int = 400) -> float:
    rng = np.random.default_rng(seed)
    right = 0
    for i in range(n):
        colours = {}
        if i % 4 == 0:  # the LoRA colours too
            shape = SHAPES[i % 3]
            colours = {shape: list(CONCEPT_COLOURS)[i % 3]}
        scene = random_scene(rng, colours=colours, grain=i % 5 == 0)
        img, _ = render(scene, rng)
        img = np.clip(img + rng.normal(0, noise, img.shape), 0, 1)
        expected = sorted((o.shape, o.colour) for o in scene.objects)
        right += expected == sorted((o.shape, o.colour) for o in analyse(img).objects)
    return right / n


def test_oracle_reads_rendered_scenes():
    assert _accuracy(0.0, seed=11) >= 0.99


def test_oracle_reads_noisy_renders():
    assert _accuracy(0.05, seed=12) >= 0.97


def test_oracle_measures_grain_on_background_and_objects():
    rng = np.random.default_rng(6)
    scene = random_scene(rng, n_objects=2)
    flat = analyse(render(scene)[0])
    grainy = analyse(render(scene.__class__(scene.objects, grain=True), rng)[0])
    assert flat.background_grain < GRAIN_THRESHOLD / 4 and not is_grainy(flat.background_grain)
    assert is_grainy(grainy.background_grain)
    assert all(is_grainy(o.grain) for o in grainy.objects if o.pixels >= 30)


def test_judge_tells_success_bleed_omission_and_duplicates():
    rng = np.random.default_rng(7)
    subjects = [Subject("circle", "magenta"), Subject("square", "cyan")]

    def verdict(colours, shapes=("circle", "square")):
        scene = random_scene(rng, shapes=shapes, colours=colours)
        return judge(analyse(render(scene)[0]), subjects)

    good = verdict({"circle": "magenta", "square": "cyan"})
    assert good["success"] and not good["bleed"]
    assert good["subjects"]["circle"] == {"present": True, "count": 1, "own_attribute": True, "other_attribute": False}
    bled = verdict({"circle": "cyan", "square": "cyan"})
    assert bled["bleed"] and not bled["success"] and bled["subjects"]["circle"]["other_attribute"]
    missing = verdict({"circle": "magenta"}, shapes=("circle",))
    assert missing["omission"] and not missing["success"]
    plain = verdict({"circle": "red", "square": "cyan"})
    assert not plain["success"] and not plain["bleed"] and not plain["subjects"]["circle"]["own_attribute"]


def test_judge_counts_two_objects_of_one_kind_as_a_duplicate():
    scene = random_scene(np.random.default_rng(8), shapes=("circle", "square"), colours={"circle": "magenta", "square": "cyan"})
    twin = scene.__class__((scene.objects[0], with_colour(scene, "square", "magenta").objects[1].__class__(
        "circle", "magenta", scene.objects[1].cx, scene.objects[1].cy, scene.objects[1].r, CONCEPT_COLOURS["magenta"])))
    result = judge(analyse(render(twin)[0]), [Subject("circle", "magenta"), Subject("square", "cyan")])
    assert result["duplicate"] and result["omission"] and not result["success"]


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_is_read_at_every_size(shape):
    from miniworld.scenes import Scene, SceneObject

    for r in np.linspace(3.5, 7.0, 8):
        for offset in (0.0, 0.3, 0.5):
            obj = SceneObject(shape, "red", 16 + offset, 16 + offset, float(r), BASE_COLOURS["red"])
            found = analyse(render(Scene((obj,)))[0]).objects
            assert [o.shape for o in found] == [shape], (shape, r, offset)
