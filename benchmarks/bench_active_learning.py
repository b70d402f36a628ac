"""Benchmark of active-learning sampling: time per strategy, stochastic batches against plain top-B,
and peak memory of MC-dropout and TTA scoring of a whole pool.

Run from the repository root:

    python benchmarks/bench_active_learning.py [--pool-size 84] [--steps 60] [--repeats 3]

Every number is printed next to a reference measured in the same process, as a ratio, so the
ratios stay meaningful on a loaded or slow machine. Peak memory is the growth of the process's
peak resident set (VmHWM in /proc/self/status), reset before each measurement by writing 5 to
/proc/self/clear_refs (Linux only; elsewhere the memory part is skipped).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from medseg_nbdev.active_learning import (AL_STRATEGIES, preset_config, prepare_data, select_stochastic_batch,
                                          select_top)
from medseg_nbdev.data import MissingDataError, SliceDataset, SliceMeta
from medseg_nbdev.uncertainty import SampleStatistics, image_scores, mc_dropout_sampler, score_pool, tta_sampler


def peak_rss_kib() -> int | None:
    "Peak resident set size of this process in KiB, or None where /proc is missing."
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def reset_peak_rss() -> bool:
    "Reset the peak resident set size to the current one; return whether it worked."
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_growth_mib(fn) -> float | None:
    "Growth of the peak resident set while running `fn`, in MiB."
    if not reset_peak_rss():
        return None
    before = peak_rss_kib()
    fn()
    return (peak_rss_kib() - before) / 1024


@torch.no_grad()
def stacked_scores(model, images: torch.Tensor, sampler, batch_size: int = 16) -> np.ndarray:
    "Reference that keeps all K maps of the whole pool before reducing them: the memory the on-the-fly path avoids."
    generator = torch.Generator().manual_seed(0)
    samples, valid = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        pairs = list(sampler(model, batch, generator))
        samples.append(torch.stack([p for p, _ in pairs]))
        masks = [v if v is not None else torch.ones(p.shape[0], *p.shape[2:], dtype=torch.bool) for p, v in pairs]
        valid.append(torch.stack(masks))
    samples, valid = torch.cat(samples, 1), torch.cat(valid, 1)  # (K, N, C, H, W) and (K, N, H, W)
    stats = SampleStatistics()
    for p, v in zip(samples, valid):
        stats.update(p, v)
    return image_scores(stats.jsd(), stats.valid).numpy()


def load_pool(pool_size: int) -> tuple[SliceDataset, SliceDataset, str]:
    "The teaching pool of colin27-hippocampus tiled to `pool_size` slices, or random images without the data."
    config, _ = preset_config("teaching")
    try:
        data = prepare_data(config)
        source = "colin27-hippocampus teaching pool (64 x 96)"
        train = data.train
    except MissingDataError:
        rng = np.random.default_rng(0)
        images = rng.random((84, 64, 96)).astype(np.float32)
        train = SliceDataset(images, (images > 0.8).astype(np.int64) * 1,
                             [SliceMeta("random", "coronal", i, (1.0, 1.0), 1.0) for i in range(84)], ("bright",))
        source = "random 64 x 96 images (mricron-data is not installed)"
    repeats = int(np.ceil(pool_size / len(train)))
    index = np.tile(np.arange(len(train)), repeats)[:pool_size]
    return train.subset(index), train, source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool-size", type=int, default=84, help="unlabelled images to score (default: 84)")
    parser.add_argument("--steps", type=int, default=60, help="training steps of the scored models (default: 60)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats, the median is kept (default: 3)")
    args = parser.parse_args()
    torch.manual_seed(0)
    pool, labelled_source, source = load_pool(args.pool_size)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f}")
    print(f"pool: {len(pool)} images from {source}")

    config, _ = preset_config("teaching")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=args.steps))
    labelled = labelled_source.subset(range(min(10, len(labelled_source))))
    trained = {name: AL_STRATEGIES[name].train(labelled, labelled, config, 0, "cpu")
               for name in ("entropy", "learning-loss")}

    # 1. Sampling time per strategy: scoring (or selecting) the whole pool, median of repeats
    print("\n1. sampling time per strategy (whole pool, median of repeats)")
    mask = np.zeros(len(pool), dtype=bool)
    mask[:10] = True
    times = {}
    for name, strategy in AL_STRATEGIES.items():
        model = trained["learning-loss" if strategy.trainer == "learning-loss" else "entropy"]
        runs = []
        for repeat in range(args.repeats):
            started = time.perf_counter()
            if strategy.score is not None:
                scores = strategy.score(model, pool, config, repeat)
                select_top(scores, config.budget)
            else:
                strategy.select(model, pool, mask, config.budget, config, np.random.default_rng(repeat))
            runs.append(time.perf_counter() - started)
        times[name] = float(np.median(runs))
    for name, seconds in times.items():
        print(f"   {name:14s} {seconds:8.3f} s   ratio to entropy {seconds / times['entropy']:7.2f}")

    # 2. Stochastic batches against top-B on the same scores
    print("\n2. stochastic batches (disjoint, Q = floor(N/B)) against top-B on the same scores")
    scores = score_pool(trained["entropy"]["model"], pool, "entropy")
    for n in (len(pool), 7163):  # 7163: the thesis' hippocampus training pool
        s = np.random.default_rng(0).random(n) if n != len(pool) else scores
        loops = 2000
        started = time.perf_counter()
        for i in range(loops):
            select_top(s, 10)
        top_seconds = (time.perf_counter() - started) / loops
        started = time.perf_counter()
        for i in range(loops):
            select_stochastic_batch(s, 10, rng=np.random.default_rng(i))
        sb_seconds = (time.perf_counter() - started) / loops
        print(f"   selection only, N = {n:5d}: top-B {top_seconds * 1e6:8.1f} us, SB {sb_seconds * 1e6:8.1f} us, "
              f"ratio {sb_seconds / top_seconds:5.2f}")
    # Both selections act on the same scores, so the scoring time is shared and timed once per repeat.
    for name in ("entropy", "dropout"):
        strategy = AL_STRATEGIES[name]
        score_runs, top_runs, sb_runs = [], [], []
        for repeat in range(args.repeats):
            started = time.perf_counter()
            pool_scores = strategy.score(trained["entropy"], pool, config, repeat)
            score_runs.append(time.perf_counter() - started)
            started = time.perf_counter()
            select_top(pool_scores, 10)
            top_runs.append(time.perf_counter() - started)
            started = time.perf_counter()
            select_stochastic_batch(pool_scores, 10, rng=np.random.default_rng(repeat))
            sb_runs.append(time.perf_counter() - started)
        scoring = np.median(score_runs)
        ratio = (scoring + np.median(sb_runs)) / (scoring + np.median(top_runs))
        verdict = "within" if abs(ratio - 1) <= 0.05 else "NOT within"
        print(f"   scoring + selection, {name:8s}: scoring {scoring:.3f} s, top-B {np.median(top_runs) * 1e3:.3f} ms, "
              f"SB {np.median(sb_runs) * 1e3:.3f} ms, ratio {ratio:.4f} ({verdict} 5 %)")

    # 3. Peak memory of scoring the whole pool: on-the-fly reduction against keeping all K maps
    print("\n3. peak memory growth while scoring the whole pool (K = 8)")
    model = trained["entropy"]["model"]
    images = torch.from_numpy(pool.images)[:, None]
    for name, sampler in (("MC dropout", mc_dropout_sampler(8)), ("TTA", tta_sampler(8))):
        online = peak_growth_mib(lambda: score_pool(model, pool, "jsd", sampler))
        stacked = peak_growth_mib(lambda: stacked_scores(model, images, sampler))
        if online is None:
            print("   /proc/self/clear_refs is not writable here; memory not measured")
            break
        k_maps = 8 * len(pool) * pool.n_classes * np.prod(pool.image_size) * 4 / 2**20
        print(f"   {name:10s}: on the fly {online:7.1f} MiB, all K maps kept {stacked:7.1f} MiB "
              f"(ratio {online / max(stacked, 1e-9):.2f}); the K maps alone take {k_maps:.1f} MiB")


if __name__ == "__main__":
    main()
