"""The committed miniature-world weights: intact, small, and giving the figures the manifest records."""

from __future__ import annotations

import os

import pytest

from clora_ext.lora_file import read_lora_file
from miniworld.localisation import localisation
from miniworld.loras import LORAS, load_lora
from miniworld.model import MANIFEST, WEIGHTS_DIR, load_model, read_manifest, sha256


@pytest.fixture(scope="module")
def manifest():
    return read_manifest()


@pytest.fixture(scope="module")
def model():
    return load_model()


def test_every_file_is_in_the_manifest_with_its_hash(manifest):
    entries = [manifest["base"]] + [manifest[f"lora:{name}"] for name in LORAS]
    files = sorted(f for f in os.listdir(WEIGHTS_DIR) if f.endswith(".safetensors"))
    assert sorted(e["file"] for e in entries) == files
    total = 0
    for e in entries:
        path = os.path.join(WEIGHTS_DIR, e["file"])
        assert sha256(path) == e["sha256"], f"{e['file']} differs from the manifest"
        total += os.path.getsize(path)
    assert total <= 16 * 2**20
    assert os.path.getsize(MANIFEST) < 200_000


def test_the_manifest_records_how_each_file_was_trained(manifest):
    base = manifest["base"]
    assert base["train_seconds"] > 0 and base["loss_curve"] and base["config"]["seed"] == 0
    for name, spec in LORAS.items():
        entry = manifest[f"lora:{name}"]
        assert entry["teaches"]["trigger"] == spec.trigger and entry["config"]["rank"] <= 8


def test_loras_are_kohya_files_that_map_onto_the_model(model):
    for name in LORAS:
        lora = read_lora_file(LORAS[name].path)
        assert lora.format == "kohya"
        mapped = load_lora(model, name)
        assert mapped.unet and mapped.text_encoder


def test_localisation_reproduces_the_manifest_on_the_cpu(manifest, model):
    recorded = manifest["base"]["localisation"]
    measured = localisation(model)
    assert measured["own_object_rate"] == pytest.approx(recorded["own_object_rate"], abs=0.005)
    assert measured["mask_iou"] == pytest.approx(recorded["mask_iou"], abs=0.005)
    assert measured["own_object_rate"] >= 0.9
