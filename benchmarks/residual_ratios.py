"""VarShare's final residual ratios ||mu_m|| / ||theta|| per task, from the runs' tensorboard logs.

    .venv/bin/python benchmarks/residual_ratios.py [RUNS_DIR]

For each ppo_varshare run: the ratio over all layers and at the actor's output layer (where a
sign flip of the actions lives), per task; on cartpole-conflict also the ratio of the inverted
tasks' mean to the other tasks' mean.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from read_scalars import last_scalars  # noqa: E402


def main() -> None:
    runs_dir = sys.argv[1] if len(sys.argv) > 1 else "runs"
    print("| suite | variant | seed | residual ratio per task (all layers) | actor head "
          "| inverted / others (all layers) | inverted / others (actor head) |")
    print("|---|---|---|---|---|---|---|")
    for run_dir in sorted(glob.glob(os.path.join(runs_dir, "*__ppo_varshare__*"))):
        if not os.path.exists(os.path.join(run_dir, "summary.json")):
            continue
        args = json.load(open(os.path.join(run_dir, "args.json")))
        scalars = last_scalars(run_dir, r"residual_ratio(/actor\d+)?$")
        heads = [int(tag.rsplit("actor", 1)[1]) for tag in scalars if "/actor" in tag]
        if not heads:  # stopped before its first diagnostics were logged
            print(f"(skipped {run_dir}: no varshare/ residual ratios in its logs)", file=sys.stderr)
            continue
        head = max(heads)
        overall = {t: scalars[f"varshare/{t}/residual_ratio"] for t in args["task_names"]}
        at_head = {t: scalars[f"varshare/{t}/residual_ratio/actor{head}"] for t in args["task_names"]}
        inverted = [t for t in args["task_names"] if t.endswith("inverted")]
        others = [t for t in args["task_names"] if t not in inverted]

        def contrast(values, inverted=inverted, others=others):
            if not inverted or not others:
                return "-"
            return f"{np.mean([values[t] for t in inverted]) / np.mean([values[t] for t in others]):.2f}"

        print(f"| {args['env_id']} | {args.get('run_name_suffix') or args['residual']} | {args['seed']} "
              f"| {' '.join(f'{t}={v:.4f}' for t, v in overall.items())} "
              f"| {' '.join(f'{v:.3f}' for v in at_head.values())} | {contrast(overall)} | {contrast(at_head)} |")


if __name__ == "__main__":
    main()
