import json
import subprocess
import sys
from pathlib import Path

import pytest

from medseg_nbdev.cli import build_parser, main


MEDSEG = Path(sys.executable).with_name("medseg")


def run_medseg(*args):
    "Run the installed `medseg` console script."
    if not MEDSEG.exists():
        pytest.skip(f"the medseg console script is not installed next to {sys.executable}")
    return subprocess.run([str(MEDSEG), *args], capture_output=True, text=True)


def subcommand_paths(parser, prefix=()):
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from subcommand_paths(sub, prefix + (name,))


def test_every_subcommand_has_help(capsys):
    paths = list(subcommand_paths(build_parser()))
    assert ("segment", "train") in paths
    assert ("data", "show") in paths
    for path in paths:
        with pytest.raises(SystemExit) as exit_info:
            main([*path, "--help"])
        assert exit_info.value.code == 0
        assert "usage: medseg" in capsys.readouterr().out


def test_console_script_entry_point():
    result = run_medseg("--help")
    assert result.returncode == 0, result.stderr
    assert "segment" in result.stdout


def test_data_list_prints_one_name_per_line():
    result = run_medseg("data", "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "colin27-hippocampus" in lines
    assert all(" " not in line for line in lines)


def test_data_show_writes_figure(colin27, tmp_path):
    figure = tmp_path / "examples.png"
    result = run_medseg("data", "show", "colin27-hippocampus", "--figure", str(figure))
    assert result.returncode == 0, result.stderr
    for field in ("source:", "licence:", "images per split: train", "image size: 128 x 128", "classes:"):
        assert field in result.stdout
    assert figure.stat().st_size > 10_000


def test_unknown_dataset_is_a_clear_error():
    result = run_medseg("data", "show", "colin28")
    assert result.returncode == 2
    assert result.stderr.startswith("medseg: error: Unknown data set 'colin28'"), result.stderr
    assert "Traceback" not in result.stderr


def test_segment_train_writes_outputs_and_resumes(colin27, tmp_path):
    out = tmp_path / "run"
    base = ("segment", "train", "--dataset", "colin27-hippocampus", "--out", str(out), "--width", "4",
            "--device", "cpu", "--quiet")
    args = (*base, "--steps", "3")
    result = run_medseg(*args)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("dsc_2d", "dsc_3d", "hd95_3d", "assd_2d"):
        assert 0 <= metrics[key] < float("inf")
    assert set(metrics["dsc_2d_per_class"]) == {"left_hippocampus", "right_hippocampus"}
    assert metrics["device"] == "cpu"
    assert metrics["mixed_precision"] is False
    for name in ("test_predictions.png", "training_curve.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0
    rerun = run_medseg(*args)
    assert rerun.returncode == 0, rerun.stderr
    other = run_medseg(*base, "--steps", "5")
    assert other.returncode != 0
    assert "other settings" in other.stderr


def test_bad_device_is_a_clear_error(tmp_path):
    result = run_medseg("segment", "train", "--out", str(tmp_path), "--device", "tpu", "--steps", "1")
    assert result.returncode == 2
    assert "Invalid device 'tpu'" in result.stderr
