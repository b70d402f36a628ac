import dataclasses
import itertools
import json

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.stats
import torch
import torch.nn.functional as F

import medseg_nbdev.active_learning as al
from medseg_nbdev.active_learning import (AL_STRATEGIES, ALConfig, LossPredictionModule, batch_scores,
                                          bottleneck_features, collect_rows, improvement_table, k_center_greedy,
                                          loss_prediction_features, per_image_loss, predicted_losses, preset_config,
                                          ranking_loss, roi_window, run_active_learning, sampling_time_table,
                                          select_stochastic_batch, select_top, stochastic_batches,
                                          train_unet_with_loss_prediction, unet_feature_channels, write_al_report)
from medseg_nbdev.cli import main
from medseg_nbdev.data import DataSplits, SliceDataset, SliceMeta
from medseg_nbdev.train import TrainConfig
from medseg_nbdev.unet import UNet

def toy_dataset(n=12, size=24, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.random((n, size, size)).astype(np.float32)
    masks = (images > 0.7).astype(np.int64)
    meta = [SliceMeta("toy", "axial", i, (1.0, 1.0), 1.0) for i in range(n)]
    return SliceDataset(images, masks, meta, ("bright",), "toy")


@pytest.fixture(scope="module")
def toy_splits():
    data = toy_dataset()
    return DataSplits(data, data.subset(range(3)), data.subset(range(3, 6)), "random images")


TOY_CONFIG = ALConfig(initial=4, budget=2, cycles=2, train=TrainConfig(steps=3, width=4, depth=2), k_dropout=2,
                      k_tta=2)


# --- selection -------------------------------------------------------------------------------

def test_select_top_orders_and_breaks_ties_by_position():
    assert select_top([0.2, 0.9, 0.5, 0.9], 3).tolist() == [1, 3, 2]


def test_disjoint_batches_partition_the_pool():
    batches = stochastic_batches(23, 5, rng=np.random.default_rng(0))
    assert batches.shape == (4, 5)  # Q = floor(23 / 5)
    assert len(set(batches.ravel())) == 20
    assert set(batches.ravel()) <= set(range(23))


def test_resampled_batches_may_repeat_images_across_batches():
    batches = stochastic_batches(10, 4, n_batches=50, resample=True, rng=np.random.default_rng(0))
    assert batches.shape == (50, 4)
    assert all(len(set(b)) == 4 for b in batches)
    assert len(np.unique(batches)) == 10


def test_stochastic_batch_picks_best_mean():
    scores = np.random.default_rng(3).random(30)
    chosen, draw = select_stochastic_batch(scores, 5, rng=np.random.default_rng(1))
    means = scores[draw["batches"]].mean(1)
    assert draw["best"] == int(np.argmax(means))
    assert scores[chosen].mean() == pytest.approx(means.max())


@pytest.mark.parametrize("reduction", ["mean", "max", "sum"])
def test_batch_scores_reductions(reduction):
    scores = np.array([0.1, 0.4, 0.3, 0.8])
    batches = np.array([[0, 1], [2, 3]])
    expected = getattr(scores[batches], reduction)(axis=1)
    np.testing.assert_allclose(batch_scores(scores, batches, reduction), expected)


def test_sum_and_mean_choose_the_same_batch():
    scores = np.random.default_rng(4).random(40)
    by_mean, _ = select_stochastic_batch(scores, 4, reduction="mean", rng=np.random.default_rng(2))
    by_sum, _ = select_stochastic_batch(scores, 4, reduction="sum", rng=np.random.default_rng(2))
    np.testing.assert_array_equal(by_mean, by_sum)


def test_one_batch_is_random_sampling():
    rng = np.random.default_rng(5)
    scores_a, scores_b = rng.random(15), -rng.random(15)
    picks = []
    for trial in range(3000):
        chosen_a, _ = select_stochastic_batch(scores_a, 3, n_batches=1, resample=True, rng=np.random.default_rng(trial))
        chosen_b, _ = select_stochastic_batch(scores_b, 3, n_batches=1, resample=True, rng=np.random.default_rng(trial))
        np.testing.assert_array_equal(chosen_a, chosen_b)  # the scores play no part
        reference = np.random.default_rng(trial).choice(15, 3, replace=False)
        np.testing.assert_array_equal(chosen_a, reference)  # the same draw as plain random sampling
        picks.extend(chosen_a)
    assert scipy.stats.chisquare(np.bincount(picks, minlength=15)).pvalue > 1e-3


def test_disjoint_single_batch_is_random_sampling():
    scores = np.arange(20.0)
    chosen, _ = select_stochastic_batch(scores, 5, n_batches=1, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(chosen, np.random.default_rng(7).permutation(20)[:5])


def test_large_resampled_pool_converges_to_top_b():
    for trial in range(5):
        scores = np.random.default_rng(50 + trial).random(12)
        chosen, _ = select_stochastic_batch(scores, 3, n_batches=5000, resample=True, rng=np.random.default_rng(trial))
        assert set(chosen) == set(select_top(scores, 3))


def test_overlap_with_top_b_grows_with_q():
    def mean_overlap(q):
        overlaps = []
        for trial in range(40):
            scores = np.random.default_rng(trial).random(60)
            chosen, _ = select_stochastic_batch(scores, 6, q, resample=True, rng=np.random.default_rng(999 + trial))
            overlaps.append(len(set(chosen) & set(select_top(scores, 6))))
        return np.mean(overlaps)
    assert mean_overlap(1) < mean_overlap(10) < mean_overlap(1000)


@pytest.mark.parametrize("call, message", [
    (lambda: select_top(np.ones(5), 6), "larger than the unlabelled pool"),
    (lambda: select_stochastic_batch(np.ones(5), 6), "larger than the unlabelled pool"),
    (lambda: select_stochastic_batch(np.ones(10), 2, n_batches=0), "at least 1"),
    (lambda: select_stochastic_batch(np.ones(10), 2, n_batches=-3, resample=True), "at least 1"),
    (lambda: select_stochastic_batch(np.array([]), 2), "pool is empty"),
    (lambda: select_top([], 1), "pool is empty"),
    (lambda: select_top([0.1, np.nan], 1), "NaN"),
    (lambda: select_stochastic_batch([0.1, np.inf, 0.2], 1), "NaN or infinite"),
    (lambda: select_stochastic_batch(np.ones(10), 2, n_batches=6), "use resampling"),
    (lambda: batch_scores(np.ones(4), [[0, 1]], "median"), "Unknown batch score"),
    (lambda: select_top(np.ones(4), 0), "at least 1"),
])
def test_selection_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- Core-set --------------------------------------------------------------------------------

def brute_force_greedy(features, labelled, budget):
    "k-centre greedy recomputing every distance from scratch at each step (SciPy)."
    centres = list(np.flatnonzero(labelled))
    chosen = []
    for _ in range(budget):
        distances = scipy.spatial.distance.cdist(features, features[centres]).min(1)
        distances[centres] = -1
        u = int(np.argmax(distances))
        chosen.append(u)
        centres.append(u)
    return chosen


def test_k_center_greedy_matches_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(10):
        features = rng.normal(size=(40, 5))
        labelled = np.zeros(40, dtype=bool)
        labelled[rng.choice(40, 3, replace=False)] = True
        assert k_center_greedy(features, labelled, 6).tolist() == brute_force_greedy(features, labelled, 6)


def test_k_center_greedy_is_within_twice_the_optimal_radius():
    rng = np.random.default_rng(1)
    for trial in range(5):
        features = rng.normal(size=(11, 2))
        labelled = np.zeros(11, dtype=bool)
        labelled[0] = True
        budget = 3

        def radius(centres):
            return scipy.spatial.distance.cdist(features, features[list(centres)]).min(1).max()

        optimal = min(radius([0, *extra]) for extra in itertools.combinations(range(1, 11), budget))
        greedy = radius([0, *k_center_greedy(features, labelled, budget)])
        assert greedy <= 2 * optimal + 1e-12


def test_k_center_greedy_bad_input():
    features = np.arange(6.0)[:, None]
    with pytest.raises(ValueError, match="at least one labelled"):
        k_center_greedy(features, np.zeros(6, dtype=bool), 1)
    with pytest.raises(ValueError, match="larger than the unlabelled pool"):
        k_center_greedy(features, [True] + [False] * 5, 6)
    with pytest.raises(ValueError, match="NaN"):
        k_center_greedy(np.full((3, 2), np.nan), [True, False, False], 1)


def test_bottleneck_features_shape():
    unet = UNet(n_classes=2, width=4, depth=2)
    features = bottleneck_features(unet, toy_dataset(n=3, size=16))
    assert features.shape == (3, 16 * 4 * 4)


# --- Learning Loss ---------------------------------------------------------------------------

def test_ranking_loss_by_hand():
    predicted = torch.tensor([2.0, 0.5, 0.0, 1.0])
    target = torch.tensor([3.0, 1.0, 2.0, 0.0])
    assert ranking_loss(predicted, target).item() == pytest.approx(0.75)
    assert ranking_loss(predicted[:3], target[:3]).item() == pytest.approx(max(0, 1 - (2.0 - 0.0)))


def test_ranking_loss_needs_two_images():
    with pytest.raises(ValueError, match="at least 2"):
        ranking_loss(torch.zeros(1), torch.zeros(1))


def test_per_image_loss_cross_entropy_part_matches_batch_loss():
    logits, target = torch.randn(3, 4, 8, 8), torch.randint(0, 4, (3, 8, 8))
    assert per_image_loss(logits, target, 1.0, 0.0).mean().item() == pytest.approx(
        F.cross_entropy(logits, target).item(), abs=1e-6)
    assert per_image_loss(logits, target).shape == (3,)


def test_loss_prediction_module_reads_unet_features():
    unet = UNet(n_classes=3, width=4, depth=3)
    _, features = unet(torch.rand(2, 1, 32, 32), return_features=True)
    maps = loss_prediction_features(features)
    assert [m.shape[1] for m in maps] == unet_feature_channels(unet)
    assert LossPredictionModule(unet_feature_channels(unet))(maps).shape == (2,)


def test_learning_loss_training_is_reproducible():
    data = toy_dataset()
    config = TrainConfig(steps=6, width=4, depth=2)
    first = train_unet_with_loss_prediction(data, config, device="cpu")
    second = train_unet_with_loss_prediction(data, config, device="cpu")
    np.testing.assert_array_equal(predicted_losses(first[0], first[1], data), predicted_losses(second[0], second[1], data))
    assert len(first[2]) == 6 and "ranking_loss" in first[2][0]


# --- the loop --------------------------------------------------------------------------------

def without_timings(rows):
    return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in rows]


def test_every_strategy_runs(tmp_path, toy_splits):
    rows = run_active_learning(tmp_path, TOY_CONFIG, list(AL_STRATEGIES), seeds=[0], data=toy_splits, device="cpu",
                               progress=False)
    assert len(rows) == 10 * 2
    for row in rows:
        assert row["n_labelled"] == 4 + 2 * row["cycle"]
        assert len(row["labelled_ids"]) == row["n_labelled"]
        assert len(set(row["labelled_ids"])) == row["n_labelled"]
    first = {row["dsc_3d"] for row in rows if row["cycle"] == 0 and row["strategy"] != "learning-loss"}
    assert len(first) == 1  # the shared first cycle
    assert sorted(p.name.split("_")[1] for p in (tmp_path / "models").iterdir()) == ["learning-loss", "supervised"]


def test_results_json_has_required_keys(tmp_path, toy_splits):
    run_active_learning(tmp_path, TOY_CONFIG, ["random", "entropy"], seeds=[0, 1], data=toy_splits, device="cpu",
                        progress=False)
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["rows"]) == 3 * 2 * 2
    for key in ("strategy", "stochastic_batches", "seed", "cycle", "n_labelled", "dsc_2d", "dsc_3d", "hd95_3d",
                "sampling_seconds"):
        assert key in results["rows"][0]
    assert results["settings"]["main"]["fingerprint"]


def test_interrupted_run_resumes_at_last_finished_cycle(tmp_path, toy_splits, monkeypatch):
    config = dataclasses.replace(TOY_CONFIG, cycles=3)
    full = run_active_learning(tmp_path / "full", config, ["entropy"], [True], data=toy_splits, device="cpu",
                               progress=False)
    original = al._train_and_evaluate
    calls = {"n": 0}

    def crash_on_third_training(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return original(*args, **kwargs)

    monkeypatch.setattr(al, "_train_and_evaluate", crash_on_third_training)
    with pytest.raises(KeyboardInterrupt):
        run_active_learning(tmp_path / "cut", config, ["entropy"], [True], data=toy_splits, device="cpu", progress=False)
    assert len(collect_rows(tmp_path / "cut")) == 2
    monkeypatch.setattr(al, "_train_and_evaluate", original)
    resumed = run_active_learning(tmp_path / "cut", config, ["entropy"], [True], data=toy_splits, device="cpu",
                                  progress=False)
    assert without_timings(resumed) == without_timings(full)


def test_more_cycles_extend_a_finished_run(tmp_path, toy_splits):
    full = run_active_learning(tmp_path / "a", TOY_CONFIG, ["random"], data=toy_splits, device="cpu", progress=False)
    run_active_learning(tmp_path / "b", dataclasses.replace(TOY_CONFIG, cycles=1), ["random"], data=toy_splits,
                        device="cpu", progress=False)
    extended = run_active_learning(tmp_path / "b", TOY_CONFIG, ["random"], data=toy_splits, device="cpu",
                                   progress=False)
    assert without_timings(extended) == without_timings(full)


def test_other_settings_in_same_folder_are_refused(tmp_path, toy_splits):
    run_active_learning(tmp_path, TOY_CONFIG, ["random"], data=toy_splits, device="cpu", progress=False)
    with pytest.raises(al.CheckpointError, match="other settings"):
        run_active_learning(tmp_path, dataclasses.replace(TOY_CONFIG, initial=3), ["random"], data=toy_splits,
                            device="cpu", progress=False)


def test_state_files_are_valid_json_after_each_cycle(tmp_path, toy_splits):
    run_active_learning(tmp_path, TOY_CONFIG, ["entropy"], [False], data=toy_splits, device="cpu", progress=False)
    state = json.loads(next((tmp_path / "runs").glob("*.json")).read_text())
    assert state["cycle"] == 2
    assert [s["cycle"] for s in state["selections"]] == [0, 1]
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("change, message", [
    ({"initial": 13}, "larger than the training split"),
    ({"cycles": 6}, "lower --cycles or --budget"),
    ({"budget": 0}, "at least 1"),
    ({"n_batches": 0}, "at least 1"),
    ({"reduction": "median"}, "Unknown batch score"),
])
def test_loop_bad_input(tmp_path, toy_splits, change, message):
    with pytest.raises(ValueError, match=message):
        run_active_learning(tmp_path, dataclasses.replace(TOY_CONFIG, **change), ["random"], data=toy_splits,
                            progress=False)


def test_unknown_strategy_is_rejected(tmp_path, toy_splits):
    with pytest.raises(ValueError, match="Unknown strategy 'bald'"):
        run_active_learning(tmp_path, TOY_CONFIG, ["bald"], data=toy_splits, progress=False)


def test_report_tables_and_figures(tmp_path, toy_splits):
    rows = run_active_learning(tmp_path, TOY_CONFIG, ["random", "coreset", "entropy"], seeds=[0, 1], data=toy_splits,
                               device="cpu", progress=False)
    table = improvement_table(rows)
    assert list(table.index) == ["Random", "Entropy", "Core-set"]
    assert "3D DSC p" in table.columns
    assert sampling_time_table(rows).loc["Entropy"].notna().all()
    names = {p.name for p in write_al_report(tmp_path, toy_splits.train)}
    assert {"curves_dsc_3d.png", "improvement.csv", "sampling_time.txt", "chosen_batches.png"} <= names


def test_roi_window_keeps_every_label(colin27):
    top, left = roi_window(colin27, (64, 96))
    for split in ("train", "val", "test"):
        masks = colin27[split].masks
        assert (masks[:, top:top + 64, left:left + 96] > 0).sum() == (masks > 0).sum()
    with pytest.raises(ValueError, match="cut off"):
        roi_window(colin27, (16, 16))


def test_teaching_preset_pool(colin27):
    config, seeds = preset_config("teaching")
    data = al.prepare_data(config)
    assert len(data.train) == 84
    assert data.train.image_size == (64, 96)
    assert sum(al._has_target(data.train, range(84))) == 18
    assert seeds >= 1
    thesis, thesis_seeds = preset_config("thesis")
    assert thesis.train.steps == 18_750 and thesis_seeds == 5 and thesis.budget == 10 and thesis.initial == 10


# --- command line ----------------------------------------------------------------------------

def test_al_help_lists_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["al", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("--stochastic-batches", "--preset", "18750", "default: 10"):
        assert word in text


def test_al_command_bad_input(tmp_path, capsys, colin27):
    assert main(["al", "--out", str(tmp_path), "--initial", "500", "--quiet"]) == 2
    assert "larger than the training split" in capsys.readouterr().err
    assert main(["al", "--out", str(tmp_path), "--roi", "64by96", "--quiet"]) == 2
    assert "Invalid --roi" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["al", "--out", str(tmp_path), "--strategy", "bald"])


def test_al_command_writes_results(tmp_path, colin27, capsys):
    out = tmp_path / "run"
    args = ["al", "--out", str(out), "--strategy", "random", "entropy", "--stochastic-batches", "without",
            "--cycles", "2", "--seeds", "1", "--steps", "2", "--width", "4", "--device", "cpu", "--quiet"]
    assert main(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 2 * 2
    assert {r["n_labelled"] for r in rows} == {10, 20}
    assert (out / "curves_dsc_3d.png").exists()
    assert (out / "improvement.txt").exists()
    assert "main comparison" in capsys.readouterr().out
    assert main(args) == 0  # a finished run is resumed, not recomputed
    assert json.loads((out / "results.json").read_text())["rows"] == rows
