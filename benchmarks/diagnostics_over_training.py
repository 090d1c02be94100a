"""Training diagnostics of several runs side by side at the same env steps, from tensorboard.

    .venv/bin/python benchmarks/diagnostics_over_training.py RUN_DIR [RUN_DIR...] \\
        --tags losses/clipfrac losses/approx_kl varshare/effective_beta --points 6

For each tag, one row per checkpoint step and one column per run: the mean of the tag over the
iterations logged in the window that ends at that step (windows split each run's logged range
into --points equal parts, so runs of one budget are compared at the same steps). A tag given
as a regular expression (``varshare/.*/mean_sigma``) expands to every matching tag; a run that
does not log a tag shows "-".
"""

from __future__ import annotations

import argparse
import os
import re

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(run_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        out[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--tags", nargs="+", required=True, help="tags or regular expressions")
    parser.add_argument("--points", type=int, default=6, help="windows per run")
    opts = parser.parse_args()
    runs = {os.path.basename(os.path.normpath(d)): scalars(d) for d in opts.run_dirs}
    last_step = max((steps.max() for run in runs.values() for steps, _ in run.values() if steps.size), default=0)
    edges = np.linspace(0, last_step, opts.points + 1)
    names = list(runs)
    for pattern in opts.tags:
        regex = re.compile(f"^{pattern}$")
        tags = sorted({tag for run in runs.values() for tag in run if regex.match(tag)})
        for tag in tags:
            print(f"\n{tag}\n| step | " + " | ".join(names) + " |")
            print("|---|" + "---|" * len(names))
            for lo, hi in zip(edges[:-1], edges[1:], strict=True):
                cells = []
                for name in names:
                    steps, values = runs[name].get(tag, (np.array([]), np.array([])))
                    window = values[(steps > lo) & (steps <= hi)]
                    cells.append(f"{window.mean():.4g}" if window.size else "-")
                print(f"| {int(hi):,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
