"""Deterministic evaluation on a separate vector env: per-task success rate and return.

Success of an episode: Meta-World's ``success`` flag was 1 at any step (official protocol; the
eval env also terminates on success), or for toy suites the episode return reached the suite's
threshold. The last step's info of an episode arrives in ``info["final_info"]`` on the autoreset
step (SAME_STEP autoreset), so success is read there for finished episodes.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from shared.normalize import ObsNormalizer


def step_success(info: dict, ended: np.ndarray) -> np.ndarray:
    """Meta-World's per-env success flag of the step just taken, [num_envs] bool.

    For envs whose episode ended, the step's own info is in ``final_info`` (the top-level info
    already belongs to the first step of the next episode)."""
    num_envs = ended.shape[0]
    success = np.zeros(num_envs, bool)
    if "success" in info:
        success = np.asarray(info["success"], dtype=float) > 0.5
    final = info.get("final_info")
    if final is not None and "success" in final:
        mask = final.get("_success", np.ones(num_envs, bool))
        success = np.where(ended & mask, np.asarray(final["success"], dtype=float) > 0.5, success & ~ended)
    return success


def finished_episodes(info: dict, ended: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask of envs whose episode ended with statistics, their returns) from final_info."""
    final = info.get("final_info")
    num_envs = ended.shape[0]
    if final is None or "episode" not in final:
        return np.zeros(num_envs, bool), np.zeros(num_envs)
    mask = ended & final["_episode"]
    return mask, np.asarray(final["episode"]["r"], dtype=np.float64)


def evaluate(
    policy: Callable[[np.ndarray], np.ndarray],
    envs,
    num_tasks: int,
    obs_normalizer: ObsNormalizer,
    episodes_per_task: int,
    success_return: float | None,
    seed: int,
) -> dict:
    """Run ``policy`` (normalised obs [T, k, d] -> actions [T*k, ...]) until every task has
    ``episodes_per_task`` episodes. Columns are task-major like the training env. Episodes of a
    column are counted in the order they finish, so short episodes cannot crowd out long ones."""
    num_envs = envs.num_envs
    k = num_envs // num_tasks
    quota = int(np.ceil(episodes_per_task / k))  # episodes per column
    obs, _ = envs.reset(seed=seed)
    returns = [[] for _ in range(num_envs)]
    successes = [[] for _ in range(num_envs)]
    running_success = np.zeros(num_envs, bool)
    low, high = _action_bounds(envs)
    while min(len(r) for r in returns) < quota:
        actions = policy(obs_normalizer.normalize(obs.reshape(num_tasks, k, -1)))
        if low is not None:
            actions = np.clip(actions, low, high)
        obs, _, terminated, truncated, info = envs.step(actions)
        ended = terminated | truncated
        running_success |= step_success(info, ended)
        done_mask, episode_returns = finished_episodes(info, ended)
        for i in np.flatnonzero(done_mask):
            if len(returns[i]) < quota:
                returns[i].append(float(episode_returns[i]))
                if success_return is None:
                    successes[i].append(float(running_success[i]))
                elif np.isnan(success_return):  # the env defines no success
                    successes[i].append(np.nan)
                else:
                    successes[i].append(float(episode_returns[i] >= success_return))
        running_success[ended] = False
    task_return = np.zeros(num_tasks)
    task_success = np.zeros(num_tasks)
    for t in range(num_tasks):
        cols = range(t * k, (t + 1) * k)
        r = np.concatenate([returns[i] for i in cols])[:episodes_per_task]
        s = np.concatenate([successes[i] for i in cols])[:episodes_per_task]
        task_return[t], task_success[t] = r.mean(), s.mean()
    return {"return": task_return, "success": task_success, "episodes_per_task": episodes_per_task}


def _action_bounds(envs):
    space = envs.single_action_space
    if hasattr(space, "low"):
        return space.low, space.high
    return None, None
