"""World 2's committed weights: files and manifest, LoRA files, localisation, the benchmark rendering in it."""

from __future__ import annotations

import os

import pytest

from clora_ext.lora_file import read_lora_file
from miniworld.localisation import localisation
from miniworld.loras import load_lora
from miniworld.model import load_model, read_manifest, sha256
from miniworld.train_lora import trigger_tokens
from miniworld.worlds import RELATIONS, WEIGHTS_ROOT


# --- world 2's weights ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest():
    return read_manifest(RELATIONS)


@pytest.fixture(scope="module")
def model():
    return load_model(world=RELATIONS)


def test_world2_files_are_in_its_manifest_with_their_hashes(manifest):
    entries = [manifest["base"]] + [manifest[f"lora:{s.name}"] for s in RELATIONS.loras]
    files = sorted(f for f in os.listdir(RELATIONS.weights_dir) if f.endswith(".safetensors"))
    assert sorted(e["file"] for e in entries) == files
    for e in entries:
        assert sha256(os.path.join(RELATIONS.weights_dir, e["file"])) == e["sha256"], f"{e['file']} differs"
    tree = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(WEIGHTS_ROOT) for f in fs)
    assert tree < 32 * 2**20
    assert os.path.getsize(RELATIONS.manifest) < 200_000


def test_world2_manifest_records_its_training_and_trigger_tokens(manifest):
    config = manifest["base"]["config"]
    assert config["world"] == "relations" and config["caption_style"] == "relations"
    assert config["seed"] == RELATIONS.base_seed and config["steps"] == 2400 and config["grounding_weight"] == 0.1
    assert manifest["base"]["train_seconds"] > 0 and manifest["base"]["loss_curve"]
    for spec in RELATIONS.loras:
        entry = manifest[f"lora:{spec.name}"]
        assert entry["world"] == "relations" and entry["teaches"]["trigger"] == spec.trigger
        assert entry["teaches"]["trigger_tokens"] == trigger_tokens(spec.trigger)
        assert (entry["teaches"]["shape"], entry["teaches"]["colour"]) == (spec.shape, spec.colour)
        assert entry["train_seconds"] > 0 and entry["loss_curve"]


def test_world2_loras_are_kohya_files_that_map_onto_its_model(model):
    for spec in RELATIONS.loras:
        assert read_lora_file(spec.path).format == "kohya"
        mapped = load_lora(model, spec.name)
        assert mapped.unet and mapped.text_encoder


def test_world2_localisation_reproduces_its_manifest(manifest, model):
    recorded = manifest["base"]["localisation"]
    measured = localisation(model, world=RELATIONS)
    assert measured["own_object_rate"] == pytest.approx(recorded["own_object_rate"], abs=0.005)
    assert measured["mask_iou"] == pytest.approx(recorded["mask_iou"], abs=0.005)



def test_quality_bench_renders_in_world2_and_names_it():
    """Two pictures of the quick two-LoRA suite, 4 steps: the plumbing, no figures (no thresholds)."""
    from bench import quality

    scored = quality.collect(quick=True, methods=("merge", "clora_default"), samplers=("euler",), steps=4,
                             only=("two",), log=lambda m: None, world=RELATIONS)
    report = quality.build_report(scored, quick=True, steps=4)
    assert report["settings"]["world"] == "relations"
    for m in report["methods"].values():
        assert m["n"] == 2 and 0.0 <= m["grain_background"] <= 1.0 and len(m["grain_background_ci"]) == 2
    assert all(s.world == "relations" for v in scored.values() for s in v)
    with pytest.raises(ValueError):  # pictures of two worlds never make one report
        mixed = {m: v + [quality.dataclasses.replace(v[0], world="shapes")] for m, v in scored.items()}
        quality.build_report(mixed, quick=True, steps=4)
