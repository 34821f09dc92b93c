"""The Trainer's profiler: `trainer.profiler=simple|advanced|pytorch`, or by default none.

Lightning wraps every hook it calls (about 100 per LeNet step: each callback's hooks, the
module's, the strategy's) in `profiler.profile(name)`, and with profiling off its
PassThroughProfiler still builds a generator context manager for each: ~2 us apiece, ~1% of
a LeNet step on 2 CPU cores (`make bench`). With profiling off this profiler hands out one
shared no-op context instead.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from lightning.pytorch.profilers import (
    AdvancedProfiler,
    PassThroughProfiler,
    Profiler,
    PyTorchProfiler,
    SimpleProfiler,
)

PROFILERS: dict[str, type[Profiler]] = {
    "simple": SimpleProfiler,
    "advanced": AdvancedProfiler,
    "pytorch": PyTorchProfiler,
}
_NO_OP = contextlib.nullcontext()


class NoProfiler(PassThroughProfiler):
    def profile(self, action_name: str) -> contextlib.nullcontext:  # type: ignore[override]
        return _NO_OP


def build_profiler(name: str | None, output_dir: Path) -> Profiler:
    """Lightning's profiler `name`, reporting to OUTPUT_DIR/fit-profile.txt; None: none."""
    if name is None:
        return NoProfiler()
    return PROFILERS[name](dirpath=output_dir, filename="profile")
