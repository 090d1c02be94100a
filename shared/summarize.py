"""A quick markdown table of finished runs: ``python -m shared.summarize RUNS_DIR [--per-task]``.

Reads each run's ``summary.json`` (and ``args.json``), groups runs by suite, method and run-name
suffix, and prints the median over seeds of the final mean evaluation return and success, every
seed's value, the three parameter counts, env steps and wall time. (The full report, with IQM,
bootstrap intervals and figures, is ``python -m shared.report``.)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from collections import defaultdict

import numpy as np


def load_runs(runs_dir: str) -> list[dict]:
    runs = []
    for path in sorted(glob.glob(os.path.join(runs_dir, "**", "summary.json"), recursive=True)):
        run_dir = os.path.dirname(path)
        with open(path) as f:
            summary = json.load(f)
        with open(os.path.join(run_dir, "args.json")) as f:
            args = json.load(f)
        runs.append({"dir": run_dir, "summary": summary, "args": args})
    return runs


def table(runs: list[dict], per_task: bool = False) -> str:
    groups = defaultdict(list)
    for run in runs:
        a = run["args"]
        groups[(a["env_id"], a["algo"], a.get("run_name_suffix", ""))].append(run)
    lines = ["| suite | method | variant | seeds | final return (median) | per seed | final success (median) "
             "| params total / active / trained-per-task | env steps | wall time (s, median) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (env_id, algo, suffix), group in sorted(groups.items()):
        group.sort(key=lambda r: r["args"]["seed"])
        returns = [r["summary"]["final_return"] for r in group]
        success = [r["summary"]["final_success_rate"] for r in group]
        counts = group[0]["summary"]["parameter_counts"]
        lines.append(
            f"| {env_id} | {algo} | {suffix or '-'} | {','.join(str(r['args']['seed']) for r in group)} "
            f"| {np.median(returns):.1f} | {' / '.join(f'{x:.1f}' for x in returns)} | {np.median(success):.2f} "
            f"| {counts['total']:,} / {counts['active']:,} / {counts['trained_per_task']:,} "
            f"| {group[0]['summary']['global_step']:,} "
            f"| {np.median([r['summary']['wall_time_s'] for r in group]):.0f} |")
        if per_task:
            for name in group[0]["summary"]["task_names"]:
                task_returns = [r["summary"]["per_task"][name]["return"] for r in group]
                lines.append(f"|  | | {name} | | {np.median(task_returns):.1f} "
                             f"| {' / '.join(f'{x:.1f}' for x in task_returns)} | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", nargs="?", default="runs")
    parser.add_argument("--per-task", action="store_true", help="add a row per task")
    opts = parser.parse_args()
    runs = load_runs(opts.runs_dir)
    if not runs:
        raise SystemExit(f"error: no finished runs (summary.json) under '{opts.runs_dir}'")
    print(table(runs, opts.per_task))


if __name__ == "__main__":
    main()
