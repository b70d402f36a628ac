"""The promptable-model interface: preprocessing, box mapping, checkpoints, the embedding cache,
and the box-prompted quality of the bundled LiteMedSAM weights on real MRI."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medseg_nbdev.core import CheckpointError, set_seed
from medseg_nbdev.foundation import (SAM_PIXEL_MEAN, SAM_PIXEL_STD, as_image_batch, box_mask, build_network,
                                     cached_embeddings, describe_state_dict, embedding_cache_dir, get_model_spec,
                                     image_digest, image_to_model_boxes, litemedsam_checkpoint, load_promptable_model,
                                     mask_to_box, model_to_image_boxes, read_state_dict, resized_shape, validate_boxes)
from medseg_nbdev.metrics import dice_score

TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,))


@pytest.fixture(scope="module")
def litemedsam():
    return load_promptable_model("litemedsam", device="cpu")


@pytest.fixture(scope="module")
def tiny_sam_checkpoint(tmp_path_factory):
    set_seed(0)
    path = tmp_path_factory.mktemp("sam") / "tiny_sam.pth"
    torch.save(build_network(get_model_spec("sam_vit_b"), TINY_VIT).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def hippocampus_slices(colin27):
    test = colin27.test.subset([0, 4, 7])
    target = test.masks == 1
    boxes = np.stack([mask_to_box(m) for m in target])
    return test.images, target, boxes


def test_resized_shape_rounds_like_sam():
    assert resized_shape((100, 200), 256) == (128, 256)
    assert resized_shape((333, 100), 256) == (256, 77)
    assert resized_shape((128, 128), 1024) == (1024, 1024)


def test_box_mapping_scales_edges():
    assert image_to_model_boxes([10, 20, 21, 31], (128, 128), 256).tolist() == [[20, 40, 41, 61]]
    assert image_to_model_boxes([10, 20, 21, 31], (128, 128), 1024).tolist() == [[80, 160, 167, 247]]
    # the map keeps a box's pixel footprint: rasterise the resized box and compare corners
    for shape, size in (((100, 200), 256), ((150, 90), 1024), ((128, 128), 256)):
        box = [7, 11, 40, 52]
        resized = F.interpolate(torch.from_numpy(box_mask(box, shape))[None, None].float(),
                                size=resized_shape(shape, size), mode="nearest-exact")[0, 0] > 0
        mx0, my0, mx1, my1 = image_to_model_boxes(box, shape, size)[0].tolist()
        rows, cols = torch.nonzero(resized, as_tuple=True)
        assert (rows.min().item(), cols.min().item()) == (round(my0), round(mx0)), (shape, size)
        assert (rows.max().item(), cols.max().item()) == (round(my1), round(mx1)), (shape, size)


def test_box_mapping_round_trip():
    boxes = np.array([[3, 4, 50, 60], [0, 0, 200, 100]], dtype=float)
    mapped = image_to_model_boxes(boxes, (100, 200), 256)
    np.testing.assert_allclose(model_to_image_boxes(mapped, (100, 200), 256), boxes, atol=1e-5)


@pytest.mark.parametrize("box, message", [
    ([5, 5, 5, 9], "zero or negative area"),
    ([5, 9, 8, 9], "zero or negative area"),
    ([8, 5, 4, 9], "zero or negative area"),
    ([-1, 0, 4, 4], "outside"),
    ([5, 5, 11, 9], "outside"),
    ([5, 5, 8, 10.5], "outside"),
    ([0, 0, np.nan, 4], "NaN"),
    ([0, 0, 4], "shape"),
])
def test_validate_boxes_rejects(box, message):
    with pytest.raises(ValueError, match=message):
        validate_boxes(box, (10, 10))


def test_validate_boxes_counts_images():
    with pytest.raises(ValueError, match="one box per image"):
        validate_boxes([[0, 0, 4, 4]], (10, 10), n_images=2)
    assert validate_boxes([0, 0, 10, 10], (10, 10)).shape == (1, 4)


def test_mask_to_box_is_tight():
    mask = np.zeros((12, 12), dtype=bool)
    mask[3:7, 2:9] = True
    mask[8, 5] = True
    assert mask_to_box(mask).tolist() == [2, 3, 9, 9]
    assert box_mask(mask_to_box(mask), mask.shape).sum() == 7 * 6
    with pytest.raises(ValueError, match="no foreground"):
        mask_to_box(np.zeros((4, 4)))


@pytest.mark.parametrize("images, message", [
    (np.zeros((1, 2, 16, 16)), "1 \\(grayscale\\) or 3 \\(RGB\\) channels"),
    (np.zeros((16, 16)), "batch axis"),
    (np.zeros((0, 16, 16)), "empty"),
    (np.full((1, 16, 16), 1.5), "\\[0, 1\\]"),
    (np.full((1, 16, 16), -0.1), "\\[0, 1\\]"),
    (np.full((1, 16, 16), np.inf), "NaN or infinite"),
])
def test_image_batch_rejects(images, message):
    with pytest.raises(ValueError, match=message):
        as_image_batch(images)


def test_preprocess_litemedsam(litemedsam):
    rng = np.random.default_rng(0)
    images = rng.random((2, 100, 200)).astype(np.float32) * 0.5 + 0.2
    x = litemedsam.preprocess(images)
    assert x.shape == (2, 3, 256, 256)
    content = x[:, :, :128, :]
    assert torch.allclose(content.amin(dim=(1, 2, 3)), torch.zeros(2), atol=1e-6)
    assert torch.allclose(content.amax(dim=(1, 2, 3)), torch.ones(2), atol=1e-6)
    assert torch.equal(x[:, :, 128:, :], torch.zeros(2, 3, 128, 256))
    assert torch.equal(x[:, 0], x[:, 2])
    with pytest.raises(ValueError, match="thinner than one 4-pixel cell"):
        litemedsam.preprocess(np.zeros((1, 1, 300)))


def test_preprocess_sam_normalisation(tiny_sam_checkpoint):
    sam = load_promptable_model("sam_vit_b", checkpoint=tiny_sam_checkpoint, vit=TINY_VIT, device="cpu")
    x = sam.preprocess(np.full((1, 64, 64), 0.5, dtype=np.float32))
    assert x.shape == (1, 3, 1024, 1024)
    expected = (127.5 - torch.tensor(SAM_PIXEL_MEAN)) / torch.tensor(SAM_PIXEL_STD)
    assert torch.allclose(x[0, :, 500, 500], expected, atol=1e-5)
    medsam = load_promptable_model("medsam_vit_b", checkpoint=tiny_sam_checkpoint, vit=TINY_VIT, device="cpu")
    ramp = np.linspace(0.2, 0.6, 64 * 64, dtype=np.float32).reshape(1, 64, 64)
    y = medsam.preprocess(ramp)
    assert abs(y.min().item()) < 1e-6
    assert abs(y.max().item() - 1) < 1e-6


def test_encode_decode_shapes_and_gradients(litemedsam):
    images = np.random.default_rng(1).random((1, 64, 80)).astype(np.float32)
    embeddings = litemedsam.encode(images)
    assert embeddings.shape == (1, 256, 64, 64)
    assert embeddings.dtype == torch.float32
    boxes = litemedsam.image_to_model_boxes([10, 12, 40, 50], (64, 80))
    low_res = litemedsam.decode(embeddings, model_boxes=boxes)
    assert low_res.shape == (1, 1, 256, 256)
    assert litemedsam.postprocess(low_res, (64, 80)).shape == (1, 64, 80)

    dense = torch.zeros(1, 256, 64, 64, requires_grad=True)
    litemedsam.decode(embeddings, dense_prompt=dense).sum().backward()
    assert dense.grad is not None and dense.grad.abs().sum() > 0
    assert all(p.grad is None for p in litemedsam.network.parameters())

    sparse, no_mask = litemedsam.no_prompt_embeddings(3)
    assert sparse.shape == (3, 0, 256)
    assert no_mask.shape == (3, 256, 64, 64)
    # a dense prompt equal to the 'no mask' embedding reproduces the unprompted decoder output
    with torch.no_grad():
        replaced = litemedsam.decode(embeddings, model_boxes=boxes, dense_prompt=no_mask[:1].clone())
        assert torch.allclose(replaced, low_res, atol=1e-5)


def test_decode_rejects_bad_input(litemedsam):
    embeddings = torch.zeros(2, 256, 64, 64)
    with pytest.raises(ValueError, match="box prompts, a dense prompt or both"):
        litemedsam.decode(embeddings)
    with pytest.raises(ValueError, match=r"\(B, 256, 64, 64\)"):
        litemedsam.decode(torch.zeros(2, 256, 32, 32), model_boxes=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="one box per image"):
        litemedsam.decode(embeddings, model_boxes=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="dense_prompt must have shape"):
        litemedsam.decode(embeddings, dense_prompt=torch.zeros(2, 128, 64, 64))
    with pytest.raises(ValueError, match="2 image embeddings"):
        litemedsam.decode(embeddings, dense_prompt=torch.zeros(1, 256, 64, 64))
    with pytest.raises(ValueError, match="outside"):
        litemedsam.predict_with_boxes(np.zeros((1, 32, 32)), [[0, 0, 40, 10]])


def test_postprocess_removes_padding(litemedsam):
    # a 64 x 128 image fills rows 0..127 of the 256 x 256 frame; the padded rows carry -50
    logits = torch.full((1, 1, 256, 256), -50.0)
    logits[..., :128, :] = 3.0
    out = litemedsam.postprocess(logits, (64, 128))
    assert out.shape == (1, 64, 128)
    assert torch.allclose(out, torch.full_like(out, 3.0))


def test_box_prompt_dice_far_above_random(litemedsam, hippocampus_slices):
    images, target, boxes = hippocampus_slices
    probs = litemedsam.predict_with_boxes(images, boxes)
    pretrained = np.mean([dice_score(p >= 0.5, t) for p, t in zip(probs, target)])
    set_seed(0)
    random_model = load_promptable_model("litemedsam", pretrained=False, device="cpu")
    random_probs = random_model.predict_with_boxes(images, boxes)
    random = np.mean([dice_score(p >= 0.5, t) for p, t in zip(random_probs, target)])
    assert pretrained > 0.55, pretrained
    assert random < 0.2, random
    assert pretrained > random + 0.4


def test_cache_hits_and_recovers(litemedsam, data_home, monkeypatch):
    images = np.random.default_rng(2).random((3, 48, 48)).astype(np.float32)
    images[2] = images[0]  # a duplicate is encoded once
    calls = []
    encode = litemedsam.encode
    monkeypatch.setattr(litemedsam, "encode", lambda x, *a, **k: calls.append(len(x)) or encode(x, *a, **k))
    first = cached_embeddings(litemedsam, images, progress=False)
    assert calls == [2]
    folder = embedding_cache_dir(litemedsam)
    assert folder.is_relative_to(data_home)
    assert sorted(p.name for p in folder.glob("*.pt")) == sorted({f"{image_digest(i)}.pt" for i in images})
    assert not list(folder.glob(".*.tmp"))
    assert torch.equal(first[0], first[2])
    assert torch.allclose(first[1:2], encode(images[1:2]), atol=1e-5)

    again = cached_embeddings(litemedsam, images, progress=False)
    assert calls == [2]
    assert torch.equal(again, first)

    (folder / f"{image_digest(images[1])}.pt").write_bytes(b"damaged")
    repaired = cached_embeddings(litemedsam, images, progress=False)
    assert calls == [2, 1]
    assert torch.allclose(repaired, first, atol=1e-5)


def test_cache_separates_models(litemedsam, tiny_sam_checkpoint, data_home):
    set_seed(0)
    random_weights = load_promptable_model("litemedsam", pretrained=False, device="cpu")
    sam = load_promptable_model("sam_vit_b", checkpoint=tiny_sam_checkpoint, vit=TINY_VIT, device="cpu")
    medsam = load_promptable_model("medsam_vit_b", checkpoint=tiny_sam_checkpoint, vit=TINY_VIT, device="cpu")
    folders = {embedding_cache_dir(m) for m in (litemedsam, random_weights, sam, medsam)}
    assert len(folders) == 4  # same weights with another normalisation still get their own folder
    assert load_promptable_model("litemedsam", device="cpu").fingerprint == litemedsam.fingerprint


def test_sam_path_with_tiny_checkpoint(tiny_sam_checkpoint):
    sam = load_promptable_model("sam_vit_b", checkpoint=tiny_sam_checkpoint, vit=TINY_VIT, device="cpu")
    assert sam.input_size == 1024
    assert sam.embedding_shape == (256, 64, 64)
    images = np.random.default_rng(4).random((2, 96, 128)).astype(np.float32)
    boxes = np.array([[10, 20, 50, 60], [0, 0, 128, 96]], dtype=float)
    assert sam.image_to_model_boxes(boxes[:1], (96, 128)).tolist() == [[80, 160, 399, 479]]
    assert sam.encode(images).shape == (2, 256, 64, 64)
    probs = sam.predict_with_boxes(images, boxes)
    assert probs.shape == (2, 96, 128)
    assert ((probs >= 0) & (probs <= 1)).all()


def test_checkpoint_of_wrong_model_type(tiny_sam_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="width 32, 2 blocks.*expects a SAM ViT image encoder of width 768"):
        load_promptable_model("sam_vit_b", checkpoint=tiny_sam_checkpoint)
    with pytest.raises(CheckpointError, match="expects a LiteMedSAM model"):
        load_promptable_model("litemedsam", checkpoint=tiny_sam_checkpoint)
    with pytest.raises(CheckpointError, match="contains a LiteMedSAM model.*name='litemedsam'"):
        load_promptable_model("sam_vit_h", checkpoint=litemedsam_checkpoint())

    state = read_state_dict(tiny_sam_checkpoint)
    encoder_only = tmp_path / "encoder_only.pth"
    torch.save({k: v for k, v in state.items() if k.startswith("image_encoder.")}, encoder_only)
    with pytest.raises(CheckpointError, match="without a prompt encoder and mask decoder"):
        load_promptable_model("sam_vit_b", checkpoint=encoder_only, vit=TINY_VIT)


def test_describe_state_dict_names_sizes():
    vit_b = {"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16),
             **{f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(12)},
             "prompt_encoder.x": torch.zeros(1), "mask_decoder.y": torch.zeros(1)}
    assert describe_state_dict(vit_b)["text"].startswith("a SAM ViT-B model")
    assert describe_state_dict({"head.weight": torch.zeros(1)})["family"] == "unknown"


def test_wrapped_checkpoints_load(tiny_sam_checkpoint, tmp_path):
    state = torch.load(tiny_sam_checkpoint, weights_only=True)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, wrapped)
    sam = load_promptable_model("sam_vit_b", checkpoint=wrapped, vit=TINY_VIT, device="cpu")
    assert torch.equal(sam.network.image_encoder.patch_embed.proj.weight,
                       state["image_encoder.patch_embed.proj.weight"])


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_promptable_model("litemedsam", checkpoint=tmp_path / "missing.pth")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"\x80\x02 not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_promptable_model("litemedsam", checkpoint=broken)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(litemedsam_checkpoint().read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_promptable_model("litemedsam", checkpoint=truncated)
    not_weights = tmp_path / "numbers.pth"
    torch.save([1, 2, 3], not_weights)
    with pytest.raises(CheckpointError, match="contains no model state dictionary"):
        load_promptable_model("litemedsam", checkpoint=not_weights)


def test_loader_argument_errors():
    with pytest.raises(CheckpointError, match="not bundled"):
        load_promptable_model("sam_vit_l")
    with pytest.raises(ValueError, match="Unknown promptable model"):
        load_promptable_model("sam2_hiera")
    with pytest.raises(ValueError, match="do not pass a checkpoint"):
        load_promptable_model("litemedsam", checkpoint=litemedsam_checkpoint(), pretrained=False)
    with pytest.raises(ValueError, match="vit settings apply"):
        load_promptable_model("litemedsam", vit=TINY_VIT)
