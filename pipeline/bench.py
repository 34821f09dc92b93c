"""Benchmark: `make bench` (python -m pipeline.bench).

Measures what the pipeline's speed rests on, with the pipeline's own code:
- loading a preprocessed split of MNIST's size (70,000 x 1 x 28 x 28 uint8) into memory.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.data.store import Split, load_split, save_split


def bench_load(count: int = 70_000, shape: tuple[int, int, int] = (1, 28, 28), repeats: int = 5):
    """Seconds to load a `count`-image split written by the preprocess stage's writer."""
    generator = torch.Generator().manual_seed(0)
    split = Split(
        torch.randint(0, 256, (count, *shape), dtype=torch.uint8, generator=generator),
        torch.randint(0, 10, (count,), generator=generator),
        torch.arange(count),
    )
    with tempfile.TemporaryDirectory() as directory:
        save_split(Path(directory), "train", split)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            loaded = load_split(Path(directory), "train")  # reads the whole file: no mmap
            times.append(time.perf_counter() - start)
    assert torch.equal(loaded.images, split.images)
    return times


def main() -> None:
    times = bench_load()
    print(
        f"load 70,000 x 1 x 28 x 28 uint8 split: "
        f"first {times[0] * 1e3:.1f} ms, median {statistics.median(times) * 1e3:.1f} ms, "
        f"best {min(times) * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
