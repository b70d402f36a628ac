import dataclasses
import json
import math

import numpy as np
import pytest
import scipy.stats
import torch

from medseg_nbdev.active_learning import ALConfig, run_active_learning
from medseg_nbdev.cli import main
from medseg_nbdev.data import DataSplits, SliceDataset, SliceMeta
from medseg_nbdev.taal import (ALL_VIEWS, TAALConfig, consistency_loss, flip_rot90, flip_rot90_sampler,
                               gaussian_rampup, invert_flip_rot90, random_views, taal_strategies, taal_table,
                               train_unet_semi_supervised)
from medseg_nbdev.train import TrainConfig, train_unet
from medseg_nbdev.uncertainty import score_pool
from medseg_nbdev.unet import UNet


def toy_dataset(n=12, size=24, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.random((n, size, size)).astype(np.float32)
    meta = [SliceMeta("toy", "axial", i, (1.0, 1.0), 1.0) for i in range(n)]
    return SliceDataset(images, (images > 0.7).astype(np.int64), meta, ("bright",), "toy")


class RecordingModel(torch.nn.Module):
    "A stand-in network that returns fixed logits, broadcast to the input's batch and size."

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1, x.shape[-2], x.shape[-1]) + 0 * self.weight


@pytest.mark.parametrize("flip, turns", ALL_VIEWS)
def test_every_view_inverts_exactly(flip, turns):
    x = torch.rand(2, 3, 5, 7)
    torch.testing.assert_close(invert_flip_rot90(flip_rot90(x, flip, turns), flip, turns), x, rtol=0, atol=0)


def test_quarter_turn_is_counter_clockwise():
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 1, 2] = 1  # right of the centre
    assert torch.nonzero(flip_rot90(x, False, 1)[0, 0]).tolist() == [[0, 1]]  # above the centre


def test_gaussian_rampup_values():
    assert gaussian_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert gaussian_rampup(5, 10) == pytest.approx(math.exp(-1.25))
    assert gaussian_rampup(10, 10) == 1.0
    assert gaussian_rampup(50, 10) == 1.0
    values = [gaussian_rampup(t, 10) for t in range(11)]
    assert values == sorted(values)
    with pytest.raises(ValueError, match="non-negative"):
        gaussian_rampup(1, -2)


def test_random_views_cover_flips_and_turns():
    views = random_views(400, torch.Generator().manual_seed(0))
    assert {v for v in views} == set(ALL_VIEWS)


def test_consistency_loss_matches_weighted_jsd_by_hand():
    logits = torch.randn(1, 3, 6, 6)
    model = RecordingModel(logits)
    images = torch.zeros(2, 1, 6, 6)
    generator = torch.Generator().manual_seed(4)
    loss = consistency_loss(model, images, k=3, a=0.75, noise_std=0.0, generator=generator)
    views = random_views(3, torch.Generator().manual_seed(4))
    probs = torch.stack([invert_flip_rot90(logits.softmax(1), f, r).expand(2, -1, -1, -1) for f, r in views]).numpy()
    mean_entropy = scipy.stats.entropy(probs, axis=2).mean(0)
    total = scipy.stats.entropy(probs.mean(0), axis=1)
    assert loss.item() == pytest.approx((0.75 * total - 0.25 * mean_entropy).mean(), abs=1e-5)


def test_consistency_loss_sign_and_zero():
    constant = torch.full((1, 2, 8, 8), -30.0)
    constant[:, 0] = 30.0
    model = RecordingModel(constant)
    assert consistency_loss(model, torch.zeros(2, 1, 8, 8)).item() == pytest.approx(0.0, abs=1e-6)
    # uniform predictions that agree: the published formula gives (2a - 1) log C, the adding variant log C
    uniform = RecordingModel(torch.zeros(1, 2, 8, 8))
    assert consistency_loss(uniform, torch.zeros(1, 1, 8, 8), a=0.75).item() == pytest.approx(0.5 * math.log(2))


def test_consistency_loss_has_gradient():
    unet = UNet(n_classes=3, width=4, depth=2)
    loss = consistency_loss(unet, torch.rand(2, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.item() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters())


def test_consistency_loss_needs_two_views():
    with pytest.raises(ValueError, match="K = 2"):
        consistency_loss(UNet(n_classes=2, width=4, depth=2), torch.rand(1, 1, 16, 16), k=1)


@pytest.mark.parametrize("change, message", [
    ({"k_train": 1}, "k_train"),
    ({"a": 1.2}, r"\[0, 1\]"),
    ({"unlabelled_batch_size": 0}, "unlabelled_batch_size"),
    ({"rampup_fraction": 2.0}, "rampup_fraction must lie in"),
    ({"consistency_weight": -1.0}, "consistency_weight must be non-negative"),
    ({"noise_std": -0.1}, "noise_std must be non-negative"),
])
def test_taal_config_bad_input(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TAALConfig(), **change).validate()


def test_semi_supervised_training_reproducible():
    data = toy_dataset()
    config = TrainConfig(steps=5, width=4, depth=2)
    first, history = train_unet_semi_supervised(data.subset(range(6)), data.subset(range(6, 12)), config,
                                                device="cpu")
    second, _ = train_unet_semi_supervised(data.subset(range(6)), data.subset(range(6, 12)), config, device="cpu")
    supervised, _ = train_unet(data.subset(range(6)), config, device="cpu", progress=False)
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])
    assert torch.equal(flat(first), flat(second))
    assert not torch.equal(flat(first), flat(supervised))
    assert [h["weight"] for h in history] == [gaussian_rampup(t, 5 * 10 / 75) for t in range(5)]


def test_semi_supervised_without_unlabelled_images_trains_supervised():
    data = toy_dataset()
    config = TrainConfig(steps=3, width=4, depth=2)
    semi, history = train_unet_semi_supervised(data, data.subset([]), config, device="cpu")
    supervised, _ = train_unet(data, config, device="cpu", progress=False)
    assert all(h["consistency"] == 0 for h in history)
    for a, b in zip(semi.parameters(), supervised.parameters()):
        torch.testing.assert_close(a, b)


def test_flip_rot90_sampler_scores():
    sampler = flip_rot90_sampler(noise_std=0.0)
    views = list(sampler(UNet(n_classes=2, width=4, depth=2).eval(), torch.rand(2, 1, 16, 24), torch.Generator()))
    assert len(views) == 8
    assert all(p.shape == (2, 2, 16, 24) and valid is None for p, valid in views)
    constant = torch.tensor([-30.0, 30.0]).view(1, 2, 1, 1)
    np.testing.assert_allclose(score_pool(RecordingModel(constant), torch.rand(3, 16, 24), "weighted_jsd",
                                          flip_rot90_sampler()), 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 views"):
        flip_rot90_sampler(views=ALL_VIEWS[:1])


def test_taal_strategies_run_in_the_loop(tmp_path):
    data = toy_dataset()
    splits = DataSplits(data, data.subset(range(3)), data.subset(range(3, 6)), "random images")
    config = ALConfig(initial=4, budget=2, cycles=2, train=TrainConfig(steps=3, width=4, depth=2))
    registry = taal_strategies(TAALConfig(unlabelled_batch_size=2))
    assert sorted(registry) == ["random", "semi-random", "taal", "taal-unweighted"]
    rows = run_active_learning(tmp_path, config, list(registry), (False,), [0, 1], experiment="taal",
                               registry=registry, extra_settings={"taal": "test"}, data=splits, device="cpu",
                               progress=False)
    assert len(rows) == 4 * 2 * 2
    models = sorted(p.name.split("_")[1] for p in (tmp_path / "models").iterdir())
    assert models == ["semi-0.5"] * 2 + ["semi-0.75"] * 2 + ["supervised"] * 2
    table = taal_table(rows)
    assert list(table.index) == ["RS", "Semi + RS", "unweighted TAAL", "TAAL"]


def test_taal_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["taal", "--help"])
    assert exit_info.value.code == 0
    assert "weighted JSD" in capsys.readouterr().out


def test_taal_command_bad_input(tmp_path, capsys, colin27):
    assert main(["taal", "--out", str(tmp_path), "--a", "2", "--quiet"]) == 2
    assert "[0, 1]" in capsys.readouterr().err
    assert main(["taal", "--out", str(tmp_path), "--budget", "100", "--quiet"]) == 2
    assert "lower --cycles or --budget" in capsys.readouterr().err


def test_taal_command_writes_results(tmp_path, colin27):
    out = tmp_path / "taal"
    code = main(["taal", "--out", str(out), "--strategy", "random", "taal", "--cycles", "2", "--seeds", "1",
                 "--steps", "2", "--width", "4", "--unlabelled-batch", "2", "--device", "cpu", "--quiet"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["taal"]["config"]["train"]["width"] == 4
    rows = results["rows"]
    assert {r["strategy"] for r in rows} == {"random", "taal"}
    assert (out / "taal_curves.png").exists()
    assert (out / "taal_table.txt").exists()
