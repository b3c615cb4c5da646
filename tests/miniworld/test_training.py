"""Smoke runs of the training scripts (a few steps each) and the pieces they rely on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clora_ext.lora_file import map_lora, read_lora_file
from miniworld import train_base, train_lora
from miniworld.loras import LORAS
from miniworld.model import load_model
from miniworld.scenes import random_scene
from miniworld.training import make_batch, noun_positions, tokenize


@pytest.fixture(scope="module")
def smoke_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    result = train_base.train(steps=2, batch=4, lr=1e-3, grounding=0.1, seed=0, threads=None, out=str(path),
                              evaluate=False, quiet=True)
    return path, result


def test_base_training_runs_and_saves_a_loadable_model(smoke_base):
    path, result = smoke_base
    assert result["loss_curve"][-1]["step"] == 2
    assert all(np.isfinite(p["mse"]) and np.isfinite(p["grounding"]) for p in result["loss_curve"])
    model = load_model(str(path))
    assert not model.unet.training and len(result["sha256"]) == 64
    ids = tokenize(["a red circle"])
    out = model.unet(torch.zeros(1, 4, 32, 32), torch.tensor([10]), context=model.text_encoder(input_ids=ids).last_hidden_state)
    assert out.shape == (1, 4, 32, 32) and torch.isfinite(out).all()


def test_base_training_is_seeded(smoke_base, tmp_path):
    _, first = smoke_base
    again = train_base.train(steps=2, batch=4, lr=1e-3, grounding=0.1, seed=0, threads=None,
                             out=str(tmp_path / "b.safetensors"), evaluate=False, quiet=True)
    assert again["sha256"] == first["sha256"]


@pytest.mark.parametrize("name", sorted(LORAS))
def test_lora_training_writes_a_kohya_file_the_core_reads(smoke_base, tmp_path, name):
    base, _ = smoke_base
    out = tmp_path / f"{name}.safetensors"
    result = train_lora.train(name, steps=2, batch=2, lr=1e-3, rank=4, seed=1, threads=None, out=str(out),
                              base=str(base), quiet=True)
    lora = read_lora_file(out)
    assert lora.format == "kohya" and lora.unet_keys and lora.te_keys
    assert max(d.rank for d in lora.deltas.values()) <= 8
    model = load_model(str(base))
    mapped = map_lora(lora, model.unet, model.text_encoder)
    assert any(".attn2." in n for n in mapped.unet) and mapped.text_encoder
    assert result["config"]["rank"] == 4 and result["loss_curve"][-1]["step"] == 2


def test_noun_positions_point_at_the_shape_words():
    scene = random_scene(np.random.default_rng(0), shapes=("circle", "square"), colours={"circle": "red", "square": "blue"})
    caption = scene.caption()
    ids = tokenize([caption])[0]
    positions = noun_positions(ids, scene)
    from clora_ext.devtools.tiny_sd import clip_bpe

    assert [clip_bpe().decode([int(ids[p])]).strip() for p in positions] == ["circle", "square"]
    batch = make_batch([scene], [""], np.random.default_rng(0))
    assert batch.noun_positions == [[-1, -1]]


def test_grounding_loss_is_zero_on_the_footprint_and_grows_off_it():
    target = torch.zeros(1, 8, 8)
    target[0, 2:4, 2:4] = 1
    assert float(train_base.grounding_loss(target, target)) == pytest.approx(0.0, abs=1e-6)
    uniform = torch.ones(1, 8, 8)
    elsewhere = torch.zeros(1, 8, 8)
    elsewhere[0, 5:7, 5:7] = 1
    assert float(train_base.grounding_loss(uniform, target)) == pytest.approx(np.log(16), rel=1e-4)
    assert float(train_base.grounding_loss(elsewhere + 1e-3, target)) > float(train_base.grounding_loss(uniform, target))


def test_world2_training_uses_its_captions_and_trains_its_loras(tmp_path):
    from miniworld.worlds import RELATIONS

    base = tmp_path / "base.safetensors"
    result = train_base.train(steps=2, batch=4, lr=1e-3, grounding=0.1, seed=RELATIONS.base_seed, threads=None,
                              out=str(base), evaluate=False, quiet=True, world=RELATIONS)
    assert result["config"]["world"] == "relations" and result["config"]["caption_style"] == "relations"
    out = tmp_path / "square_qwrtz.safetensors"
    lora = train_lora.train("square_qwrtz", steps=2, batch=2, lr=1e-3, rank=4, seed=1, threads=None, out=str(out),
                            base=str(base), quiet=True, world=RELATIONS)
    assert lora["world"] == "relations" and lora["teaches"]["trigger_tokens"] == ["q", "wr", "tz</w>"]
    assert read_lora_file(out).format == "kohya"
    with pytest.raises(KeyError):  # a world-1 LoRA is not world 2's
        train_lora.train("circle_sks", steps=1, batch=1, lr=1e-3, rank=4, seed=1, threads=None, out=str(out),
                         base=str(base), quiet=True, world=RELATIONS)
    rng = np.random.default_rng(0)
    spec = RELATIONS.lora_specs["triangle_kvx"]
    assert all(train_lora.training_scene(spec, rng, RELATIONS)[1] == "a kvx triangle" for _ in range(5))
    style = [train_lora.training_scene(RELATIONS.style, rng, RELATIONS)[1] for _ in range(20)]
    assert all(c.endswith(", speckled") for c in style)


def test_base_training_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, monkeypatch):
    from miniworld.worlds import RELATIONS

    kwargs = dict(steps=4, batch=4, lr=1e-3, grounding=0.1, seed=1, threads=None, evaluate=False, quiet=True,
                  world=RELATIONS)
    straight = train_base.train(out=str(tmp_path / "a.safetensors"), **kwargs)
    checkpoint = str(tmp_path / "run.ckpt")
    calls = []
    loss = train_base.diffusion_loss

    def stopping(*args, **kw):  # the run stops in its fourth step, after the checkpoint of step 2
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return loss(*args, **kw)

    monkeypatch.setattr(train_base, "diffusion_loss", stopping)
    with pytest.raises(KeyboardInterrupt):
        train_base.train(out=str(tmp_path / "b.safetensors"), checkpoint=checkpoint, checkpoint_every=2, **kwargs)
    monkeypatch.setattr(train_base, "diffusion_loss", loss)
    resumed = train_base.train(out=str(tmp_path / "b.safetensors"), checkpoint=checkpoint, checkpoint_every=2, **kwargs)
    assert resumed["sha256"] == straight["sha256"]
    assert [{k: v for k, v in p.items() if k != "seconds"} for p in resumed["loss_curve"]] == \
        [{k: v for k, v in p.items() if k != "seconds"} for p in straight["loss_curve"]]
