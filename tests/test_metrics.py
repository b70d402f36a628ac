import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from medseg_nbdev.data import SliceMeta
from medseg_nbdev.metrics import (assd, coverage, dice_score, hd95, image_diagonal, paired_permutation_test,
                                  segmentation_report, stack_volumes, stretch, surface_distances)

warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
monai_metrics = pytest.importorskip("monai.metrics")
medpy_binary = pytest.importorskip("medpy.metric.binary")


def random_shape(rng, shape):
    grid = np.indices(shape)
    mask = np.zeros(shape, bool)
    for _ in range(rng.integers(1, 4)):
        centre = [rng.uniform(0.2 * s, 0.8 * s) for s in shape]
        radii = [rng.uniform(0.05 * s, 0.3 * s) for s in shape]
        mask |= sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1
    if rng.random() < 0.3:  # speckle of isolated false positives, the case HD95 exists for
        mask |= rng.random(shape) > 0.995
    return mask


def onehot(mask):
    return torch.from_numpy(np.stack([~mask, mask])[None].astype(np.float32))


CASES = [(seed, (40, 52) if seed % 2 else (18, 26, 22)) for seed in range(24)]


@pytest.mark.parametrize("seed,shape", CASES)
def test_distances_match_monai(seed, shape):
    rng = np.random.default_rng(seed)
    x, y = random_shape(rng, shape), random_shape(rng, shape)
    spacing = tuple(rng.uniform(0.4, 2.5, len(shape)))
    expected_hd95 = monai_metrics.compute_hausdorff_distance(onehot(x), onehot(y), percentile=95,
                                                             spacing=spacing).item()
    expected_assd = monai_metrics.compute_average_surface_distance(onehot(x), onehot(y), symmetric=True,
                                                                   spacing=spacing).item()
    assert hd95(x, y, spacing) == pytest.approx(expected_hd95, rel=1e-5, abs=1e-5)
    assert assd(x, y, spacing) == pytest.approx(expected_assd, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("seed,shape", CASES)
def test_distances_match_medpy(seed, shape):
    rng = np.random.default_rng(1000 + seed)
    x, y = random_shape(rng, shape), random_shape(rng, shape)
    spacing = tuple(rng.uniform(0.4, 2.5, len(shape)))
    d_xy, d_yx = surface_distances(x, y, spacing)
    assert d_xy.mean() == pytest.approx(medpy_binary.asd(x, y, voxelspacing=spacing), rel=1e-9)
    assert d_yx.mean() == pytest.approx(medpy_binary.asd(y, x, voxelspacing=spacing), rel=1e-9)
    assert hd95(x, y, spacing, percentile=100) == pytest.approx(medpy_binary.hd(x, y, voxelspacing=spacing))
    assert dice_score(x, y) == pytest.approx(medpy_binary.dc(x, y))


def test_distances_symmetric_and_zero_on_identity():
    rng = np.random.default_rng(7)
    x, y = random_shape(rng, (30, 30)), random_shape(rng, (30, 30))
    assert hd95(x, y) == hd95(y, x)
    assert assd(x, y) == pytest.approx(assd(y, x))
    assert hd95(x, x) == 0.0
    assert assd(x, x) == 0.0


def test_empty_mask_conventions():
    empty = np.zeros((10, 20), bool)
    full = empty.copy()
    full[2:5, 3:9] = True
    diagonal = math.sqrt((10 * 0.5) ** 2 + (20 * 2.0) ** 2)
    assert image_diagonal((10, 20), (0.5, 2.0)) == pytest.approx(diagonal)
    assert hd95(empty, empty) == 0.0
    assert assd(empty, empty) == 0.0
    assert hd95(full, empty, (0.5, 2.0)) == pytest.approx(diagonal)
    assert assd(empty, full, (0.5, 2.0)) == pytest.approx(diagonal)
    assert dice_score(empty, empty) == 1.0
    assert math.isnan(dice_score(empty, empty, empty=float("nan")))
    assert coverage(full, empty) == 1.0
    assert stretch(full, empty) == math.inf
    assert stretch(empty, empty) == 1.0


def test_metric_input_errors():
    a = np.zeros((4, 4), bool)
    with pytest.raises(ValueError, match="differs"):
        dice_score(a, np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="binary mask"):
        hd95(a.astype(int) + 2, a)
    with pytest.raises(ValueError, match="spacing"):
        assd(a, a, spacing=(1.0, 1.0, 1.0))


def test_stack_volumes_places_slices_at_their_index():
    meta = [SliceMeta("a", "coronal", k, (1.0, 1.0), 1.5) for k in (3, 5)] + [SliceMeta("b", "axial", 0, (2.0, 2.0), 1.0)]
    slices = np.ones((3, 2, 2), int)
    volumes = stack_volumes(slices, meta)
    assert volumes["a"][0][:, 0, 0].tolist() == [1, 0, 1]
    assert volumes["a"][1] == (1.5, 1.0, 1.0)
    assert volumes["b"][0].shape == (1, 2, 2)
    with pytest.raises(ValueError, match="duplicated"):
        stack_volumes(slices[:2], [meta[0], meta[0]])


def test_report_3d_dice_uses_the_whole_volume():
    pred = np.zeros((3, 8, 8), int)
    target = pred.copy()
    pred[0, 2:4, 2:4] = 1  # 4 false-positive pixels on a slice with empty reference
    target[1:, 2:6, 2:6] = 1
    pred[1:, 2:6, 2:6] = 1
    meta = [SliceMeta("v", "axial", k, (1.0, 1.0), 1.0) for k in range(3)]
    report = segmentation_report(pred, target, meta, ("x",))
    assert report["dsc_2d"] == pytest.approx((0.0 + 1 + 1) / 3)
    assert report["dsc_3d"] == pytest.approx(2 * 32 / (36 + 32))
    assert report["n_volumes"] == 1


def test_permutation_test_matches_scipy_exact():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.8, 0.1, 10), rng.normal(0.75, 0.1, 10)
    for alternative in ("two-sided", "greater", "less"):
        ours = paired_permutation_test(a, b, alternative=alternative)
        theirs = stats.permutation_test((a, b), lambda x, y: np.mean(x - y), permutation_type="samples",
                                        n_resamples=np.inf, alternative=alternative)
        assert ours["exact"]
        assert ours["p_value"] == pytest.approx(theirs.pvalue, abs=1e-12)


def test_permutation_test_monte_carlo_close_to_exact():
    rng = np.random.default_rng(4)
    a, b = rng.normal(0.8, 0.1, 18), rng.normal(0.76, 0.1, 18)
    exact = paired_permutation_test(a, b, max_exact=18)["p_value"]
    sampled = paired_permutation_test(a, b, max_exact=10, n_permutations=20_000, seed=1)
    assert not sampled["exact"]
    assert sampled["p_value"] == pytest.approx(exact, abs=0.01)


def test_permutation_test_is_calibrated_under_the_null():
    rng = np.random.default_rng(5)
    p_values = [paired_permutation_test(rng.normal(size=12), rng.normal(size=12))["p_value"] for _ in range(300)]
    rejection = np.mean(np.array(p_values) <= 0.05)
    assert rejection <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 300)
