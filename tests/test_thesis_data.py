"""Loaders of the thesis data sets on small files written in each official format, the download
machinery against a local HTTP server, and the loaders on real cases when those are present."""
import dataclasses
import gzip
import hashlib
import http.server
import io
import json
import logging
import os
import tarfile
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medseg_nbdev import thesis_data as td
from medseg_nbdev.data import MissingDataError, list_datasets, load_dataset, orient_slices

# A few real cases of MSD Hippocampus, ACDC and HC18 in their official layouts; the tests that read
# them skip when the folder is absent. MEDSEG_SAMPLES names another folder.
REAL_CASES = Path(os.environ.get("MEDSEG_SAMPLES", Path(__file__).resolve().parents[2] / "shared" / "samples"))


# ---------------------------------------------------------------- writers of the official formats

def write_nifti(path, array, zooms, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if affine is None:
        affine = np.diag([*zooms, 1.0]) if len(zooms) == 3 else np.diag([*zooms, 1.0, 1.0])
    image = nib.Nifti1Image(np.asarray(array), affine)
    image.header.set_zooms(zooms)
    nib.save(image, path)


def write_metaimage(path, array, spacing, element_type="MET_SHORT", dtype="<i2"):
    """Write a MetaImage header and raw file by hand; `array` is in voxel order (x, y[, z])."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_suffix(".raw")
    raw.write_bytes(np.ascontiguousarray(np.asarray(array).T).astype(dtype).tobytes())
    ndim = np.asarray(array).ndim
    identity = " ".join("1" if i == j else "0" for i in range(ndim) for j in range(ndim))
    path.write_text(
        f"ObjectType = Image\nNDims = {ndim}\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"CompressedData = False\nTransformMatrix = {identity}\nOffset = {' '.join(['0'] * ndim)}\n"
        f"ElementSpacing = {' '.join(str(s) for s in spacing)}\n"
        f"DimSize = {' '.join(str(n) for n in np.asarray(array).shape)}\n"
        f"ElementType = {element_type}\nElementDataFile = {raw.name}\n")


def mri_volume(shape, seed):
    return np.random.default_rng(seed).normal(300, 50, size=shape).astype(np.float32)


# ---------------------------------------------------------------- Decathlon layout

def hippocampus_task(root, n_cases=5):
    """Task04-like cases of 20 x 24 x 6 voxels at 1 mm; slices 1-3 hold both labels, the others none."""
    entries = []
    for k in range(n_cases):
        name = f"hippocampus_{k:03d}.nii.gz"
        labels = np.zeros((20, 24, 6), np.uint8)
        labels[5:10, 4:12, 1:4] = 1
        labels[5:10, 12:20, 1:4] = 2
        image = mri_volume((20, 24, 6), k)
        dtype = np.float32 if k % 2 else np.uint8  # the Decathlon mixes label dtypes
        write_nifti(root / "imagesTr" / name, image, (1.0, 1.0, 1.0))
        write_nifti(root / "labelsTr" / name, labels.astype(dtype), (1.0, 1.0, 1.0))
        (root / "imagesTr" / f"._{name}").write_bytes(b"AppleDouble")  # as in the official archives
        entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (root / "dataset.json").write_text(json.dumps({"name": "Hippocampus", "training": entries}))
    return root


def test_msd_hippocampus_keeps_every_slice(data_home, tmp_path):
    root = hippocampus_task(tmp_path / "Task04_Hippocampus")
    splits = td.load_msd("Task04_Hippocampus", root=root, counts={"train": None, "val": 1, "test": 2},
                         progress=False)
    volumes = {split: {m.volume_id for m in splits[split].meta} for split in ("train", "val", "test")}
    assert [len(volumes[s]) for s in ("train", "val", "test")] == [2, 1, 2]
    assert not volumes["train"] & volumes["test"]
    assert not volumes["val"] & volumes["test"]
    assert len(splits.train) == 2 * 6  # every slice of every volume
    assert splits.train.image_size == (50, 50)
    assert {m.spacing for m in splits.train.meta} == {(1.0, 1.0)}
    assert splits.train.class_names == ("anterior_hippocampus", "posterior_hippocampus")
    assert set(np.unique(splits.train.masks)) == {0, 1, 2}
    assert (splits.train.masks == 1).sum() == 2 * 5 * 8 * 3
    assert splits.train.images.min() >= 0
    assert splits.train.images.max() <= 1
    assert "train 7163, val 350, test 1757" in splits.policy


def ct_task(root, zooms, n_cases=3, tumour=False):
    """CT cases of 80 x 60 x 5 voxels: slice 0 empty, slice 1 a 6x6 object, slices 2-4 a 20x20 object and a speck."""
    for k in range(n_cases):
        name = f"case_{k:03d}.nii.gz"
        labels = np.zeros((80, 60, 5), np.uint8)
        labels[30:36, 20:26, 1] = 1
        labels[30:50, 20:40, 2:5] = 1
        labels[10:12, 10:12, 2:5] = 1  # a 2x2 speck, separate from the main object
        if tumour:
            labels[36:42, 26:32, 2:5] = 2
        image = np.full((80, 60, 5), 40.0, np.float32)
        image[:20] = -1000.0  # air
        image[70:] = 1000.0  # bone
        write_nifti(root / "imagesTr" / name, image, zooms)
        write_nifti(root / "labelsTr" / name, labels, zooms)
    return root


def test_msd_spleen_filters_slices_and_objects(data_home, tmp_path):
    root = ct_task(tmp_path / "Task09_Spleen", (0.5, 0.5, 5.0))
    splits = td.load_msd("Task09_Spleen", root=root, counts={"train": None, "val": 0, "test": 1}, progress=False)
    # 0.5 mm pixels halve: the 6x6 object becomes 9 pixels (< 10, slice dropped), the speck 1 pixel (removed)
    assert len(splits.train) == 2 * 3
    assert [m.index for m in splits.train.meta[:3]] == [2, 3, 4]
    assert splits.train.image_size == (512, 512)
    assert {m.spacing for m in splits.train.meta} == {(1.0, 1.0)}
    for mask in splits.train.masks:
        assert mask.sum() == 10 * 10
        assert td.largest_component(mask).sum() == mask.sum()


def test_msd_liver_merges_tumour_into_liver(data_home, tmp_path):
    root = ct_task(tmp_path / "Task03_Liver", (1.0, 1.0, 5.0), tumour=True)
    splits = td.load_msd("Task03_Liver", root=root, counts={"train": None, "val": 0, "test": 1}, progress=False)
    assert splits.train.class_names == ("liver",)
    assert set(np.unique(splits.train.masks)) == {0, 1}
    assert splits.train.image_size == (256, 256)
    assert {m.index for m in splits.train.meta} == {1, 2, 3, 4}  # 1 mm: the 6x6 object (36 px) is kept


def test_msd_pancreas_largest_slice_and_hounsfield_window(data_home, tmp_path):
    root = ct_task(tmp_path / "Task07_Pancreas", (1.0, 1.0, 5.0), tumour=True)
    splits = td.load_msd("Task07_Pancreas", root=root, counts={"train": 1, "val": None, "test": 1}, progress=False)
    assert splits.counts() == {"train": 1, "val": 1, "test": 1}
    assert splits.train.image_size == (512, 512)
    assert splits.train.meta[0].index == 2  # the first of the slices with the largest area
    image = splits.train.images[0]
    # after clipping to [-100, 240] HU, soft tissue at 40 HU lies at (40 + 100) / 340
    rows, cols = np.nonzero(image > 0)
    assert np.isclose(np.median(image[rows, cols]), 140 / 340, atol=1e-4)
    assert image.max() == pytest.approx(1.0)


def test_msd_needs_labels_for_every_image(data_home, tmp_path):
    root = hippocampus_task(tmp_path / "Task04_Hippocampus", n_cases=2)
    (root / "labelsTr" / "hippocampus_001.nii.gz").unlink()
    with pytest.raises(MissingDataError, match="hippocampus_001.nii.gz is missing"):
        td.load_msd("Task04_Hippocampus", root=root, progress=False)


# ---------------------------------------------------------------- PROMISE12 (MetaImage)

def test_promise12_metaimage_resampled_and_resized(data_home, tmp_path):
    root = tmp_path / "PROMISE12"
    for k in range(3):
        labels = np.zeros((64, 48, 5), np.uint8)
        labels[20:40, 10:30, 1:4] = 1
        part = root / f"TrainingData_Part{k + 1}"
        write_metaimage(part / f"Case{k:02d}.mhd", mri_volume((64, 48, 5), k), (0.5, 0.5, 3.6))
        write_metaimage(part / f"Case{k:02d}_segmentation.mhd", labels, (0.5, 0.5, 3.6), "MET_UCHAR", "u1")
    write_metaimage(root / "TestData" / "Case07.mhd", mri_volume((64, 48, 5), 9), (0.5, 0.5, 3.6))  # no labels
    splits = td.load_promise12(root=root, counts={"train": 1, "val": 1, "test": 1}, progress=False)
    assert splits.counts() == {"train": 5, "val": 5, "test": 5}
    assert splits.train.image_size == (128, 128)
    # 1 mm: 24 rows (y) by 32 columns (x); padded to 32 x 32 and resized to 128: 0.25 mm pixels
    assert splits.train.meta[0].spacing == pytest.approx((0.25, 0.25))
    assert splits.train.meta[0].thickness == pytest.approx(3.6)
    assert splits.train.class_names == ("prostate",)
    assert all(m.axis == "axial" for m in splits.train.meta)


def test_metaimage_reader_orders_voxels(tmp_path):
    volume = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    write_metaimage(tmp_path / "v.mhd", volume, (0.7, 0.8, 2.5))
    data, zooms, affine = td.read_image(tmp_path / "v.mhd")
    np.testing.assert_array_equal(data, volume)
    assert zooms == pytest.approx((0.7, 0.8, 2.5))
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    (tmp_path / "v.raw").write_bytes(b"\0\0")
    with pytest.raises(ValueError, match="could not be read as MetaImage"):
        td.read_image(tmp_path / "v.mhd")


# ---------------------------------------------------------------- ACDC

def acdc_patient(folder, name, seed, ed=1):
    """An ACDC-like end-diastolic frame of 40 x 36 x 6 voxels at 1.25 x 1.25 x 10 mm in LPS+ orientation.

    Slices 1-4 hold RV (1), myocardium (2) and LV (3); slice 5 only the LV; slice 0 nothing.
    The LV grows with the slice index up to slice 4.
    """
    labels = np.zeros((40, 36, 6), np.uint8)
    for z in range(1, 5):
        labels[5:12, 8:20, z] = 1
        labels[15:33, 10:30, z] = 2
        labels[19:21 + 2 * z, 14:16 + 2 * z, z] = 3
    labels[20:26, 15:21, 5] = 3
    affine = np.diag([-1.25, -1.25, 10.0, 1.0])
    patient = folder / name
    frame = f"{name}_frame{ed:02d}"
    write_nifti(patient / f"{frame}.nii.gz", mri_volume((40, 36, 6), seed).astype(np.int16), (1.25, 1.25, 10.0), affine)
    write_nifti(patient / f"{frame}_gt.nii.gz", labels, (1.25, 1.25, 10.0), affine)
    (patient / "Info.cfg").write_text(f"ED: {ed}\nES: 12\nGroup: NOR\nHeight: 180.0\nNbFrame: 30\nWeight: 80.0\n")
    return labels


def acdc_archive(root):
    for k in range(1, 5):
        acdc_patient(root / "database" / "training", f"patient{k:03d}", k, ed=1 if k % 2 else 3)
    for k in (101, 102):
        acdc_patient(root / "database" / "testing", f"patient{k:03d}", k)
    return root


def test_acdc_prompt_uses_official_test_patients(data_home, tmp_path):
    root = acdc_archive(tmp_path / "ACDC")
    splits = td.load_acdc(root=root, structure="lv", counts={"train": None, "val": 1}, progress=False)
    test_patients = {m.volume_id for m in splits.test.meta}
    assert test_patients == {"patient101", "patient102"}
    assert len({m.volume_id for m in splits.train.meta}) == 3
    assert splits.counts() == {"train": 3 * 4, "val": 4, "test": 2 * 4}  # slice 5 lacks RV and myocardium
    assert splits.train.image_size == (256, 256)
    assert splits.train.meta[0].spacing == pytest.approx((1.0, 1.0))  # 40 x 1.25 = 50 mm in 50 pixels
    assert splits.train.class_names == ("left_ventricle",)
    rv = td.load_acdc(root=root, structure="rv", counts={"train": None, "val": 1}, progress=False)
    assert rv.train.class_names == ("right_ventricle",)
    assert rv.train.masks.sum() > splits.train.masks.sum()  # the RV blocks are larger than the LV blocks here


def test_acdc_conformal_takes_largest_lv_slice(data_home, tmp_path):
    root = acdc_archive(tmp_path / "ACDC")
    splits = td.load_acdc(root=root, structure="lv", protocol="conformal", counts={"train": 2, "val": None},
                          progress=False)
    assert splits.counts() == {"train": 2, "val": 2, "test": 2}
    assert {m.index for m in splits.train.meta} == {4}
    assert splits.train.image_size == (512, 512)


def test_acdc_active_three_classes_every_slice(data_home, tmp_path):
    root = acdc_archive(tmp_path / "ACDC")
    splits = td.load_acdc(root=root, structure="all", protocol="active", counts={"train": 2, "val": 1, "test": 1},
                          progress=False)
    assert splits.counts() == {"train": 12, "val": 6, "test": 6}
    assert splits.train.class_names == ("right_ventricle", "myocardium", "left_ventricle")
    assert set(np.unique(splits.train.masks)) == {0, 1, 2, 3}
    assert splits.train.image_size == (128, 128)
    assert all(m.axis == "short-axis" for m in splits.train.meta)
    assert not {m.volume_id for m in splits.test.meta} & {"patient101", "patient102"}


def test_acdc_missing_test_folder_is_explained(data_home, tmp_path):
    root = tmp_path / "ACDC"
    acdc_patient(root / "training", "patient001", 1)
    with pytest.raises(MissingDataError, match="testing/patient101/Info.cfg"):
        td.load_acdc(root=root, progress=False)
    custom = dataclasses.replace(td.get_protocol("acdc", "prompt"), official_test=False)
    splits = td.load_acdc(root=root, protocol=custom, counts={"train": 1, "val": 0, "test": 0}, progress=False)
    assert len(splits.train) == 4


# ---------------------------------------------------------------- CAMUS (NIfTI and MetaImage releases)

def camus_labels(with_atrium=True):
    labels = np.zeros((60, 80), np.uint8)  # voxel order (x, y)
    labels[20:40, 10:40] = 2
    labels[20:30, 20:40] = 1  # 3 mm x 3 mm, aligned with the 1 mm grid
    if with_atrium:
        labels[25:35, 45:60] = 3
    return labels


def test_camus_reads_both_releases(data_home, tmp_path):
    root = tmp_path / "CAMUS"
    for k in (1, 2, 3):
        name = f"patient{k:04d}"
        folder = root / "database_nifti" / name
        write_nifti(folder / f"{name}_2CH_ED.nii.gz", mri_volume((60, 80), k), (0.3, 0.15))
        write_nifti(folder / f"{name}_2CH_ED_gt.nii.gz", camus_labels(with_atrium=k != 3), (0.3, 0.15))
    old = root / "training" / "patient0004"
    write_metaimage(old / "patient0004_2CH_ED.mhd", mri_volume((60, 80), 4), (0.3, 0.15), "MET_UCHAR", "u1")
    write_metaimage(old / "patient0004_2CH_ED_gt.mhd", camus_labels(), (0.3, 0.15), "MET_UCHAR", "u1")

    prompt = td.load_camus(root=root, counts={"train": None, "val": 0, "test": 1}, progress=False)
    volumes = {m.volume_id for split in ("train", "test") for m in prompt[split].meta}
    assert volumes == {"patient0001", "patient0002", "patient0004"}  # patient0003 lacks the atrium
    assert prompt.train.image_size == (512, 512)
    assert prompt.train.meta[0].spacing == pytest.approx((0.15, 0.3))  # rows follow y, native pixel size
    assert prompt.train.masks.sum() == 2 * 10 * 20

    conformal = td.load_camus(root=root, protocol="conformal", counts={"train": 1, "val": None, "test": 1},
                              progress=False)
    assert conformal.counts() == {"train": 1, "val": 2, "test": 1}
    # 80 x 0.15 = 12 rows and 60 x 0.3 = 18 columns at 1 mm: a 3 mm x 3 mm cavity
    assert conformal.train.meta[0].spacing == pytest.approx((1.0, 1.0))
    assert conformal.train.masks.sum() == 9


# ---------------------------------------------------------------- HC18 (PNG with an ellipse outline)

def ellipse_outline(shape, centre, semi_axes, gap=False):
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    radius = np.sqrt(((rows - centre[0]) / semi_axes[0]) ** 2 + ((cols - centre[1]) / semi_axes[1]) ** 2)
    outline = np.abs(radius - 1) * min(semi_axes) < 1.0
    if gap:
        outline[:, centre[1] - 3:centre[1] + 3] = False
    return (outline * 255).astype(np.uint8)


def hc18_archive(root):
    images = root / "training_set"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    cases = {"000_HC": ((270, 400), (100, 150), False),  # centred: kept
             "001_HC": ((270, 150), (100, 120), False),  # reaches column 30: the 640-wide crop starts at 80
             "002_HC": ((270, 400), (100, 150), True),  # open outline: nothing to fill
             "003_HC": ((260, 390), (80, 120), False),  # kept
             "003_2HC": ((260, 390), (80, 120), False)}  # a repeat acquisition: not read
    for name, (centre, axes, gap) in cases.items():
        Image.fromarray(rng.integers(0, 255, (540, 800), dtype=np.uint8)).save(images / f"{name}.png")
        Image.fromarray(ellipse_outline((540, 800), centre, axes, gap)).save(images / f"{name}_Annotation.png")
    (root / "training_set_pixel_size_and_HC.csv").write_bytes(
        b"filename,pixel size(mm),head circumference (mm)\r\n000_HC.png,0.0691358041432,44.3\r\n"
        b"001_HC.png,0.1,56.81\r\n002_HC.png,0.12,68.75\r\n003_HC.png,0.09,69.0\r\n003_2HC.png,0.09,69.1\r\n")
    return root


def test_hc18_fills_ellipses_and_drops_cut_heads(data_home, tmp_path, caplog):
    root = hc18_archive(tmp_path / "HC18")
    with caplog.at_level(logging.WARNING, logger="medseg_nbdev.thesis_data"):
        splits = td.load_hc18(root=root, counts={"train": None, "val": 0, "test": 1}, progress=False)
    assert "002_HC_Annotation.png" in caplog.text
    kept = {m.volume_id for split in ("train", "test") for m in splits[split].meta}
    assert kept == {"000_HC", "003_HC"}
    assert "2 case(s) without a kept slice" in splits.policy
    assert splits.train.image_size == (640, 640)
    both = {m.volume_id: (image_mask, m) for image_mask, m in zip(
        np.concatenate([splits.train.masks, splits.test.masks]), splits.train.meta + splits.test.meta)}
    mask, meta = both["000_HC"]
    assert meta.spacing == pytest.approx((0.0691358041432, 0.0691358041432))
    assert mask.sum() / (np.pi * 100 * 150) == pytest.approx(1.0, abs=0.05)
    assert td.fill_outline(mask > 0).sum() == mask.sum()  # filled: no hole left


def test_hc18_needs_the_pixel_size_table(data_home, tmp_path):
    root = hc18_archive(tmp_path / "HC18")
    (root / "training_set_pixel_size_and_HC.csv").unlink()
    with pytest.raises(MissingDataError, match="training_set_pixel_size_and_HC.csv is missing"):
        td.load_hc18(root=root, progress=False)


# ---------------------------------------------------------------- errors, cache, registry

@pytest.mark.parametrize("loader,folder,expected", [
    (td.load_promise12, "PROMISE12", "Case00_segmentation.mhd"),
    (td.load_acdc, "ACDC", "patient001_frame01_gt.nii.gz"),
    (td.load_camus, "CAMUS", "patient0001_2CH_ED_gt.nii.gz"),
    (td.load_hc18, "HC18", "training_set_pixel_size_and_HC.csv"),
])
def test_missing_data_names_file_and_folder(data_home, loader, folder, expected):
    with pytest.raises(MissingDataError) as info:
        loader(progress=False)
    message = str(info.value)
    assert str(data_home / "thesis-data" / folder) in message
    assert expected in message


def test_msd_missing_offline_offers_download(data_home, monkeypatch):
    monkeypatch.delenv(td.DOWNLOAD_ENV, raising=False)
    with pytest.raises(MissingDataError) as info:
        td.load_msd("Task09_Spleen", progress=False)
    message = str(info.value)
    assert str(data_home / "thesis-data" / "Task09_Spleen" / "imagesTr") in message
    assert "Task09_Spleen.tar" in message
    assert "md5:410d4a301da4e5b2f6f86ec3ddba524e" in message
    assert "download=True" in message


def test_unexpected_label_values_are_rejected(data_home, tmp_path):
    root = hippocampus_task(tmp_path / "Task04_Hippocampus", n_cases=2)
    labels = np.zeros((20, 24, 6), np.uint8)
    labels[0, 0, 0] = 7
    write_nifti(root / "labelsTr" / "hippocampus_000.nii.gz", labels, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"label values \[7\]"):
        td.load_msd("Task04_Hippocampus", root=root, counts={"train": 1, "val": 0, "test": 1}, progress=False)


def test_shape_mismatch_and_corrupt_files_are_rejected(data_home, tmp_path):
    root = hippocampus_task(tmp_path / "Task04_Hippocampus", n_cases=2)
    write_nifti(root / "labelsTr" / "hippocampus_000.nii.gz", np.zeros((20, 24, 5), np.uint8), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="has shape"):
        td.load_msd("Task04_Hippocampus", root=root, counts={"train": 1, "val": 0, "test": 1}, progress=False)
    image = root / "imagesTr" / "hippocampus_001.nii.gz"
    image.write_bytes(image.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable NIfTI"):
        td.read_image(image)


def test_counts_larger_than_the_data_set_fail(data_home, tmp_path):
    root = hippocampus_task(tmp_path / "Task04_Hippocampus", n_cases=3)
    with pytest.raises(ValueError, match="only 3 are available"):
        td.load_msd("Task04_Hippocampus", root=root, progress=False)  # the published split needs 60 patients


def test_unknown_protocol_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"\['prompt'\]"):
        td.get_protocol("hc18", "active")
    with pytest.raises(ValueError, match="Unknown thesis data set"):
        td.get_protocol("brats")


def test_cache_reused_and_refreshed(data_home, tmp_path, monkeypatch):
    root = hippocampus_task(tmp_path / "Task04_Hippocampus", n_cases=2)
    options = dict(root=root, counts={"train": 1, "val": 0, "test": 1}, progress=False)
    first = td.load_msd("Task04_Hippocampus", **options)
    assert len(list((data_home / "cache" / "thesis-data" / "msd-hippocampus").glob("*.npz"))) == 2

    def fail(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(td, "_prepare_case", fail)
    second = td.load_msd("Task04_Hippocampus", **options)
    np.testing.assert_array_equal(first.train.images, second.train.images)
    assert first.train.meta == second.train.meta
    os.utime(root / "imagesTr" / "hippocampus_000.nii.gz", ns=(1, 1))  # a changed file is prepared again
    with pytest.raises(AssertionError, match="cache was not used"):
        td.load_msd("Task04_Hippocampus", **options)


def test_registry_passes_options_to_loaders(data_home, tmp_path):
    for name in ("promise12", "msd-hippocampus", "msd-spleen", "msd-liver", "msd-pancreas", "acdc", "acdc-lv",
                 "acdc-rv", "acdc-lv-conformal", "acdc-rv-conformal", "camus-lv", "camus-lv-conformal", "hc18"):
        assert name in list_datasets()
    root = hippocampus_task(tmp_path / "Task04_Hippocampus", n_cases=2)
    splits = load_dataset("msd-hippocampus", root=root, counts={"train": 1, "val": 0, "test": 1}, progress=False)
    assert splits.info.name == "msd-hippocampus"
    with pytest.raises(TypeError, match="valid options"):
        load_dataset("msd-hippocampus", axis="coronal")


def test_volume_slices_match_foundation_orientation():
    volume = np.random.default_rng(0).random((7, 8, 9))
    stack, spacing, thickness = td.volume_slices(volume, (0.5, 0.6, 2.0), np.diag([0.5, 0.6, 2.0, 1.0]))
    np.testing.assert_array_equal(stack, orient_slices(volume, "axial"))
    assert spacing == (0.6, 0.5)
    assert thickness == 2.0


# ---------------------------------------------------------------- downloads against 127.0.0.1

class RangeHandler(http.server.BaseHTTPRequestHandler):
    files: dict = {}
    honour_range = True
    cut_after = None  # bytes sent before the connection is dropped, once
    requests: list = []

    def do_GET(self):
        type(self).requests.append((self.path, self.headers.get("Range")))
        if self.path not in self.files:
            self.send_error(404)
            return
        body = self.files[self.path]
        start = 0
        if self.honour_range and self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if type(self).cut_after is not None:
            self.wfile.write(body[start:start + type(self).cut_after])
            type(self).cut_after = None
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    RangeHandler.files, RangeHandler.requests = {}, []
    RangeHandler.honour_range, RangeHandler.cut_after = True, None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def md5(data):
    return "md5:" + hashlib.md5(data).hexdigest()


PAYLOAD = np.random.default_rng(3).bytes(300_000)


def test_download_verifies_and_renames(server, tmp_path):
    _, base = server
    RangeHandler.files["/a.bin"] = PAYLOAD
    target = td.download_file(f"{base}/a.bin", tmp_path / "a.bin", md5(PAYLOAD), progress=False)
    assert target.read_bytes() == PAYLOAD
    assert not (tmp_path / "a.bin.part").exists()
    td.download_file(f"{base}/a.bin", tmp_path / "a.bin", md5(PAYLOAD), progress=False)
    assert len(RangeHandler.requests) == 1  # a verified file is not fetched again


def test_download_resumes_after_interruption(server, tmp_path):
    _, base = server
    RangeHandler.files["/a.bin"] = PAYLOAD
    RangeHandler.cut_after = 100_000
    with pytest.raises(td.DownloadError, match="Call again to resume"):
        td.download_file(f"{base}/a.bin", tmp_path / "a.bin", md5(PAYLOAD), progress=False, chunk_size=4096)
    assert (tmp_path / "a.bin.part").stat().st_size == 100_000
    assert not (tmp_path / "a.bin").exists()
    td.download_file(f"{base}/a.bin", tmp_path / "a.bin", md5(PAYLOAD), progress=False)
    assert RangeHandler.requests[-1] == ("/a.bin", "bytes=100000-")
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD


def test_download_restarts_when_range_is_ignored(server, tmp_path):
    _, base = server
    RangeHandler.files["/a.bin"] = PAYLOAD
    RangeHandler.honour_range = False
    (tmp_path / "a.bin.part").write_bytes(b"stale bytes from another file")
    td.download_file(f"{base}/a.bin", tmp_path / "a.bin", md5(PAYLOAD), progress=False)
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD


def test_download_finishes_a_complete_partial_file(server, tmp_path):
    _, base = server
    RangeHandler.files["/a.bin"] = PAYLOAD
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD)
    td.download_file(f"{base}/a.bin", tmp_path / "a.bin", md5(PAYLOAD), progress=False)  # the server returns 416
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD


def test_download_replaces_a_damaged_file(server, tmp_path):
    _, base = server
    RangeHandler.files["/a.bin"] = PAYLOAD
    (tmp_path / "a.bin").write_bytes(PAYLOAD[:-1] + b"!")
    td.download_file(f"{base}/a.bin", tmp_path / "a.bin", md5(PAYLOAD), progress=False)
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD


def test_download_checksum_mismatch_deletes_file(server, tmp_path):
    _, base = server
    RangeHandler.files["/a.bin"] = PAYLOAD
    with pytest.raises(td.ChecksumError, match="but 0000"):
        td.download_file(f"{base}/a.bin", tmp_path / "a.bin", "md5:" + "0" * 32, progress=False)
    assert not (tmp_path / "a.bin").exists()
    assert not (tmp_path / "a.bin.part").exists()


def test_download_errors_name_the_address(server, tmp_path):
    httpd, base = server
    with pytest.raises(td.DownloadError, match="HTTP 404"):
        td.download_file(f"{base}/missing.bin", tmp_path / "m.bin", md5(b""), progress=False)
    port = httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()
    with pytest.raises(td.DownloadError, match=f"Could not reach http://127.0.0.1:{port}"):
        td.download_file(f"{base}/a.bin", tmp_path / "a.bin", md5(PAYLOAD), progress=False, timeout=5)
    with pytest.raises(ValueError, match="Checksum must look like"):
        td.download_file(f"{base}/a.bin", tmp_path / "a.bin", "crc:123", progress=False)


def tar_of(folder, top):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(folder, arcname=top)
    return buffer.getvalue()


def test_msd_download_end_to_end(server, data_home, tmp_path, monkeypatch):
    _, base = server
    archive = tar_of(hippocampus_task(tmp_path / "source"), "Task04_Hippocampus")
    RangeHandler.files["/Task04_Hippocampus.tar"] = archive
    monkeypatch.setitem(td.MSD_ARCHIVES, "Task04_Hippocampus", td.RemoteArchive(
        f"{base}/Task04_Hippocampus.tar", md5(archive), "Task04_Hippocampus"))
    monkeypatch.setenv(td.DOWNLOAD_ENV, "1")
    splits = td.load_msd("Task04_Hippocampus", counts={"train": 3, "val": 1, "test": 1}, progress=False)
    assert splits.counts() == {"train": 18, "val": 6, "test": 6}
    home = data_home / "thesis-data"
    assert (home / "Task04_Hippocampus" / "imagesTr" / "hippocampus_000.nii.gz").is_file()
    assert not list((home / "downloads").iterdir())  # the archive is deleted after unpacking
    assert not [p for p in home.iterdir() if p.name.startswith(".")]  # no staging folder left
    td.load_msd("Task04_Hippocampus", counts={"train": 3, "val": 1, "test": 1}, progress=False)
    assert len(RangeHandler.requests) == 1


def test_msd_download_failure_explains_manual_install(server, data_home, monkeypatch):
    httpd, base = server
    monkeypatch.setitem(td.MSD_ARCHIVES, "Task09_Spleen", td.RemoteArchive(
        f"{base}/Task09_Spleen.tar", md5(b"x"), "Task09_Spleen"))
    with pytest.raises(MissingDataError) as info:
        td.load_msd("Task09_Spleen", download=True, progress=False)
    message = str(info.value)
    assert "The download failed" in message
    assert "HTTP 404" in message
    assert "Task09_Spleen/imagesTr exists" in message


def test_extract_archive_rejects_unsafe_members(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    (tmp_path / "evil.tar").write_bytes(buffer.getvalue())
    with pytest.raises((ValueError, tarfile.TarError)):
        td.extract_archive(tmp_path / "evil.tar", "Task", tmp_path / "out" / "Task")
    assert not (tmp_path / "outside.txt").exists()
    assert not (tmp_path / "out" / "Task").exists()


# ---------------------------------------------------------------- real cases, when present

needs_real_cases = pytest.mark.skipif(not REAL_CASES.is_dir(), reason="real example cases are not available")


@needs_real_cases
def test_real_hippocampus_cases(data_home):
    splits = td.load_msd("Task04_Hippocampus", root=REAL_CASES / "msd-hippocampus",
                         counts={"train": 1, "val": 0, "test": 1}, progress=False)
    for split in ("train", "test"):
        data = splits[split]
        assert data.image_size == (50, 50)
        assert {m.spacing for m in data.meta} == {(1.0, 1.0)}
        assert len(data) == 35  # every axial slice of a 35-slice volume
        assert set(np.unique(data.masks)) == {0, 1, 2}
        source = nib.load(REAL_CASES / "msd-hippocampus" / "labels" / f"{data.meta[0].volume_id}.nii.gz")
        labels = np.asarray(source.dataobj)
        assert (data.masks == 1).sum() == (labels == 1).sum()  # the 50 x 50 crop loses no label
        assert (data.masks == 2).sum() == (labels == 2).sum()


@needs_real_cases
def test_real_acdc_case(data_home):
    custom = dataclasses.replace(td.get_protocol("acdc", "prompt"), official_test=False)
    splits = td.load_acdc(root=REAL_CASES / "acdc", structure="lv", protocol=custom,
                          counts={"train": 1, "val": 0, "test": 0}, progress=False)
    data = splits.train
    assert data.image_size == (256, 256)
    # 216 x 1.5625 mm = 337.5 mm in 338 rows; 256 x 1.5625 mm = 400 mm in 400 columns
    assert data.meta[0].spacing == pytest.approx((337.5 / 338, 1.0)) or \
        data.meta[0].spacing == pytest.approx((1.0, 337.5 / 338))
    assert data.meta[0].thickness == pytest.approx(10.0)
    assert len(data) == 9  # slice 0 lacks a structure; the authors' preprocessing also keeps slices 1-9
    assert set(np.unique(data.masks)) == {0, 1}
    reference = np.asarray(nib.load(REAL_CASES / "acdc/training/patient001/patient001_frame01_gt.nii.gz").dataobj)
    assert {m.index for m in data.meta} <= {z for z in range(reference.shape[2])
                                            if {1, 2, 3} <= set(np.unique(reference[..., z]))}
    # LV area in mm^2 is kept by resampling within a few percent per slice
    for mask, meta in zip(data.masks, data.meta):
        area = (reference[..., meta.index] == 3).sum() * 1.5625 ** 2
        assert mask.sum() * np.prod(meta.spacing) == pytest.approx(area, rel=0.08)
    conformal = td.load_acdc(root=REAL_CASES / "acdc", protocol=dataclasses.replace(
        td.get_protocol("acdc", "conformal"), official_test=False), counts={"train": 1, "val": 0, "test": 0},
        progress=False)
    areas = (reference == 3).sum(axis=(0, 1))
    assert conformal.train.meta[0].index == int(np.argmax(areas))


@needs_real_cases
def test_real_hc18_images(data_home):
    splits = td.load_hc18(root=REAL_CASES / "hc18", counts={"train": None, "val": 0, "test": 0}, progress=False)
    data = splits.train
    assert data.image_size == (640, 640)
    assert {m.volume_id for m in data.meta} <= {"000_HC", "001_HC"}
    sizes = {"000_HC": 0.0691358041432, "001_HC": 0.0896585200514}
    for mask, meta in zip(data.masks, data.meta):
        assert meta.spacing == pytest.approx((sizes[meta.volume_id],) * 2)
        assert td.fill_outline(mask > 0).sum() == mask.sum()
        # the filled ellipse's perimeter is close to the published head circumference (44.3 and 56.81 mm)
        rows, cols = np.nonzero(mask)
        covariance = np.cov(np.stack([rows, cols]).astype(float))
        a, b = 2 * np.sqrt(np.linalg.eigvalsh(covariance)) * meta.spacing[0]
        circumference = np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b)))
        expected = {"000_HC": 44.3, "001_HC": 56.81}[meta.volume_id]
        assert circumference == pytest.approx(expected, rel=0.05)
