"""Benchmark of prompt learning on the CPU: LiteMedSAM encoder time per image, one training epoch with
cached image embeddings against one that recomputes them, and the peak memory of each phase.

Each phase runs in its own child process, so its peak resident memory (ru_maxrss) is its own. The
ratios compare phases of the same run on the same machine; the absolute times depend on the machine
and on its load, which the report prints.

    python benchmarks/bench_prompt_learning.py [--samples 8] [--repeats 2]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import time


def _setup(n_samples: int):
    import numpy as np

    from medseg_nbdev.data import load_dataset
    from medseg_nbdev.foundation import load_promptable_model
    from medseg_nbdev.prompt_learning import box_task

    task = box_task(load_dataset("colin27-hippocampus").train)
    task = task.subset(np.arange(min(n_samples, len(task))))
    return load_promptable_model("litemedsam", device="cpu"), task


def encoder_phase(n_samples: int, repeats: int, queue) -> None:
    "Time the frozen image encoder on `n_samples` slices, best of `repeats`."
    model, task = _setup(n_samples)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.encode(task.images, batch_size=4)
        times.append(time.perf_counter() - start)
    queue.put({"seconds_per_image": min(times) / len(task), "peak_rss_mb": _peak_mb()})


def epoch_phase(n_samples: int, repeats: int, recompute: bool, queue) -> None:
    "Time one training epoch (all four losses, batch 4) with cached embeddings or with the encoder in every step."
    import torch

    from medseg_nbdev.core import set_seed
    from medseg_nbdev.prompt_learning import PromptConfig, PromptModule, _subset, prepare_task, step_losses

    model, task = _setup(n_samples)
    config = PromptConfig(epochs=1)
    prepared = prepare_task(model, task, "box", model.encode(task.images, batch_size=4))
    set_seed(0)
    module = PromptModule(True, no_mask_embedding=model.prompt_encoder.no_mask_embed.weight[0].detach())
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for first in range(0, len(task), config.batch_size):
            index = torch.arange(first, min(first + config.batch_size, len(task)))
            batch = _subset(prepared, index)
            if recompute:  # what training would cost if the encoder ran on every batch
                batch.embeddings = model.encode(task.images[index.numpy()], batch_size=4)
            terms = step_losses(model, module, batch, config, 5.0, [k % 8 for k in range(len(index))])
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
    queue.put({"epoch_seconds": min(times), "peak_rss_mb": _peak_mb()})


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _run(target, *args) -> dict:
    queue = mp.get_context("spawn").Queue()
    process = mp.get_context("spawn").Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8, help="training samples per epoch (default: 8)")
    parser.add_argument("--repeats", type=int, default=2, help="repetitions per phase; the best is kept (default: 2)")
    args = parser.parse_args()

    import torch

    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"load average before the run {os.getloadavg()[0]:.1f}")
    encoder = _run(encoder_phase, args.samples, args.repeats)
    cached = _run(epoch_phase, args.samples, args.repeats, False)
    recomputed = _run(epoch_phase, args.samples, args.repeats, True)
    print(f"LiteMedSAM encoder: {encoder['seconds_per_image']:.2f} s per 128x128 slice (batches of 4), "
          f"peak memory {encoder['peak_rss_mb']:.0f} MB")
    print(f"Training epoch of {args.samples} samples, all four losses, batch 4:")
    print(f"  cached embeddings:    {cached['epoch_seconds']:7.1f} s, peak memory {cached['peak_rss_mb']:.0f} MB")
    print(f"  encoder in each step: {recomputed['epoch_seconds']:7.1f} s, peak memory {recomputed['peak_rss_mb']:.0f} MB")
    print(f"  ratio (recomputed / cached): {recomputed['epoch_seconds'] / cached['epoch_seconds']:.2f}")
    print(f"Load average after the run {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
