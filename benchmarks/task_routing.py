"""Does a trained policy act differently per task on the same observations?

A multi-task network that cannot tell two tasks apart (a task-blind one) acts the same on task
u's observations whatever task it is told they come from. This takes a run's final policy,
collects observations of every task from evaluation episodes (mean actions, the evaluation's
envs and goals), and then acts on task u's observations as if they were task t's. Each cell is
the mean absolute difference, per action dimension, between the executed actions (clipped to the
action space, as the env clips them) under task t's routing and under u's own; 0 means the
network ignores which task it runs, and the action space's width (2 on Meta-World) is the most
it can be. Works for every script (VarShare routes through its mean residuals, shared MTL through
its task input, and so on); continuous actions only.

    .venv/bin/python benchmarks/task_routing.py RUN_DIR [RUN_DIR...] [--steps 1000]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.finished_run import load_run  # noqa: E402
from shared.suites import env_seed, make_vector_env  # noqa: E402


def routing_table(run_dir: str, steps: int) -> str:
    run = load_run(run_dir, "task_routing.py", "this compares continuous actions")
    args, suite, agent, normalizer, act_dim = run.args, run.suite, run.agent, run.obs_normalizer, run.act_dim
    T = suite.num_tasks
    envs, _ = make_vector_env(suite, 1, args.seed, evaluation=True)
    try:
        low, high = (torch.as_tensor(b, dtype=torch.float32) for b in (envs.single_action_space.low,
                                                                     envs.single_action_space.high))
        obs, _ = envs.reset(seed=env_seed(args.seed, evaluation=True))
        k = obs.shape[0] // T
        own_routing = torch.arange(T)[:, None].expand(T, k)
        collected = []  # normalised observations, [T, k, d] per step
        with torch.inference_mode():
            for _ in range(steps):
                normed = normalizer.normalize(obs.reshape(T, k, -1))
                collected.append(normed)
                actions = agent.act_deterministic(torch.as_tensor(normed, dtype=torch.float32), own_routing)
                obs, *_ = envs.step(actions.reshape(-1, act_dim).numpy())
    finally:
        envs.close()
    observed = torch.as_tensor(np.concatenate(collected, axis=1), dtype=torch.float32)  # [T, N, d]
    n = observed.shape[1]
    every_routing = torch.arange(T)[:, None].expand(T, n)
    rows = [f"{run_dir}: {run.algo}, step {run.global_step:,}, {n} observations per task",
            "| observations of \\ acted as | " + " | ".join(suite.task_names) + " |",
            "|---|" + "---|" * T]
    with torch.inference_mode():
        for u in range(T):
            # The same observations (task u's, normalised as task u's) in every task's slot.
            actions = agent.act_deterministic(observed[u:u + 1].expand(T, n, run.obs_dim), every_routing)
            executed = torch.maximum(torch.minimum(actions.reshape(T, n, act_dim), high), low)
            change = (executed - executed[u]).abs().mean(dim=(1, 2))
            rows.append(f"| {suite.task_names[u]} | " + " | ".join(f"{c:.3f}" for c in change.tolist()) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--steps", type=int, default=1000, help="evaluation steps to collect observations from")
    opts = parser.parse_args()
    if opts.steps < 1:
        raise SystemExit(f"task_routing.py: --steps must be at least 1, got {opts.steps}")
    torch.set_num_threads(1)
    for run_dir in opts.run_dirs:
        print(routing_table(run_dir, opts.steps) + "\n", flush=True)


if __name__ == "__main__":
    main()
