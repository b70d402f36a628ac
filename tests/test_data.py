import numpy as np
import pytest

from medseg_nbdev import data as data_module
from medseg_nbdev.data import (AXES, MissingDataError, SliceDataset, SliceMeta, find_mricron_templates,
                               list_datasets, load_dataset, orient_slices, percentile_normalise, slab_split,
                               window_ct)


@pytest.mark.parametrize("n,slab,gap", [(42, 6, 2), (63, 8, 3), (40, 5, 1), (180, 10, 2), (12, 4, 0)])
def test_slab_split_partitions_and_separates(n, slab, gap):
    positions = list(range(30, 30 + n))
    splits, dropped = slab_split(positions, slab_size=slab, gap=gap)
    used = sorted(sum(splits.values(), []) + dropped)
    assert used == positions
    assert all(splits[name] for name in splits)
    for a in splits:
        for b in splits:
            if a != b:
                assert min(abs(i - j) for i in splits[a] for j in splits[b]) > gap


def test_slab_split_rejects_bad_settings():
    with pytest.raises(ValueError, match="fewer than"):
        slab_split(range(8), slab_size=6)
    with pytest.raises(ValueError, match="summing to 1"):
        slab_split(range(50), fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="contiguous"):
        slab_split([1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20])


def test_orientation_is_radiological():
    volume = np.zeros((9, 10, 11))
    volume[8, 0, 10] = 1  # patient's far right (R=8), most posterior (A=0), most superior (S=10)
    expected = {"coronal": (0, 0), "sagittal": (0, 9), "axial": (9, 0)}
    for axis, (row, col) in expected.items():
        _, r, c = np.argwhere(orient_slices(volume, axis) == 1)[0]
        assert (r, c) == (row, col), axis


def test_normalisers_reject_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        percentile_normalise(np.array([1.0, np.nan, 3.0]))
    with pytest.raises(ValueError, match="positive"):
        window_ct(np.zeros(3), width=-1)


def test_slice_dataset_validates_inputs():
    meta = [SliceMeta("v", "axial", 0, (1.0, 1.0), 1.0)]
    images = np.zeros((1, 8, 8), np.float32)
    with pytest.raises(ValueError, match="differs"):
        SliceDataset(images, np.zeros((1, 8, 7), int), meta, ("a",))
    with pytest.raises(ValueError, match="integer labels"):
        SliceDataset(images, np.zeros((1, 8, 8)), meta, ("a",))
    with pytest.raises(ValueError, match="foreground classes"):
        SliceDataset(images, np.full((1, 8, 8), 2), meta, ("a",))
    with pytest.raises(ValueError, match="NaN"):
        SliceDataset(images * np.nan, np.zeros((1, 8, 8), int), meta, ("a",))


def test_missing_data_message_names_the_fix(data_home, monkeypatch):
    monkeypatch.setattr(data_module, "mricron_template_dirs", lambda: [data_home / "nothing-here"])
    with pytest.raises(MissingDataError) as info:
        find_mricron_templates()
    message = str(info.value)
    assert "apt-get install -y mricron-data" in message
    assert "dpkg-deb -x" in message
    assert str(data_home / "nothing-here") in message


def test_registry_lists_colin27_structures():
    names = list_datasets()
    for structure in ("hippocampus", "amygdala", "caudate", "putamen", "thalamus"):
        assert f"colin27-{structure}" in names


def test_colin27_default_splits(colin27):
    assert colin27.train.image_size == (128, 128)
    assert colin27.train.class_names == ("left_hippocampus", "right_hippocampus")
    train = {m.index for m in colin27.train.meta}
    for split in ("val", "test"):
        assert all(min(abs(m.index - t) for t in train) > 2 for m in colin27[split].meta)
    for split in ("train", "val", "test"):
        images = colin27[split].images
        assert images.min() >= 0
        assert images.max() <= 1
        assert set(np.unique(colin27[split].masks)) == {0, 1, 2}


def test_colin27_options(colin27):
    resized = load_dataset("colin27-hippocampus", fit="resize", size=64, merge_sides=True)
    assert resized.train.image_size == (64, 64)
    assert resized.train.meta[0].spacing == pytest.approx((181 / 64, 181 / 64))  # the coronal plane is 181 x 181 mm
    assert resized.train.class_names == ("hippocampus",)
    whole = load_dataset("colin27-hippocampus", margin=None)
    assert sum(whole.counts().values()) > 2 * sum(colin27.counts().values())
    assert any(not m.any() for m in whole.train.masks)  # slices without hippocampus are kept
    sagittal = load_dataset("colin27-amygdala", axis="sagittal")
    assert sagittal.train.meta[0].axis == "sagittal"
    with pytest.raises(ValueError, match="Unknown axis"):
        load_dataset("colin27-hippocampus", axis="oblique")
    with pytest.raises(TypeError, match="valid options"):
        load_dataset("colin27-hippocampus", slab=3)


def test_colin27_same_labels_as_the_atlas(colin27):
    import nibabel as nib

    folder = find_mricron_templates()
    atlas = np.asarray(nib.load(folder / "aal.nii.gz").dataobj)
    for split in ("train", "val", "test"):
        for mask, meta in zip(colin27[split].masks, colin27[split].meta):
            plane = atlas[:, meta.index, :]
            assert (mask == 1).sum() == (plane == 37).sum()
            assert (mask == 2).sum() == (plane == 38).sum()
