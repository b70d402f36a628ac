"""Benchmarks of the conformal chapter, with ratios measured in one run on one machine.

1. Exact CRC threshold (one sort) against a 1000-point grid search on the same calibration
   scores: the exact value must be equal or tighter, and we report the speed ratio.
2. k-NN graph construction plus 10 diffusion steps on a 64 x 64 grid of 256-d features: time
   per image and peak memory on this CPU, whose target is under 0.2 s per image. The full
   similarity matrix in one chunk is the reference, and a CUDA GPU is measured when present.
3. Whole RW-CP calibration for n = 20 images with cached features: reading the features,
   diffusing 20 probability maps and computing lambda_hat.

Run from the repository root: `python benchmarks/bench_conformal.py` (add `--quick` for fewer
repeats). Timings depend on the machine's load; the script prints the load average next to
them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medseg_nbdev.conformal import alpha_star, crc_lambda_hat, crc_lambda_hat_grid, empirical_fnr, foreground_scores
from medseg_nbdev.rwcp import IntensityPositionFeatures, RandomWalkConfig, cached_features, rw_diffusion


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("n/a",)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"CPU {cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, load average {tuple(round(v, 2) for v in load)}, GPU {gpu}")


def timed(fn, repeats: int) -> float:
    "Median wall time of `fn()` in seconds over `repeats` calls, after one warm-up call."
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def calibration_scores(rng: np.random.Generator, n: int = 20, size: int = 128) -> list[np.ndarray]:
    "Foreground scores of n synthetic over-confident probability maps with blob masks of a few hundred pixels."
    yy, xx = np.mgrid[:size, :size]
    probs, masks = [], []
    for _ in range(n):
        cy, cx, r = rng.uniform(30, size - 30, 2).tolist() + [rng.uniform(6, 14)]
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
        signed = r - np.hypot(yy - cy - rng.normal(0, 2), xx - cx - rng.normal(0, 2))
        probs.append(1 / (1 + np.exp(-3 * signed + rng.normal(0, 1, (size, size)))))
        masks.append(mask)
    return foreground_scores(np.stack(probs), np.stack(masks))


def bench_lambda_hat(repeats: int) -> dict:
    rng = np.random.default_rng(0)
    tighter, equal, gaps = 0, 0, []
    for _ in range(200):
        scores = calibration_scores(rng)
        alpha = float(rng.choice([0.2, 0.1, 0.05]))
        exact, grid = crc_lambda_hat(scores, alpha), crc_lambda_hat_grid(scores, alpha, 1000)
        if exact > grid:
            raise AssertionError(f"exact lambda_hat {exact} exceeds the grid search's {grid}")
        tighter += exact < grid
        equal += exact == grid
        gaps.append(grid - exact)
        assert empirical_fnr(scores, exact).mean() <= alpha_star(alpha, len(scores)) + 1e-12
    scores = calibration_scores(rng)
    exact_time = timed(lambda: crc_lambda_hat(scores, 0.1), repeats * 20)
    grid_time = timed(lambda: crc_lambda_hat_grid(scores, 0.1, 1000), repeats * 20)
    n_scores = sum(s.size for s in scores)
    return {"draws": 200, "exact_tighter": int(tighter), "exact_equal": int(equal), "mean_gap": float(np.mean(gaps)),
            "max_gap": float(np.max(gaps)), "scores_per_calibration": int(n_scores),
            "exact_seconds": exact_time, "grid_seconds": grid_time, "speed_ratio_grid_over_exact": grid_time / exact_time}


GRAPH_CHILD = r"""
import json, resource, sys, time, torch, numpy as np
from medseg_nbdev.rwcp import knn_cosine, transition_from_neighbours, diffuse
chunk, repeats, device, threads = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
if threads:
    torch.set_num_threads(threads)
features = torch.randn(256, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
values = np.random.default_rng(0).random((64, 64))
def run():
    indices, distances = knn_cosine(features, 20, chunk)
    diffuse(transition_from_neighbours(indices, distances, 50.0), values, 10)
    if device != "cpu":
        torch.cuda.synchronize()
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
run()
times = []
for _ in range(repeats):
    started = time.perf_counter(); run(); times.append(time.perf_counter() - started)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
gpu_peak = torch.cuda.max_memory_allocated() if device != "cpu" else 0
print(json.dumps({"seconds": sorted(times)[len(times) // 2], "peak_rss_increase_mb": (peak - baseline) / 1024,
                  "gpu_peak_mb": gpu_peak / 2**20}))
"""


def bench_graph(repeats: int) -> dict:
    "Time and peak memory of kNN graph + 10 steps, each setting in a fresh process so peak memory is its own."
    # threads 0 keeps torch's default (one per core); 1 helps when other jobs load the machine
    settings = [("cpu", 1024, 0), ("cpu", 1024, 1), ("cpu", 4096, 0)]
    if torch.cuda.is_available():
        settings += [("cuda", 1024, 0), ("cuda", 4096, 0)]
    out = {}
    for device, chunk, threads in settings:
        result = subprocess.run([sys.executable, "-c", GRAPH_CHILD, str(chunk), str(repeats), device, str(threads)],
                                capture_output=True, text=True, check=True)
        name = f"{device}, chunk {chunk}" + (f", {threads} thread" if threads else "")
        out[name] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def bench_calibration(repeats: int) -> dict:
    "RW-CP calibration of n = 20 images whose features are already in the disk cache."
    rng = np.random.default_rng(1)
    images = rng.random((20, 128, 128)).astype(np.float32)
    disc = np.hypot(*np.mgrid[-64:64, -64:64]) < 20
    probs = np.clip(images * 0.2 + disc * 0.8 + rng.normal(0, 0.05, images.shape), 0, 1)
    masks = np.broadcast_to(np.hypot(*np.mgrid[-64:64, -64:64]) < 22, probs.shape)
    # 256-d features on a 64 x 64 grid, the shape of LiteMedSAM's, stored through the feature cache
    extractor = IntensityPositionFeatures(n_features=256)
    extractor.cacheable = True
    with tempfile.TemporaryDirectory() as folder:
        cached_features(extractor, images, folder=folder, progress=False)

        def calibrate():
            features = cached_features(extractor, images, folder=folder, progress=False)
            diffused = rw_diffusion(probs, features, RandomWalkConfig())
            return crc_lambda_hat(foreground_scores(diffused, masks), 0.1)

        started = time.perf_counter()
        features = cached_features(extractor, images, folder=folder, progress=False)
        read = time.perf_counter() - started
        total = timed(calibrate, max(1, repeats // 2))
    return {"n": 20, "feature_grid": list(features.shape[1:]), "read_features_seconds": read,
            "total_seconds": total, "seconds_per_image": total / 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    print("machine:", machine())

    lam = bench_lambda_hat(repeats)
    print(f"\n1. exact lambda_hat vs 1000-point grid ({lam['scores_per_calibration']} scores, n = 20):")
    print(f"   over {lam['draws']} calibration draws the exact value was tighter {lam['exact_tighter']} times and "
          f"equal {lam['exact_equal']} times, never larger; mean gap {lam['mean_gap']:.2e}, max {lam['max_gap']:.2e}")
    print(f"   exact {lam['exact_seconds'] * 1e3:.3f} ms, grid {lam['grid_seconds'] * 1e3:.3f} ms: "
          f"the exact value is {lam['speed_ratio_grid_over_exact']:.1f}x faster")

    graph = bench_graph(repeats)
    print("\n2. kNN graph (k = 20, exact cosine) + 10 diffusion steps, 64 x 64 grid of 256-d features:")
    for name, r in graph.items():
        print(f"   {name:26s} {r['seconds'] * 1e3:8.1f} ms per image, peak RSS increase {r['peak_rss_increase_mb']:7.1f} MB"
              + (f", GPU peak {r['gpu_peak_mb']:.1f} MB" if r["gpu_peak_mb"] else ""))
    reference = graph["cpu, chunk 4096"]  # one chunk: the whole 4096 x 4096 similarity matrix at once
    chunked = graph["cpu, chunk 1024"]
    print(f"   chunk 1024 against the full matrix: time ratio {chunked['seconds'] / reference['seconds']:.2f}, "
          f"peak RSS increase ratio {chunked['peak_rss_increase_mb'] / reference['peak_rss_increase_mb']:.2f}")
    best = min(r["seconds"] for name, r in graph.items() if name.startswith("cpu"))
    print(f"   target under 0.2 s per image on the CPU: {'met' if best < 0.2 else 'NOT met'} "
          f"(best {best:.3f} s at the load average above)")
    if not torch.cuda.is_available():
        print("   no CUDA GPU on this machine, so no GPU timing")

    calibration = bench_calibration(repeats)
    print(f"\n3. RW-CP calibration, n = 20, cached features {tuple(calibration['feature_grid'])}: "
          f"{calibration['total_seconds']:.2f} s in all ({calibration['seconds_per_image'] * 1e3:.0f} ms per image; "
          f"reading the 20 cached feature files {calibration['read_features_seconds'] * 1e3:.0f} ms)")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "lambda_hat": lam, "graph": graph,
                                               "calibration": calibration}, indent=2))


if __name__ == "__main__":
    main()
