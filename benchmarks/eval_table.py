"""The README's learning-curve tables: one markdown block per run, success per task at each periodic
evaluation, then the final evaluation and the wall time; a run with --eval-sampled (the default)
adds a row of mean success with sampled actions.

    .venv/bin/python benchmarks/eval_table.py RUN_DIR [RUN_DIR...]

A RUN_DIR may also be a folder above run directories (every run below it is listed). The values
come from each run's eval.jsonl (the last line per step: a resumed run may repeat one) and
summary.json; a run without summary.json is unfinished and shows its evaluations so far.
"""

from __future__ import annotations

import glob
import json
import os
import sys


def run_dirs(paths: list[str]) -> list[str]:
    found = []
    for path in paths:
        if os.path.exists(os.path.join(path, "args.json")):
            found.append(path)
        else:
            found += sorted(os.path.dirname(p) for p in glob.glob(os.path.join(path, "**", "args.json"),
                                                                  recursive=True))
    if not found:
        sys.exit(f"eval_table.py: no run directory (a folder with args.json) in {' '.join(paths)}")
    return found


def steps_label(step: int) -> str:
    return f"{step / 1e6:g}M" if step >= 1_000_000 else f"{step // 1000}k"


def table(run_dir: str) -> str:
    with open(os.path.join(run_dir, "args.json")) as f:
        args = json.load(f)
    periodic, sampled = {}, {}
    eval_path = os.path.join(run_dir, "eval.jsonl")
    if os.path.exists(eval_path):
        with open(eval_path) as f:
            for line in f:
                entry = json.loads(line)
                if not entry["final"] and not entry.get("label"):
                    periodic[entry["global_step"]] = entry
                elif not entry["final"] and entry.get("label") == "sampled":
                    sampled[entry["global_step"]] = entry
    summary_path = os.path.join(run_dir, "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else None
    steps = sorted(periodic)
    tasks = list(summary["task_names"]) if summary else list(next(iter(periodic.values()))["per_task"]) \
        if periodic else []
    head = ["task", *map(steps_label, steps), "final"]
    rows = [f"{os.path.basename(os.path.normpath(run_dir))} (seed {args['seed']})",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in tasks:
        cells = [f"{periodic[s]['per_task'][task]['success_rate']:.2g}" for s in steps]
        final = f"{summary['per_task'][task]['success_rate']:.2f}" if summary else "-"
        rows.append(f"| {task} | " + " | ".join([*cells, final]) + " |")
    means = [f"{periodic[s]['success_rate']:.2f}" for s in steps]
    final = f"**{summary['final_success_rate']:.3f}**" if summary else "unfinished"
    rows.append("| mean | " + " | ".join([*means, final]) + " |")
    if sampled:  # --eval-sampled: the same evaluations with sampled actions
        cells = [f"{sampled[s]['success_rate']:.2f}" if s in sampled else "-" for s in steps]
        final = f"{summary['sampled']['final_success_rate']:.3f}" if summary and "sampled" in summary else "-"
        rows.append("| mean, sampled actions | " + " | ".join([*cells, final]) + " |")
    if summary:
        rows.append(f"wall {summary['wall_time_s'] / 60:.0f} min, {summary['global_step']:,} steps")
    return "\n".join(rows)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print("\n\n".join(table(d) for d in run_dirs(sys.argv[1:])))


if __name__ == "__main__":
    main()
