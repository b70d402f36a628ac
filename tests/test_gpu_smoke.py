"""The GPU smoke script refuses to run without CUDA and records each command's status and speed."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "scripts" / "gpu_smoke.py")
gpu_smoke = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_smoke)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_smoke_refuses_without_cuda(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        gpu_smoke.main(["--out", str(tmp_path / "smoke")])
    assert info.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "smoke").exists()


# Stands in for `medseg`: writes the metrics.json that `medseg segment train` writes, or fails on request
FAKE_MEDSEG = """
import json, sys
from pathlib import Path
args = sys.argv[1:]
if "--fail" in args:
    sys.exit(3)
out = Path(args[args.index("--out") + 1])
out.mkdir(parents=True)
(out / "metrics.json").write_text(json.dumps({"config": {"steps": 500}, "train_seconds": 4.0, "dsc_3d": 0.7,
                                              "device": args[args.index("--device") + 1]}))
print("trained")
"""


def test_smoke_records_status_and_speed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_smoke, "MEDSEG", [sys.executable, "-c", FAKE_MEDSEG])
    monkeypatch.setattr(gpu_smoke, "cuda_summary", lambda: {"gpu": "test GPU", "torch": "x", "cuda": "y",
                                                            "bf16": True})
    monkeypatch.setattr(gpu_smoke, "CHAPTER_COMMANDS", [("works", ["segment", "train"]), ("breaks", ["--fail"])])
    assert gpu_smoke.main(["--out", str(tmp_path)]) == 1
    summary = json.loads((tmp_path / "smoke.json").read_text())
    works, breaks = summary["results"]
    assert works["status"] == 0
    assert works["steps_per_second"] == 125.0
    assert works["device"] == "cuda"
    assert breaks["status"] == 3
    assert (tmp_path / "works.log").read_text().strip() == "trained"
    assert "failed: breaks" in capsys.readouterr().err


@pytest.mark.parametrize("name, arguments", gpu_smoke.CHAPTER_COMMANDS, ids=[n for n, _ in gpu_smoke.CHAPTER_COMMANDS])
def test_chapter_command_parses(name, arguments, tmp_path):
    from medseg_nbdev.cli import build_parser

    args = build_parser().parse_args([*arguments, "--out", str(tmp_path / name), "--device", "cuda"])
    assert args.device == "cuda"
    assert callable(args.handler)
