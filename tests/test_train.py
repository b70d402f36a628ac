import dataclasses

import numpy as np
import pytest
import torch

from medseg_nbdev.core import CheckpointError, load_checkpoint
from medseg_nbdev.data import SliceDataset, SliceMeta
from medseg_nbdev.train import (TrainConfig, augment_batch, cached_unet, evaluate, load_unet, predict_proba,
                                rotate, train_unet, warmup_cosine)
from medseg_nbdev.unet import UNet, mc_dropout

SMALL = TrainConfig(steps=8, width=4, depth=2, checkpoint_every=4)


@pytest.fixture
def toy():
    rng = np.random.default_rng(0)
    images = rng.random((5, 24, 24)).astype(np.float32)
    masks = (images > 0.6).astype(np.int64) + (images > 0.9)
    meta = [SliceMeta("toy", "axial", i, (1.0, 1.0), 1.0) for i in range(5)]
    return SliceDataset(images, masks, meta, ("bright", "brightest"))


def flat_weights(model):
    return torch.cat([p.detach().flatten().float() for p in model.state_dict().values()])


def test_training_is_deterministic(toy):
    a, _ = train_unet(toy, SMALL, device="cpu", progress=False)
    b, _ = train_unet(toy, SMALL, device="cpu", progress=False)
    c, _ = train_unet(toy, dataclasses.replace(SMALL, seed=1), device="cpu", progress=False)
    assert torch.equal(flat_weights(a), flat_weights(b))
    assert not torch.equal(flat_weights(a), flat_weights(c))


def test_resumed_run_equals_uninterrupted_run(toy, tmp_path):
    full, _ = train_unet(toy, SMALL, device="cpu", progress=False)
    path = tmp_path / "run.pt"
    train_unet(toy, SMALL, checkpoint=path, device="cpu", progress=False, stop_at=3)
    assert load_checkpoint(path, kind="unet")["step"] == 3
    resumed, history = train_unet(toy, SMALL, checkpoint=path, device="cpu", progress=False)
    assert [h["step"] for h in history] == list(range(1, 9))
    assert torch.equal(flat_weights(resumed), flat_weights(full))


def test_resume_refuses_other_settings(toy, tmp_path):
    path = tmp_path / "run.pt"
    train_unet(toy, SMALL, checkpoint=path, device="cpu", progress=False)
    with pytest.raises(CheckpointError, match="other settings"):
        train_unet(toy, dataclasses.replace(SMALL, lr=1e-3), checkpoint=path, device="cpu", progress=False)
    model, _ = train_unet(toy, dataclasses.replace(SMALL, lr=1e-3), checkpoint=path, device="cpu",
                          progress=False, resume=False)
    assert isinstance(model, UNet)


def test_checkpoint_errors(toy, tmp_path):
    path = tmp_path / "run.pt"
    train_unet(toy, SMALL, checkpoint=path, device="cpu", progress=False)
    model = load_unet(path)
    assert model.class_names == ("bright", "brightest")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_unet(path)
    other = tmp_path / "other.pt"
    torch.save({"kind": "prompt-module"}, other)
    with pytest.raises(CheckpointError, match="expected 'unet'"):
        load_unet(other)


def test_config_validation(toy):
    with pytest.raises(ValueError, match="steps and batch_size"):
        train_unet(toy, TrainConfig(steps=0), progress=False)
    with pytest.raises(ValueError, match="warmup_fraction"):
        TrainConfig(warmup_fraction=1.5).validate()
    with pytest.raises(ValueError, match="empty"):
        train_unet(toy.subset([]), SMALL, progress=False)


def test_model_learns_a_toy_task():
    rng = np.random.default_rng(1)
    images, masks = [], []
    yy, xx = np.mgrid[:32, :32]
    for _ in range(8):
        cy, cx, r = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(4, 8)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        images.append((0.2 + 0.6 * disc + rng.normal(0, 0.05, disc.shape)).astype(np.float32).clip(0, 1))
        masks.append(disc.astype(np.int64))
    data = SliceDataset(np.stack(images), np.stack(masks), [SliceMeta("d", "axial", i, (1.0, 1.0), 1.0)
                                                             for i in range(8)], ("disc",))
    config = TrainConfig(steps=150, width=8, depth=2, lr=3e-3, warmup_fraction=0.05, dropout=0.0)
    model, history = train_unet(data, config, device="cpu", progress=False)
    report, _ = evaluate(model, data)
    assert report["dsc_2d"] > 0.9, report["dsc_2d"]


def test_schedule_and_augmentation():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.005)
    assert warmup_cosine(10, 100, 10) == 1.0
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 7] = 1
    assert torch.nonzero(rotate(x, torch.tensor([90.0]), "nearest")[0, 0]).tolist() == [[1, 4]]
    images, masks = torch.rand(3, 1, 16, 16), torch.randint(0, 3, (3, 16, 16))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = augment_batch(images, masks, generator=g1)
    b = augment_batch(images, masks, generator=g2)
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1], b[1])


def test_predict_proba_shapes_and_mc_dropout(toy):
    model = UNet(n_classes=3, width=4, depth=2)
    probs = predict_proba(model, toy)
    assert probs.shape == (5, 3, 24, 24)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="Expected images"):
        predict_proba(model, np.zeros((2, 2, 3, 24, 24)))
    with mc_dropout(model), torch.no_grad():
        x = torch.from_numpy(toy.images[:1, None])
        assert not torch.equal(model(x), model(x))


def test_cached_unet_trains_once(data_home, colin27, monkeypatch):
    config = TrainConfig(steps=2, width=4, depth=2)
    first = cached_unet("colin27-hippocampus", config, device="cpu", progress=False)
    cached = list((data_home / "cache" / "unet").glob("*.pt"))
    assert len(cached) == 1

    def fail(*args, **kwargs):
        raise AssertionError("cached_unet retrained a cached model")

    import medseg_nbdev.train as train_module
    monkeypatch.setattr(train_module, "train_unet", fail)
    second = cached_unet("colin27-hippocampus", config, device="cpu", progress=False)
    assert torch.equal(flat_weights(first), flat_weights(second))
