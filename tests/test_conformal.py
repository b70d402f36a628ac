"""Split conformal prediction, conformal risk control with the FNR loss, and ConSeMa:
exact calibration, the finite-sample rules, bad input, and the guarantees on i.i.d. data."""
import math

import numpy as np
import pytest
from scipy import ndimage

from medseg_nbdev.conformal import (CROSS, alpha_star, calibrate_consema, calibrate_crc, check_alpha,
                                    conformal_quantile, conformal_rank, consema_scores, crc_lambda_hat,
                                    crc_lambda_hat_grid, dilate, dilation_steps, empirical_fnr, fnr_loss,
                                    foreground_dilation_steps, foreground_scores, has_foreground,
                                    load_conformal_data, min_calibration_size, prediction_set, set_metrics)


def public_code_quantile(scores, alpha):
    "ConSeMa's public indexing, kept here to test the difference: rank ceil((1 - alpha)(n + 1)) used 0-based."
    k = int(np.ceil((1.0 - alpha) * (len(scores) + 1)))
    return sorted(scores)[k]


def brute_force_lambda(scores, alpha):
    "inf{lambda : R_n(lambda) <= alpha*} by evaluating the risk at 0 and at every score."
    target = alpha_star(alpha, len(scores))
    candidates = np.unique(np.concatenate([[0.0], *scores]))
    feasible = [c for c in candidates if empirical_fnr(scores, c).mean() <= target + 1e-12]
    return float(min(feasible))


def random_maps(rng, n, size=16):
    "Random probability maps and non-empty masks with a loose relation between them."
    masks = np.zeros((n, size, size), bool)
    probs = np.empty((n, size, size))
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx, r = rng.uniform(4, size - 4), rng.uniform(4, size - 4), rng.uniform(2, 5)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
        masks[i, int(cy), int(cx)] = True
        signed = r - np.hypot(yy - cy - rng.normal(0, 1), xx - cx - rng.normal(0, 1))
        probs[i] = 1 / (1 + np.exp(-1.5 * signed + rng.normal(0, 0.5, (size, size))))
    return probs, masks


def test_conformal_rank_and_quantile():
    scores = [0.12, 0.55, 0.31, 0.87, 0.05, 0.64, 0.40, 0.22, 0.73]
    assert conformal_rank(9, 0.2) == 8
    assert conformal_quantile(scores, 0.2) == 0.73
    assert conformal_quantile(scores, 0.1) == 0.87
    assert conformal_rank(9, 0.7) == 3  # 10 * (1 - 0.7) is 3.0000000000000004 in floating point
    assert conformal_rank(19, 0.05) == 19
    with pytest.raises(ValueError, match="at least 19 calibration images"):
        conformal_quantile(scores, 0.05)


def test_public_code_quantile_is_one_rank_higher():
    scores = list(range(1, 20))  # n = 19
    for alpha in (0.5, 0.3, 0.2):
        k = conformal_rank(19, alpha)
        assert conformal_quantile(scores, alpha) == k
        assert public_code_quantile(scores, alpha) == k + 1
    # rank k = n is valid for conformal_quantile, but the public indexing runs off the end
    assert conformal_quantile(scores, 0.05) == 19
    with pytest.raises(IndexError):
        public_code_quantile(scores, 0.05)


def test_split_conformal_coverage_rate():
    rng = np.random.default_rng(0)
    n, alpha, trials = 9, 0.2, 100_000
    draws = rng.random((trials, n + 1))
    calibration = np.sort(draws[:, :n], axis=1)
    k = conformal_rank(n, alpha)
    covered = (draws[:, n] <= calibration[:, k - 1]).mean()
    public = (draws[:, n] <= calibration[:, k]).mean()
    standard_error = math.sqrt(0.2 * 0.8 / trials)
    assert abs(covered - k / (n + 1)) < 4 * standard_error
    assert abs(public - (k + 1) / (n + 1)) < 4 * standard_error


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_alpha_outside_open_interval_is_rejected(alpha):
    with pytest.raises(ValueError, match="open interval"):
        check_alpha(alpha)


def test_alpha_star_and_minimum_calibration_size():
    assert alpha_star(0.1, 20) == pytest.approx(0.055, abs=1e-12)
    assert alpha_star(0.05, 19) == 0.0
    assert min_calibration_size(0.05) == 19
    assert min_calibration_size(0.2) == 4
    assert min_calibration_size(0.1, bound=2.0) == 19
    with pytest.raises(ValueError, match="at least 19 images"):
        alpha_star(0.05, 18)
    with pytest.raises(ValueError, match="empty"):
        alpha_star(0.1, 0)


def test_crc_lambda_hat_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(150):
        n = int(rng.integers(5, 25))
        scores = [np.round(rng.random(int(rng.integers(1, 30))), int(rng.integers(1, 4))) for _ in range(n)]
        alpha = rng.uniform(1 / (n + 1), 0.6)
        assert crc_lambda_hat(scores, alpha) == brute_force_lambda(scores, alpha)


def test_crc_lambda_hat_is_tighter_than_grid():
    rng = np.random.default_rng(2)
    for _ in range(100):
        n = int(rng.integers(10, 30))
        scores = [rng.random(int(rng.integers(1, 60))) ** 3 for _ in range(n)]
        alpha = rng.uniform(1 / (n + 1), 0.5)
        exact = crc_lambda_hat(scores, alpha)
        grid = crc_lambda_hat_grid(scores, alpha, n_grid=1000)
        assert exact <= grid
        assert grid - exact < 1 / 999 + 1e-12  # the grid stops at the first grid point at or after lambda_hat
        assert empirical_fnr(scores, exact).mean() <= alpha_star(alpha, n) + 1e-12


def test_split_conformal_as_crc():
    rng = np.random.default_rng(3)
    scores = rng.random(30)
    for alpha in (0.05, 0.1, 0.2, 0.5):
        assert crc_lambda_hat([[s] for s in scores], alpha) == conformal_quantile(scores, alpha)


def test_crc_lambda_hat_zero_when_certain_pixels_suffice():
    # n = 1 and alpha = 0.75 give alpha* = 0.5; the pixel with S = 1 (score 0) covers half the structure
    assert crc_lambda_hat([np.array([0.0, 0.5])], 0.75) == 0.0
    assert crc_lambda_hat([np.array([0.1, 0.5])], 0.75) == 0.1


def test_prediction_set_keeps_the_pixel_that_defines_lambda():
    probs = np.array([[0.3, 0.9], [0.1, 0.05]])
    mask = np.array([[1, 1], [0, 0]])
    lambda_hat = calibrate_crc(probs[None], mask[None], alpha=0.5)  # alpha* = 0: cover both pixels
    assert lambda_hat == 1 - 0.3
    assert prediction_set(probs, lambda_hat)[0, 0]
    assert not (probs >= 1 - lambda_hat)[0, 0]  # 1 - (1 - 0.3) is 0.30000000000000004
    assert fnr_loss(prediction_set(probs, lambda_hat), mask) == 0.0


def test_fnr_loss_and_foreground_scores():
    probs = np.array([[0.9, 0.8, 0.3], [0.1, 0.6, 0.05]])
    mask = np.array([[1, 1, 1], [0, 1, 0]])
    assert np.allclose(foreground_scores(probs[None], mask[None])[0], [0.1, 0.2, 0.4, 0.7])
    assert fnr_loss(probs >= 0.7, mask) == 0.5
    assert has_foreground(np.stack([mask, 0 * mask])).tolist() == [True, False]


@pytest.mark.parametrize("probs, message", [
    (np.full((1, 4, 4), 1.5), "must lie in \\[0, 1\\]"),
    (np.full((1, 4, 4), -0.1), "must lie in \\[0, 1\\]"),
    (np.full((1, 4, 4), np.nan), "NaN"),
    (np.full((1, 4, 5), 0.5), "differs from the probability map shape"),
])
def test_calibrate_crc_rejects_bad_maps(probs, message):
    mask = np.zeros((1, 4, 4), int)
    mask[0, 1, 1] = 1
    with pytest.raises(ValueError, match=message):
        calibrate_crc(probs, mask, 0.5)


def test_calibrate_crc_rejects_empty_and_non_binary_masks():
    probs = np.full((2, 4, 4), 0.5)
    masks = np.zeros((2, 4, 4), int)
    masks[0, 1, 1] = 1
    with pytest.raises(ValueError, match=r"images \[1\]"):
        calibrate_crc(probs, masks, 0.5)
    with pytest.raises(ValueError, match="binary"):
        calibrate_crc(probs, masks * 2 + 0, 0.5)
    with pytest.raises(ValueError, match="undefined"):
        fnr_loss(probs[0] > 0.4, masks[1])
    with pytest.raises(ValueError, match="open interval"):
        calibrate_crc(probs[:1], masks[:1], 0.0)


def test_crc_bounds_expected_fnr_on_iid_images():
    rng = np.random.default_rng(4)
    n, alpha, trials = 19, 0.2, 600
    fnr = []
    for _ in range(trials):
        probs, masks = random_maps(rng, n + 1)
        lambda_hat = calibrate_crc(probs[:n], masks[:n], alpha)
        fnr.append(fnr_loss(prediction_set(probs[n], lambda_hat), masks[n]))
    mean, standard_error = np.mean(fnr), np.std(fnr) / math.sqrt(trials)
    # tolerance: 3 Monte Carlo standard errors
    assert mean <= alpha + 3 * standard_error
    assert mean >= alpha - 2 / (n + 1) - 3 * standard_error


def test_dilation_steps_match_iterated_dilation():
    rng = np.random.default_rng(5)
    for _ in range(20):
        mask = rng.random((30, 25)) > 0.97
        mask[15, 12] = True
        steps = dilation_steps(mask)
        for d in (1, 2, 5):
            assert (dilate(mask, d) == ndimage.binary_dilation(mask, CROSS, iterations=d)).all()
            assert ((steps <= d) == dilate(mask, d)).all()
    assert np.isinf(dilation_steps(np.zeros((4, 4), bool))).all()
    assert dilate(np.zeros((4, 4), bool), math.inf).all()
    with pytest.raises(ValueError, match="non-negative integer"):
        dilate(mask, -1)


def test_consema_scores_with_coverage_ratio():
    pred = np.zeros((1, 9, 9), bool)
    pred[0, 4, 4] = True
    truth = np.zeros((1, 9, 9), bool)
    truth[0, 3, 4] = truth[0, 5, 4] = truth[0, 4, 3] = truth[0, 4, 5] = truth[0, 0, 4] = True
    steps = foreground_dilation_steps(pred, truth)
    assert steps[0].tolist() == [1, 1, 1, 1, 4]
    assert consema_scores(steps).tolist() == [4]
    assert consema_scores(steps, 0.8).tolist() == [1]
    assert consema_scores(steps, 0.81).tolist() == [4]
    assert consema_scores(foreground_dilation_steps(np.zeros_like(pred), truth)).tolist() == [math.inf]
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        consema_scores(steps, 1.2)


def test_calibrate_consema_uses_the_conformal_rank():
    rng = np.random.default_rng(6)
    probs, masks = random_maps(rng, 19)
    predicted = probs >= 0.5
    scores = consema_scores(foreground_dilation_steps(predicted, masks))
    for alpha in (0.1, 0.2, 0.3):
        k = conformal_rank(19, alpha)
        assert calibrate_consema(predicted, masks, alpha) == np.sort(scores)[k - 1]
    assert calibrate_consema(predicted, masks, 0.05) == scores.max()


def test_consema_containment_rate():
    rng = np.random.default_rng(7)
    n, alpha, trials = 19, 0.2, 400
    missed, fnr = [], []
    for _ in range(trials):
        probs, masks = random_maps(rng, n + 1)
        predicted = probs >= 0.5
        d_hat = calibrate_consema(predicted[:n], masks[:n], alpha)
        covered = dilate(predicted[n], d_hat)
        fnr.append(fnr_loss(covered, masks[n]))
        missed.append(fnr[-1] > 0)
    standard_error = math.sqrt(alpha * (1 - alpha) / trials)
    assert np.mean(missed) <= alpha + 3 * standard_error
    assert np.mean(fnr) <= alpha + 3 * standard_error


def test_set_metrics():
    c = np.zeros((10, 10), bool)
    c[2:7, 2:7] = True
    y = np.zeros_like(c)
    y[2:6, 2:6] = True
    y_hat = np.zeros_like(c)
    y_hat[3:6, 3:6] = True
    metrics = set_metrics(c, y, y_hat, (1.0, 1.0))
    assert metrics["coverage"] == 1.0
    assert metrics["stretch"] == pytest.approx(25 / 9)
    assert metrics["dsc"] == pytest.approx(32 / 41)
    assert math.isnan(set_metrics(c, y, np.zeros_like(c))["stretch"])


def test_conformal_pool_of_colin27(colin27):
    data = load_conformal_data("colin27-hippocampus")
    assert len(data.train) == 15
    assert len(data.pool) == 34
    assert data.n_empty == 14
    assert data.n_small == 5
    assert (data.pool.masks.reshape(34, -1).sum(1) >= 50).all()
    every_slice = load_conformal_data("colin27-hippocampus", min_foreground=1)
    assert len(every_slice.pool) == 39
    assert has_foreground(every_slice.pool.masks).all()
    with pytest.raises(ValueError, match="at least 1 pixel"):
        load_conformal_data("colin27-hippocampus", min_foreground=0)
    assert data.pool.class_names == ("hippocampus",)
    train = {m.index for m in data.train.meta}
    pool = {m.index for m in data.pool.meta}
    assert not train & pool
    assert all(m.axis == "sagittal" for m in data.pool.meta)
