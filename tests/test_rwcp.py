"""RW-CP: feature extractors and their disk cache, the chunked k-NN graph, the transition
matrix and the diffusion, the three-method evaluation, validity over random splits, the
`medseg conformal` command, and the set-size analysis of Appendix I."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medseg_nbdev import rwcp
from medseg_nbdev.cli import main
from medseg_nbdev.core import set_seed
from medseg_nbdev.foundation import image_digest, load_promptable_model
from medseg_nbdev.set_size import calibration_spread, level_set_integral, set_size_curve, set_size_derivative
from medseg_nbdev.rwcp import (ConformalScores, DinoFeatures, EfficientNetLite0Features, IntensityPositionFeatures,
                               LiteMedSAMFeatures, RandomWalkConfig, diffuse, evaluate_split, get_feature_extractor,
                               knn_cosine, random_splits, results_table, rw_diffusion, summarise, to_grid,
                               transition_from_neighbours, transition_matrix, validity_study, validity_summary)


def synthetic_pool(n=60, size=24, seed=0):
    "Blob masks with noisy probability maps and, as the 'diffused' map, a Gaussian-smoothed copy."
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), bool)
    probs = np.empty((n, size, size))
    for i in range(n):
        cy, cx, r = rng.uniform(7, size - 7), rng.uniform(7, size - 7), rng.uniform(2.5, 6)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
        signed = r - np.hypot(yy - cy - rng.normal(0, 1.5), xx - cx - rng.normal(0, 1.5))
        probs[i] = 1 / (1 + np.exp(-2.0 * signed + rng.normal(0, 1.0, (size, size))))
    smoothed = np.stack([ndimage.gaussian_filter(p, 1.5) for p in probs])
    return ConformalScores.build(probs, smoothed, masks)


def test_knn_cosine_matches_full_similarity_for_any_chunk():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(16, 9, 11, generator=generator)
    unit = F.normalize(features.reshape(16, -1).T, dim=1)
    full = (unit @ unit.T).topk(6, dim=1)
    for chunk in (1, 7, 99, 10_000):
        indices, distances = knn_cosine(features, k=6, chunk_size=chunk)
        assert torch.equal(indices, full.indices)
        assert torch.allclose(distances, 1 - full.values, atol=1e-6)
    assert torch.equal(indices[:, 0], torch.arange(99))  # each position is its own nearest neighbour


def test_knn_cosine_rejects_bad_input():
    features = torch.randn(20, 4)
    with pytest.raises(ValueError, match="only 20 positions"):
        knn_cosine(features, k=21)
    zeroed = features.clone()
    zeroed[[2, 7]] = 0
    with pytest.raises(ValueError, match=r"2 of 20 feature vectors are zero \(positions \[2, 7\]\)"):
        knn_cosine(zeroed, k=3)
    broken = features.clone()
    broken[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        knn_cosine(broken, k=3)


def test_transition_matrix_rows_and_limits():
    features = torch.randn(8, 6, 7, generator=torch.Generator().manual_seed(1))
    matrix = transition_matrix(features, k=5, beta=50.0)
    assert matrix.shape == (42, 42)
    assert matrix.nnz == 42 * 5
    assert np.allclose(matrix.sum(axis=1), 1.0)
    assert (matrix.data >= 0).all()
    assert np.allclose(transition_matrix(features, k=5, beta=0.0).data, 0.2)
    assert np.allclose(transition_matrix(features, k=5, beta=1e7).toarray(), np.eye(42))
    with pytest.raises(ValueError, match="non-negative"):
        transition_matrix(features, k=5, beta=-1.0)


def test_transition_weights_by_hand():
    indices = np.array([[0, 1], [1, 0]])
    distances = np.array([[0.0, 0.2], [0.0, 0.2]])
    matrix = transition_from_neighbours(indices, distances, beta=5.0).toarray()
    w = math.exp(-1.0)
    assert np.allclose(matrix, [[1 / (1 + w), w / (1 + w)], [w / (1 + w), 1 / (1 + w)]])


def test_diffusion_preserves_range_and_constants():
    features = torch.randn(8, 10, 10, generator=torch.Generator().manual_seed(2))
    matrix = transition_matrix(features, k=8, beta=2.0)
    values = np.random.default_rng(0).random((10, 10))
    out = diffuse(matrix, values, 25)
    assert out.shape == (10, 10)
    assert out.min() >= values.min() - 1e-12
    assert out.max() <= values.max() + 1e-12
    assert out.std() < values.std()
    assert np.allclose(diffuse(matrix, np.full((10, 10), 0.4), 25), 0.4)
    assert np.array_equal(diffuse(matrix, values, 0), values)
    with pytest.raises(ValueError, match="100 columns"):
        diffuse(matrix, np.zeros(7), 1)


def test_rw_diffusion_resamples_between_grids():
    rng = np.random.default_rng(3)
    probs = rng.random((2, 32, 24))
    features = torch.randn(2, 6, 16, 12, generator=torch.Generator().manual_seed(3))
    out = rw_diffusion(probs, features, RandomWalkConfig(k=4, n_step=0))
    assert np.allclose(out, to_grid(to_grid(probs, (16, 12)), (32, 24)).numpy())
    smoothed = rw_diffusion(probs, features, RandomWalkConfig(k=10, beta=1.0, n_step=30))
    assert smoothed.shape == probs.shape
    assert smoothed.min() >= 0
    assert smoothed.max() <= 1
    with pytest.raises(ValueError, match="must lie in"):
        rw_diffusion(probs * 2, features)
    with pytest.raises(ValueError, match="only 192 positions"):
        rw_diffusion(probs, features, RandomWalkConfig(k=193))


def test_intensity_position_features_approximate_a_gaussian_kernel():
    control = IntensityPositionFeatures(n_features=4096, sigma_position=2.0, sigma_intensity=0.1)
    image = np.full((1, 64, 64), 0.5, np.float32)
    image[0, :, 32:] = 0.7  # two intensities, two sigma_I apart
    z = control.features(image)
    assert z.shape == (1, 4096, 64, 64)
    assert torch.allclose(z.norm(dim=1), torch.ones(1, 64, 64), atol=1e-5)
    assert float(z[0, :, 5, 5] @ z[0, :, 5, 7]) == pytest.approx(math.exp(-0.5), abs=0.03)
    assert float(z[0, :, 5, 31] @ z[0, :, 5, 32]) == pytest.approx(math.exp(-0.125 - 2.0), abs=0.03)


def test_feature_cache_is_reused_and_recovers_from_damage(tmp_path):
    extractor = IntensityPositionFeatures(n_features=16)
    extractor.cacheable = True
    images = np.random.default_rng(4).random((3, 40, 40)).astype(np.float32)
    images[2] = images[0]
    first = extractor.features(images, folder=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({f"{image_digest(i)}.pt" for i in images})
    calls = []
    original = extractor.extract
    extractor.extract = lambda x: calls.append(len(x)) or original(x)
    assert torch.equal(extractor.features(images, folder=tmp_path, progress=False), first)
    assert calls == []
    (tmp_path / f"{image_digest(images[1])}.pt").write_bytes(b"not a tensor file")
    assert torch.equal(extractor.features(images, folder=tmp_path, progress=False), first)
    assert calls == [1]
    assert not list(tmp_path.glob(".*.tmp"))


def test_litemedsam_features_crop_to_the_image(data_home):
    model = load_promptable_model("litemedsam", device="cpu")
    extractor = LiteMedSAMFeatures(model)
    images = np.random.default_rng(5).random((1, 100, 128)).astype(np.float32)
    assert extractor.grid_shape((100, 128)) == (50, 64)
    assert extractor.grid_shape((128, 128)) == (64, 64)
    features = extractor.features(images, progress=False)
    assert features.shape == (1, 256, 50, 64)
    assert len(list(data_home.rglob("*.pt"))) == 1  # one cached embedding per image
    # the crop keeps the grid cells that cover the image: the padded rows 50..63 are dropped
    full = model.encode(images)
    assert torch.allclose(features, full[:, :, :50, :64], atol=1e-5)


def test_efficientnet_features_shape():
    extractor = EfficientNetLite0Features(input_size=256)
    images = np.random.default_rng(6).random((2, 128, 96)).astype(np.float32)
    features = extractor.features(images, cache=False)
    assert features.shape == (2, 152, *extractor.grid_shape((128, 96)))
    assert extractor.grid_shape((128, 96)) == (32, 24)
    assert torch.allclose(features[:, :40].norm(dim=1), torch.ones(2, 32, 24), atol=1e-4)
    with pytest.raises(ValueError, match="multiple of 32"):
        EfficientNetLite0Features(input_size=100)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_dino_features_from_a_tiny_random_model(tmp_path, version):
    from transformers import AutoModel, DINOv3ViTConfig, Dinov2Config
    if version == "v2":
        config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                              patch_size=14, image_size=56)
    else:
        config = DINOv3ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 patch_size=16, image_size=64, num_register_tokens=4)
    set_seed(0)
    AutoModel.from_config(config).save_pretrained(tmp_path / "weights")
    extractor = get_feature_extractor("dino", model=tmp_path / "weights", input_size=128)
    assert extractor.n_prefix == (1 if version == "v2" else 5)
    images = np.random.default_rng(7).random((2, 64, 48)).astype(np.float32)
    features = extractor.features(images, folder=tmp_path / "cache", progress=False)
    assert features.shape == (2, 32, *extractor.grid_shape((64, 48)))
    assert torch.equal(extractor.features(images, folder=tmp_path / "cache", progress=False), features)


def test_dino_features_never_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        DinoFeatures(tmp_path / "missing")
    with pytest.raises(ValueError, match="model=PATH"):
        get_feature_extractor("dino")


def test_evaluate_split_agrees_with_precomputed_fnr():
    pool = synthetic_pool(30)
    calibration, test = random_splits(len(pool), 12, [0])[0]
    results = evaluate_split(pool, calibration, test, 0.2)
    assert set(results) == {"model", "crc", "consema", "rwcp"}
    for method in ("crc", "consema", "rwcp"):
        expected = pool.test_fnr(method, results[method]["parameter"], test)
        assert 1 - results[method]["coverage"] == pytest.approx(expected, abs=1e-12)
    assert results["model"]["parameter"] is None


def test_results_table_rows_and_json_safe_values():
    pool = synthetic_pool(30)
    rows = results_table(pool, (0.2, 0.1), n_cal=12, seeds=(0, 1))
    assert [(r["method"], r["alpha"]) for r in rows] == \
        [("model", None)] + [(m, a) for a in (0.2, 0.1) for m in ("crc", "consema", "rwcp")]
    for row in rows:
        for key in ("coverage", "stretch", "dsc", "assd", "hd95"):
            assert key in row
            assert f"{key}_std" in row
    json.dumps(rows, allow_nan=False)
    infinite = summarise([{"consema": {"coverage": 1.0, "parameter": math.inf}}], 0.1, "consema")
    assert infinite["parameter"] is None
    assert infinite["coverage"] == 1.0
    with pytest.raises(ValueError, match="at least 19 images"):
        results_table(pool, (0.05,), n_cal=12)


def test_validity_over_random_splits():
    # cheaper setting than the notebook: 60 synthetic 24 x 24 images, n = 19, 1000 splits
    pool = synthetic_pool(60)
    n_cal = 19
    study = validity_study(pool, (0.2, 0.1), n_cal, n_splits=1000, seed=1)
    for row in validity_summary(study, n_cal, tolerance=3.0):
        assert row["upper_ok"], row
        if row["method"] != "consema":
            assert row["lower_ok"], row


def test_conformal_command_rejects_small_alpha(capsys):
    assert main(["conformal", "--out", "unused", "--alpha", "0.01", "--extractor", "intensity-position"]) == 2
    assert "at least 99 images" in capsys.readouterr().err


@pytest.mark.parametrize("options, steps, ce_weight", [
    ([], 1000, 0.5),
    (["--preset", "thesis"], 18_750, 1.0),
    (["--preset", "thesis", "--steps", "50"], 50, 1.0),
])
def test_conformal_command_presets(monkeypatch, tmp_path, options, steps, ce_weight):
    seen = {}

    def fake_experiment(dataset, alphas, n_cal, n_seeds, checkpoint, extractor, walk, train_config, **kwargs):
        seen["train_config"] = train_config
        raise RuntimeError("stop after parsing")

    monkeypatch.setattr(rwcp, "conformal_experiment", fake_experiment)
    with pytest.raises(RuntimeError, match="stop after parsing"):
        main(["conformal", "--out", str(tmp_path), "--extractor", "intensity-position", *options])
    assert seen["train_config"].steps == steps
    assert seen["train_config"].ce_weight == ce_weight


def test_conformal_command_on_colin27(colin27, data_home, tmp_path):
    out = tmp_path / "run"
    status = main(["conformal", "--out", str(out), "--alpha", "0.2", "--seeds", "2", "--steps", "4",
                   "--extractor", "intensity-position", "--no-ablations", "--quiet"])
    assert status == 0
    assert sorted(p.name for p in out.iterdir()) == \
        ["dsc_vs_confidence.json", "dsc_vs_confidence.png", "results.json", "sets.png"]
    saved = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["model", "crc", "consema", "rwcp"]
    assert saved["settings"]["pool_size"] == 34
    assert saved["rows"][1]["n_test"] == 14
    assert all(0 <= r["coverage"] <= 1 for r in saved["rows"])


def cone_map(radius=60.0, n=161):
    "S = max(0, 1 - r / R) around the centre of an n x n grid."
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    return np.clip(1 - np.hypot(yy, xx) / radius, 0, 1)


def test_set_size_of_a_cone():
    # C_lambda is a disc of radius lambda R, so |C| = pi (lambda R)^2 and d|C|/d lambda = 2 pi lambda R^2
    radius = 60.0
    cone = cone_map(radius)
    lambdas = np.linspace(0.2, 0.8, 13)
    sizes = set_size_curve(cone, lambdas)
    np.testing.assert_allclose(sizes, np.pi * (lambdas * radius) ** 2, rtol=0.03)
    derivative = set_size_derivative(lambdas, sizes)
    for lam in (0.3, 0.5, 0.7):
        expected = 2 * np.pi * lam * radius ** 2
        assert level_set_integral(cone, 1 - lam) == pytest.approx(expected, rel=0.01)
        assert derivative[np.argmin(abs(lambdas - lam))] == pytest.approx(expected, rel=0.03)


def test_set_size_curve_shapes_and_errors():
    ramp = np.tile(np.linspace(0, 1, 50), (10, 1))
    assert set_size_curve(ramp, [0.5]).shape == (1,)
    assert set_size_curve(np.stack([ramp, 1 - ramp]), [0.2, 0.5]).shape == (2, 2)
    with pytest.raises(ValueError, match="strictly increasing"):
        set_size_derivative([0.2, 0.1], [1, 2])
    with pytest.raises(ValueError, match="Expected one"):
        level_set_integral(np.stack([ramp, ramp]), 0.5)
    with pytest.raises(ValueError, match="must lie in"):
        set_size_curve(ramp + 0.5, [0.5])
    # a constant map has no level line at another level, so the coarea density there is 0
    assert level_set_integral(np.full((20, 20), 0.5), 0.3) == 0.0


def test_calibration_spread_matches_calibrate():
    scores = synthetic_pool()
    spread = calibration_spread(scores, alpha=0.1, n_cal=20, n_draws=5, seed=3)
    order = np.random.default_rng(3).permutation(len(scores))
    calibration, test = order[:20], order[20:]
    for method in ("crc", "rwcp"):
        assert spread[method]["lambda_hat"].shape == (5,)
        assert spread[method]["lambda_hat"][0] == scores.calibrate(method, calibration, 0.1)
        assert np.all(spread[method]["relative_size"] > 0)
    lambda_hat = spread["crc"]["lambda_hat"][0]
    predicted = scores.sets("crc", lambda_hat, test)
    direct = np.mean([c.sum() / scores.masks[j].sum() for c, j in zip(predicted, test)])
    assert spread["crc"]["relative_size"][0] == pytest.approx(direct, rel=1e-12)
    with pytest.raises(ValueError, match="leaves no test image"):
        calibration_spread(scores, n_cal=len(scores))
