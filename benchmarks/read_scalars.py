"""Print the last value of tensorboard scalars matching a pattern, per run directory.

    .venv/bin/python benchmarks/read_scalars.py RUN_DIR_GLOB PATTERN
"""

from __future__ import annotations

import glob
import re
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def last_scalars(run_dir: str, pattern: str) -> dict[str, float]:
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    regex = re.compile(pattern)
    return {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"] if regex.search(tag)}


if __name__ == "__main__":
    for run_dir in sorted(glob.glob(sys.argv[1])):
        print(run_dir)
        for tag, value in sorted(last_scalars(run_dir, sys.argv[2]).items()):
            print(f"  {tag} = {value:.4g}")
