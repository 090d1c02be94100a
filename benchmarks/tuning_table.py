"""The evidence behind the README's tuning table: one row per run of the given directories.

    .venv/bin/python benchmarks/tuning_table.py runs/tune-ppo [more run dirs...]

Each row names the run's method, its variant (``--run-name-suffix``), the flags in which it
differs from the other runs of the same method and suite, its seed and env steps, then the
tuning metrics: final mean success (the final evaluation: 50 episodes per task on Meta-World),
the mean success over the run's periodic evaluations (area under the learning curve, scaled to
[0, 1]), final success per task, wall time and the run directory (its ``args.json`` holds every
value). Unfinished runs (no ``summary.json``) are listed with their last evaluation.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from collections import defaultdict

import numpy as np

# Flags that name, place, resume or speed up a run rather than configure what it learns.
NOT_KNOBS = {"run_name", "run_name_suffix", "runs_dir", "seed", "track", "wandb_project_name", "wandb_entity",
             "resume", "checkpoint_every", "torch_threads", "async_envs", "cuda"}


def load(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "args.json")) as f:
        args = json.load(f)
    evals = []
    if os.path.exists(os.path.join(run_dir, "eval.jsonl")):
        with open(os.path.join(run_dir, "eval.jsonl")) as f:
            evals = [json.loads(line) for line in f if line.strip()]
    summary = None
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    return {"dir": run_dir, "args": args, "evals": evals, "summary": summary}


def differing_flags(group: list[dict]) -> dict[str, set]:
    """For runs of one method and suite: the flags whose values are not the same in all of them."""
    keys = set().union(*(run["args"] for run in group)) - NOT_KNOBS
    values = {key: {json.dumps(run["args"].get(key), sort_keys=True) for run in group} for key in keys}
    return {key: v for key, v in values.items() if len(v) > 1}


def rows(runs: list[dict]) -> list[str]:
    groups = defaultdict(list)
    for run in runs:
        groups[(run["args"]["env_id"], run["args"]["algo"])].append(run)
    lines = ["| suite | method | variant | differs in | seed | env steps | final success | mean success over "
             "evaluations | final success per task | wall time (min) | run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (env_id, algo), group in sorted(groups.items()):
        knobs = sorted(differing_flags(group))
        for run in sorted(group, key=lambda r: (r["args"].get("run_name_suffix", ""), r["args"]["seed"])):
            args, evals, summary = run["args"], run["evals"], run["summary"]
            periodic = [e for e in evals if not e["final"] and not e.get("label")]
            curve = f"{np.mean([e['success_rate'] for e in periodic]):.3f}" if periodic else "-"
            if summary is not None:
                final = f"{summary['final_success_rate']:.3f}"
                per_task = " ".join(f"{t}={v['success_rate']:.2f}" for t, v in summary["per_task"].items())
                steps, wall = f"{summary['global_step']:,}", f"{summary['wall_time_s'] / 60:.0f}"
            else:
                last = periodic[-1] if periodic else None
                final = "unfinished" + (f" (last evaluation {last['success_rate']:.3f})" if last else "")
                per_task = ""
                steps = f"{last['global_step']:,} of {args['total_timesteps']:,}" if last else "-"
                wall = "-"
            flags = ", ".join(f"{k}={json.dumps(args.get(k))}" for k in knobs) or "-"
            lines.append(f"| {env_id} | {algo} | {args.get('run_name_suffix') or '-'} | {flags} | {args['seed']} "
                         f"| {steps} | {final} | {curve} | {per_task} | {wall} | {os.path.basename(run['dir'])} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dirs", nargs="+")
    opts = parser.parse_args()
    run_dirs = sorted({os.path.dirname(p) for d in opts.runs_dirs
                       for p in glob.glob(os.path.join(d, "**", "args.json"), recursive=True)})
    if not run_dirs:
        parser.error(f"no run directory (with an args.json) under {' '.join(opts.runs_dirs)}")
    print("\n".join(rows([load(d) for d in run_dirs])))


if __name__ == "__main__":
    main()
