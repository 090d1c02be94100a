"""The evidence behind the README's tuning table: one row per run of the given directories.

    .venv/bin/python benchmarks/tuning_table.py runs/tune-ppo [more run dirs...]

Each row names the run's method, its variant (``--run-name-suffix``), the flags in which it
differs from the other runs of the same method and suite, its seed and env steps, then the
tuning metrics: final mean success (the final evaluation: 50 episodes per task on Meta-World),
the mean success over the run's periodic evaluations (area under the learning curve, scaled to
[0, 1]), final success per task, the training return per task over the last fifth of the run
(tensorboard's ``charts/<task>/episodic_return``: at a small budget it separates settings that
final success, still 0 on the harder tasks, does not), wall time and the run directory (its
``args.json`` holds every value). Unfinished runs (no ``summary.json``) are listed with their
last evaluation.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from collections import defaultdict

import numpy as np
from diagnostics_over_training import scalars

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
    return {"dir": run_dir, "args": args, "evals": evals, "summary": summary,
            "train_return": last_fifth_returns(run_dir)}


def last_fifth_returns(run_dir: str) -> dict[str, float]:
    """Mean training episodic return per task over the last fifth of the logged env steps."""
    out = {}
    for tag, (steps, values) in scalars(run_dir).items():
        parts = tag.split("/")
        if len(parts) == 3 and parts[0] == "charts" and parts[2] == "episodic_return" and steps.size:
            out[parts[1]] = float(values[steps > 0.8 * steps.max()].mean())
    return out


def flag_value(args: dict, key: str) -> str:
    """A flag's value as the table prints it; "absent" for a run made before the flag existed."""
    return json.dumps(args[key], sort_keys=True) if key in args else "absent"


def differing_flags(group: list[dict]) -> dict[str, set]:
    """For runs of one method and suite: the flags whose values are not the same in all of them."""
    keys = set().union(*(run["args"] for run in group)) - NOT_KNOBS
    values = {key: {flag_value(run["args"], key) for run in group} for key in keys}
    return {key: v for key, v in values.items() if len(v) > 1}


def rows(runs: list[dict]) -> list[str]:
    groups = defaultdict(list)
    for run in runs:
        groups[(run["args"]["env_id"], run["args"]["algo"])].append(run)
    lines = ["| suite | method | variant | differs in | seed | env steps | final success | mean success over "
             "evaluations | final success per task | training return per task, last fifth | wall time (min) | run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
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
            train = " ".join(f"{t}={v:.0f}" for t, v in run["train_return"].items()) or "-"
            flags = ", ".join(f"{k}={flag_value(args, k)}" for k in knobs) or "-"
            lines.append(f"| {env_id} | {algo} | {args.get('run_name_suffix') or '-'} | {flags} | {args['seed']} "
                         f"| {steps} | {final} | {curve} | {per_task} | {train} | {wall} "
                         f"| {os.path.basename(run['dir'])} |")
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
