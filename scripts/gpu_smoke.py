#!/usr/bin/env python
"""Run each chapter's main `medseg` command on a CUDA GPU and print how long each one took.

The commands are listed in CHAPTER_COMMANDS, one entry per chapter; a chapter adds its own entry
when its command exists. Each command runs in a fresh process with `--device cuda`, its output
goes to OUT/NAME.log, and a summary (GPU, versions, wall time, training speed where the command
reports it) is printed and written to OUT/smoke.json. The script exits with status 2 when CUDA is
not available and with status 1 when a command fails.

Usage:
    python scripts/gpu_smoke.py --out runs/gpu-smoke
    python scripts/gpu_smoke.py --out runs/gpu-smoke --only segment-train
    python scripts/gpu_smoke.py --out runs/gpu-smoke --thesis-dataset acdc-lv   # also a thesis data set
    python scripts/gpu_smoke.py --list
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# (name, arguments of `medseg`); each command receives `--out OUT/NAME` and `--device cuda`.
CHAPTER_COMMANDS: list[tuple[str, list[str]]] = [
    # The README's main job: 1000 steps of the teaching preset on the embedded Colin27 data.
    ("segment-train", ["segment", "train", "--dataset", "colin27-hippocampus", "--quiet"]),
    # The published schedule (75 epochs x 250 steps = 18,750 steps, cross-entropy) cut to 5000 steps; the
    # printed steps per second give the time of the full run.
    ("segment-train-thesis-preset", ["segment", "train", "--dataset", "colin27-hippocampus", "--preset", "thesis",
                                     "--steps", "5000", "--quiet"]),
    # Chapter 2: one seed of the active-learning comparison (teaching preset), three uncertainty
    # strategies and random sampling, with and without stochastic batches.
    ("al", ["al", "--dataset", "colin27-hippocampus", "--strategy", "entropy", "dropout", "tta", "random",
            "--stochastic-batches", "both", "--seeds", "1", "--quiet"]),
    # Appendix II: one seed of TAAL against random sampling with and without the consistency loss.
    ("taal", ["taal", "--dataset", "colin27-hippocampus", "--seeds", "1", "--quiet"]),
    # Chapter 4: UNet, LiteMedSAM features, CRC, ConSeMa and RW-CP at three alphas, with the ablations.
    ("conformal", ["conformal", "--dataset", "colin27-hippocampus", "--alpha", "0.2", "0.1", "0.05",
                   "--n-cal", "20", "--seeds", "3", "--quiet"]),
]

MEDSEG = [sys.executable, "-c", "import sys; from medseg_nbdev.cli import main; sys.exit(main())"]


def cuda_summary() -> dict:
    "Return the GPU and library versions, or raise SystemExit(2) when CUDA is not available."
    import torch

    if not torch.cuda.is_available():
        print("gpu_smoke: CUDA is not available (torch.cuda.is_available() is False), so nothing was run. "
              "Run this script on a machine with an NVIDIA GPU and a CUDA build of PyTorch, such as a Colab GPU "
              "runtime.", file=sys.stderr)
        raise SystemExit(2)
    return {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "bf16": torch.cuda.is_bf16_supported()}


def run_command(name: str, arguments: list[str], out: Path) -> dict:
    "Run one `medseg` command with CUDA, log its output, and return its timing and status."
    folder = out / name
    command = MEDSEG + arguments + ["--out", str(folder), "--device", "cuda"]
    print(f"gpu_smoke: running {name}: medseg {' '.join(arguments)}", flush=True)
    started = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - started
    result = {"name": name, "command": ["medseg", *arguments], "status": status, "wall_seconds": round(seconds, 1)}
    metrics_file = folder / "metrics.json"
    if status == 0 and metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        steps = metrics.get("config", {}).get("steps")
        train_seconds = metrics.get("train_seconds")
        if steps and train_seconds:
            result["steps_per_second"] = round(steps / train_seconds, 1)
        result["dsc_3d"] = metrics.get("dsc_3d")
        result["device"] = metrics.get("device")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run each chapter's main medseg command on CUDA and time it.")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-smoke"),
                        help="folder for the runs, logs and smoke.json (default: runs/gpu-smoke)")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run only these commands")
    parser.add_argument("--thesis-dataset", default=None, metavar="NAME",
                        help="also train on this registered thesis data set with the thesis preset (5000 steps)")
    parser.add_argument("--list", action="store_true", help="print the command names and exit")
    args = parser.parse_args(argv)

    commands = list(CHAPTER_COMMANDS)
    if args.thesis_dataset:
        commands.append((f"segment-train-{args.thesis_dataset}",
                         ["segment", "train", "--dataset", args.thesis_dataset, "--preset", "thesis", "--steps",
                          "5000", "--quiet"]))
    if args.list:
        for name, arguments in commands:
            print(f"{name}: medseg {' '.join(arguments)}")
        return 0
    if args.only:
        unknown = sorted(set(args.only) - {name for name, _ in commands})
        if unknown:
            parser.error(f"unknown command name(s) {unknown}; see --list")
        commands = [(name, arguments) for name, arguments in commands if name in args.only]

    summary = cuda_summary()
    args.out.mkdir(parents=True, exist_ok=True)
    results = [run_command(name, arguments, args.out) for name, arguments in commands]
    summary["results"] = results
    (args.out / "smoke.json").write_text(json.dumps(summary, indent=2) + "\n")

    print(f"\nGPU: {summary['gpu']} (torch {summary['torch']}, CUDA {summary['cuda']}, bf16 {summary['bf16']})")
    print(f"{'command':<40} {'status':>6} {'wall s':>8} {'steps/s':>8} {'DSC 3D':>7}")
    for r in results:
        dsc = f"{r['dsc_3d']:.3f}" if r.get("dsc_3d") is not None else "-"
        print(f"{r['name']:<40} {r['status']:>6} {r['wall_seconds']:>8} {r.get('steps_per_second', '-'):>8} {dsc:>7}")
    failed = [r["name"] for r in results if r["status"] != 0]
    if failed:
        print(f"gpu_smoke: failed: {', '.join(failed)}; see their logs in {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
