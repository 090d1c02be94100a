"""What a trained Meta-World policy does in the episodes it fails: a high return without success.

Meta-World's shaped reward pays for approaching and holding the object as well as for the goal,
so a policy can collect most of an episode's reward without ever succeeding. This runs a finished
run's final policy (mean actions, the evaluation's envs and goals, as the run's own final
evaluation) and reads Meta-World's per-step info over the episodes that fail: the share of steps
flagged ``near_object`` and ``grasp_success``, and the object's distance to its target
(``obj_to_target``, metres) and the reward's goal term (``in_place_reward``, 0 to 1) at the
episode's first step, at their best, and at its last. Success is the evaluation's (the flag at any
step; the evaluation env ends an episode at success).

Each env defines these keys itself, so read a task's columns against its env's
``evaluate_state``. Among the MT10 tasks: reach-v3 reports the gripper's distance to the goal as
both ``near_object`` and ``obj_to_target`` and ``grasp_success`` as 1 always; door-open-v3 reports
``obj_to_target`` as 0 always, a graded readiness term as ``near_object`` and a closing gripper
action as ``grasp_success``; drawer-open-v3 flags ``near_object`` within 3 cm of the handle and
measures ``obj_to_target`` from the handle to the fully open position.

    .venv/bin/python benchmarks/task_outcome.py RUN_DIR [--tasks drawer-open-v3 ...] [--episodes 10]
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
from shared.evaluate import finished_episodes, step_success  # noqa: E402
from shared.suites import env_seed, make_vector_env  # noqa: E402

KEYS = ("near_object", "grasp_success", "obj_to_target", "in_place_reward")


def step_values(info: dict, ended: np.ndarray, key: str) -> np.ndarray:
    """The info value of the step just taken, per env. An ended env's is in final_info, and when
    every env ended on this step the top-level info (the new episodes' reset info) lacks the key."""
    value = np.asarray(info[key], dtype=float) if key in info else np.full(ended.shape[0], np.nan)
    final = info.get("final_info")
    if final is not None and key in final:
        value = np.where(ended & final[f"_{key}"], np.asarray(final[key], dtype=float), value)
    return value


def episode_summary(success: bool, episode_return: float, values: dict[str, np.ndarray]) -> dict[str, float]:
    """One episode's row: success, return, shares of steps near / grasping, and the distance
    to target and goal term at the first step, at their best and at the last step."""
    distance, goal = values["obj_to_target"], values["in_place_reward"]
    return {"success": float(success), "return": float(episode_return),
            "near": values["near_object"].mean(), "grasped": values["grasp_success"].mean(),
            "dist_first": distance[0], "dist_min": distance.min(), "dist_last": distance[-1],
            "goal_first": goal[0], "goal_max": goal.max(), "goal_last": goal[-1]}


def outcome_table(run_dir: str, tasks: list[str] | None, episodes: int) -> str:
    run = load_run(run_dir, "task_outcome.py", "Meta-World's tasks have continuous actions")
    suite, agent, normalizer = run.suite, run.agent, run.obs_normalizer
    unknown = sorted(set(tasks or []) - set(suite.task_names))
    if unknown:
        raise SystemExit(f"task_outcome.py: {', '.join(unknown)} not in the run's tasks "
                         f"({', '.join(suite.task_names)})")
    T = suite.num_tasks
    envs, _ = make_vector_env(suite, 1, run.args.seed, evaluation=True)
    try:
        obs, _ = envs.reset(seed=env_seed(run.args.seed, evaluation=True))
        low, high = envs.single_action_space.low, envs.single_action_space.high
        routing = torch.arange(T)[:, None]
        current = {key: [[] for _ in range(T)] for key in KEYS}
        success_now = np.zeros(T, bool)
        done = [[] for _ in range(T)]  # per task: episode_summary() of each finished episode
        with torch.inference_mode():
            while min(len(d) for d in done) < episodes:
                normed = torch.as_tensor(normalizer.normalize(obs.reshape(T, 1, -1)), dtype=torch.float32)
                actions = agent.act_deterministic(normed, routing).reshape(T, -1).numpy()
                obs, _, terminated, truncated, info = envs.step(np.clip(actions, low, high))
                ended = terminated | truncated
                missing = [key for key in KEYS if key not in info and key not in info.get("final_info", {})]
                if missing:
                    raise SystemExit(f"task_outcome.py: {run_dir} is not a Meta-World run (its envs report no "
                                     f"{', '.join(missing)})")
                success_now |= step_success(info, ended)
                for key in KEYS:
                    for t, v in enumerate(step_values(info, ended, key)):
                        current[key][t].append(v)
                with_stats, returns = finished_episodes(info, ended)
                for t in np.flatnonzero(ended):
                    if with_stats[t] and len(done[t]) < episodes:
                        done[t].append(episode_summary(success_now[t], returns[t],
                                                       {k: np.array(current[k][t]) for k in KEYS}))
                    success_now[t] = False
                    for key in KEYS:
                        current[key][t] = []
    finally:
        envs.close()
    rows = [f"{run_dir}: {run.algo}, step {run.global_step:,}, {episodes} episodes per task, mean actions; "
            "every column after success is over the failed episodes",
            "| task | success | failed | return | near object | grasped | obj_to_target first / min / last "
            "| in_place_reward first / max / last |",
            "|---|---|---|---|---|---|---|---|"]
    for t, name in enumerate(suite.task_names):
        if tasks and name not in tasks:
            continue
        success = np.mean([e["success"] for e in done[t]])
        failed = [e for e in done[t] if not e["success"]]
        if not failed:
            rows.append(f"| {name} | {success:.2f} | 0 |" + " - |" * 5)
            continue
        m = {field: float(np.mean([e[field] for e in failed])) for field in failed[0]}
        rows.append(f"| {name} | {success:.2f} | {len(failed)} | {m['return']:,.0f} | {m['near']:.2f} "
                    f"| {m['grasped']:.2f} | {m['dist_first']:.3f} / {m['dist_min']:.3f} / {m['dist_last']:.3f} "
                    f"| {m['goal_first']:.3f} / {m['goal_max']:.3f} / {m['goal_last']:.3f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--tasks", nargs="+", help="rows to print (default: every task of the run)")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per task (default 10)")
    opts = parser.parse_args()
    if opts.episodes < 1:
        raise SystemExit(f"task_outcome.py: --episodes must be at least 1, got {opts.episodes}")
    torch.set_num_threads(1)
    print(outcome_table(opts.run_dir, opts.tasks, opts.episodes), flush=True)


if __name__ == "__main__":
    main()
