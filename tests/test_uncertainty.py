import math

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.stats
import torch

from medseg_nbdev.unet import UNet, mc_dropout
from medseg_nbdev.uncertainty import (MEASURES, SampleStatistics, check_probabilities, ensemble_sampler, entropy,
                                      image_scores, jsd, mc_dropout_sampler, mutual_information, predictive_entropy,
                                      score_pool, single_pass, tta_sampler, variance, weighted_jsd)


def random_samples(k=5, n=2, c=3, h=4, w=6, seed=0):
    "K Dirichlet-distributed probability maps, (K, N, C, H, W)."
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(c), size=(k, n, h, w)).transpose(0, 1, 4, 2, 3)


def scipy_entropy_map(p):
    return scipy.stats.entropy(p, axis=-3)


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet(n_classes=3, width=4, depth=2).eval()


def test_entropy_matches_scipy():
    p = random_samples(k=1)[0]
    np.testing.assert_allclose(entropy(p), scipy_entropy_map(p), atol=1e-12)
    vectors = np.random.default_rng(1).dirichlet(np.ones(5), size=7)
    np.testing.assert_allclose(entropy(vectors, dim=-1), scipy.stats.entropy(vectors, axis=-1), atol=1e-12)


def test_entropy_torch_input_stays_torch():
    p = torch.softmax(torch.randn(2, 3, 4, 4), 1)
    out = entropy(p)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 4, 4)


def test_entropy_extremes():
    assert entropy([1.0, 0.0, 0.0], dim=-1) == pytest.approx(0.0)
    assert entropy([0.25] * 4, dim=-1) == pytest.approx(math.log(4))


def test_jsd_matches_scipy_jensenshannon_squared():
    rng = np.random.default_rng(2)
    for _ in range(5):
        p, q = rng.dirichlet(np.ones(4), size=2)
        expected = scipy.spatial.distance.jensenshannon(p, q) ** 2  # natural logarithm
        assert jsd(np.stack([p, q]), dim=-1) == pytest.approx(expected, abs=1e-12)


def test_jsd_of_k_maps_matches_scipy_entropies():
    samples = random_samples(k=8)
    expected = scipy_entropy_map(samples.mean(0)) - scipy.stats.entropy(samples, axis=-3).mean(0)
    np.testing.assert_allclose(jsd(samples), expected, atol=1e-12)
    np.testing.assert_allclose(mutual_information(samples), expected, atol=1e-12)


def test_predictive_entropy_and_variance():
    samples = random_samples()
    np.testing.assert_allclose(predictive_entropy(samples), scipy_entropy_map(samples.mean(0)), atol=1e-12)
    np.testing.assert_allclose(variance(samples), samples.var(axis=0).mean(axis=-3), atol=1e-12)


def test_mutual_information_non_negative():
    assert (mutual_information(random_samples(seed=3)) >= -1e-12).all()


def test_weighted_jsd_follows_published_formula():
    samples = random_samples(k=4, seed=4)
    mean_entropy = scipy.stats.entropy(samples, axis=-3).mean(0)
    total = scipy_entropy_map(samples.mean(0))
    for a in (0.0, 0.25, 0.5, 0.75, 1.0):
        np.testing.assert_allclose(weighted_jsd(samples, a), a * total - (1 - a) * mean_entropy, atol=1e-12)


def test_weighted_jsd_sign():
    p = np.array([0.7, 0.2, 0.1])
    same = np.stack([p, p, p])
    h = scipy.stats.entropy(p)
    # identical views: JSD is 0 and the published (subtracting) formula gives (2a - 1) H(P)
    assert jsd(same, dim=-1) == pytest.approx(0.0, abs=1e-12)
    assert weighted_jsd(same, 0.75, dim=-1) == pytest.approx(0.5 * h)
    # adding the two terms instead would give H(P) at any a
    assert weighted_jsd(same, 0.75, dim=-1) != pytest.approx(h)
    assert weighted_jsd(same, 0.0, dim=-1) == pytest.approx(-h)
    assert (weighted_jsd(random_samples(seed=5), 0.0) <= 0).all()


def test_weighted_jsd_special_cases():
    samples = random_samples(seed=6)
    np.testing.assert_allclose(weighted_jsd(samples, 0.5), jsd(samples) / 2, atol=1e-12)
    np.testing.assert_allclose(weighted_jsd(samples, 1.0), predictive_entropy(samples), atol=1e-12)


@pytest.mark.parametrize("a", [-0.1, 1.5])
def test_weighted_jsd_rejects_weight_outside_unit_interval(a):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        weighted_jsd(random_samples(), a)


@pytest.mark.parametrize("bad, message", [
    ([0.5, float("nan")], "NaN"),
    ([1.5, -0.5], "negative"),
    ([0.2, 0.2], "sum to 1"),
])
def test_check_probabilities_rejects_bad_input(bad, message):
    with pytest.raises(ValueError, match=message):
        check_probabilities(torch.tensor(bad), dim=-1)


def test_sample_measures_need_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        jsd(random_samples(k=1))


def test_sample_statistics_match_stacked_formulas():
    samples = torch.as_tensor(random_samples(k=7, seed=7), dtype=torch.float32)
    stats = SampleStatistics()
    for p in samples:
        stats.update(p)
    torch.testing.assert_close(stats.variance(), variance(samples), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats.predictive_entropy(), predictive_entropy(samples), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats.jsd(), jsd(samples), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats.weighted_jsd(0.75), weighted_jsd(samples, 0.75), atol=1e-6, rtol=0)
    for name in MEASURES[1:]:
        assert stats.measure(name).shape == (2, 4, 6)


def test_sample_statistics_valid_is_intersection():
    p = torch.full((1, 2, 2, 2), 0.5)
    stats = SampleStatistics()
    stats.update(p, torch.tensor([[[True, True], [True, False]]]))
    stats.update(p, torch.tensor([[[True, False], [True, True]]]))
    assert stats.valid.tolist() == [[[True, False], [True, False]]]


def test_sample_statistics_rejects_changed_shape():
    stats = SampleStatistics().update(torch.full((1, 2, 2, 2), 0.5))
    with pytest.raises(ValueError, match="differs"):
        stats.update(torch.full((1, 2, 3, 2), 0.5))


def test_image_scores_average_valid_pixels():
    maps = torch.tensor([[[1.0, 2.0], [3.0, 10.0]]])
    assert image_scores(maps).tolist() == [4.0]
    assert image_scores(maps, torch.tensor([[[True, True], [True, False]]])).tolist() == [2.0]
    with pytest.raises(ValueError, match="no pixel valid"):
        image_scores(maps, torch.zeros(1, 2, 2, dtype=torch.bool))


def test_score_pool_dropout_matches_stacked(tiny_unet):
    pool = torch.rand(7, 1, 24, 20)
    online = score_pool(tiny_unet, pool, "jsd", mc_dropout_sampler(5), batch_size=7, seed=11)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(11)
        with mc_dropout(tiny_unet):
            stacked = torch.stack([tiny_unet(pool).softmax(1) for _ in range(5)])
    np.testing.assert_allclose(online, jsd(stacked).mean((1, 2)).numpy(), atol=1e-5)


def test_score_pool_entropy_independent_of_batch_size(tiny_unet):
    pool = torch.rand(9, 20, 20)
    np.testing.assert_allclose(score_pool(tiny_unet, pool, batch_size=2), score_pool(tiny_unet, pool, batch_size=9),
                               atol=1e-6)


def test_score_pool_is_reproducible(tiny_unet):
    pool = torch.rand(4, 1, 16, 16)
    first = score_pool(tiny_unet, pool, "jsd", tta_sampler(4), seed=3)
    second = score_pool(tiny_unet, pool, "jsd", tta_sampler(4), seed=3)
    np.testing.assert_array_equal(first, second)


def test_tta_without_rotation_or_noise_agrees(tiny_unet):
    scores = score_pool(tiny_unet, torch.rand(3, 1, 16, 16), "jsd", tta_sampler(4, max_degrees=0, noise_std=0))
    np.testing.assert_allclose(scores, 0.0, atol=1e-6)


def test_tta_views_map_back_and_mark_corners(tiny_unet):
    images = torch.rand(2, 1, 32, 32)
    views = list(tta_sampler(3)(tiny_unet, images, torch.Generator().manual_seed(0)))
    assert len(views) == 3
    valid = views[0][1] & views[1][1] & views[2][1]
    assert valid[:, 16, 16].all()
    assert not valid[:, 0, 0].any()
    for probs, mask in views:
        sums = probs.sum(1)[mask]
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-4, rtol=0)


def test_ensemble_sampler_uses_every_member():
    members = [UNet(n_classes=2, width=4, depth=2).eval() for _ in range(3)]
    scores = score_pool(members[0], torch.rand(2, 16, 16), "jsd", ensemble_sampler(members))
    assert scores.shape == (2,) and (scores > 0).all()
    with pytest.raises(ValueError, match="at least 2 models"):
        ensemble_sampler(members[:1])


def test_score_pool_bad_input(tiny_unet):
    with pytest.raises(ValueError, match="empty"):
        score_pool(tiny_unet, torch.rand(0, 16, 16))
    with pytest.raises(ValueError, match="Unknown uncertainty measure"):
        score_pool(tiny_unet, torch.rand(2, 16, 16), "margin")
    with pytest.raises(ValueError, match="at least 2"):
        score_pool(tiny_unet, torch.rand(2, 16, 16), "jsd", single_pass())
    with pytest.raises(ValueError, match="shape"):
        score_pool(tiny_unet, torch.rand(16, 16))


def test_score_pool_rejects_nan_probabilities():
    class NanModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.full((x.shape[0], 2, *x.shape[2:]), float("nan"))

    with pytest.raises(ValueError, match="NaN"):
        score_pool(NanModel(), torch.rand(2, 8, 8))
