"""shared.evaluate.evaluate on a tiny hand-made vector env: any-step success, returns, counts."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from shared.evaluate import evaluate
from shared.normalize import ObsNormalizer


class FlagEnv(gym.Env):
    """Fixed-length episodes. Every step of the n-th episode (n = 1, 2, ...) pays ``scale * n``;
    ``info['success']`` is 1 only at step ``success_step`` (1-based), if any."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, length: int, scale: float, success_step: int | None):
        self.length, self.scale, self.success_step = length, scale, success_step
        self.episode = 0
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode += 1
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        info = {"success": float(self.t == self.success_step)}
        truncated = self.t == self.length
        return self._obs(), self.scale * self.episode, False, truncated, info

    def _obs(self):
        return np.array([self.t, self.episode], np.float32)


def make_envs(task_specs: list[tuple[int, float, int | None]], k: int) -> gym.vector.SyncVectorEnv:
    fns = [lambda spec=spec: gym.wrappers.RecordEpisodeStatistics(FlagEnv(*spec))
           for spec in task_specs for _ in range(k)]
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def zero_policy(obs: np.ndarray) -> np.ndarray:
    return np.zeros(obs.shape[0] * obs.shape[1], np.int64)


def test_evaluation_counts_success_at_any_step_and_averages_returns():
    # task 0: 5-step episodes, success only at step 3 (mid-episode, gone by the end)
    # task 1: 4-step episodes, reward scale 2, success only at its last step (seen in final_info)
    # task 2: 6-step episodes, never succeeds
    specs = [(5, 1.0, 3), (4, 2.0, 4), (6, 1.0, None)]
    k = 2
    envs = make_envs(specs, k)
    result = evaluate(zero_policy, envs, num_tasks=3, obs_normalizer=ObsNormalizer(3, 2, per_task=False),
                      episodes_per_task=4, success_return=None, seed=0)
    envs.close()
    # 4 episodes per task = the first 2 episodes of each of its 2 columns: returns 1x and 2x length*scale.
    np.testing.assert_allclose(result["return"], [(5 + 10) / 2, (8 + 16) / 2, (6 + 12) / 2])
    np.testing.assert_array_equal(result["success"], [1.0, 1.0, 0.0])
    assert result["episodes_per_task"] == 4


def test_evaluation_of_a_never_succeeding_env_reports_zero():
    envs = make_envs([(5, 1.0, None)], k=1)
    result = evaluate(zero_policy, envs, 1, ObsNormalizer(1, 2, per_task=False), 3, None, seed=0)
    envs.close()
    assert result["success"].tolist() == [0.0]
    assert result["return"].tolist() == [pytest.approx((5 + 10 + 15) / 3)]
    assert result["episodes_per_task"] == 3


def test_evaluation_with_a_return_threshold_counts_episodes_that_reach_it():
    """Toy suites: success = episode return >= the suite's threshold (flag ignored)."""
    envs = make_envs([(5, 1.0, 3)], k=1)
    result = evaluate(zero_policy, envs, 1, ObsNormalizer(1, 2, per_task=False), 4, success_return=10.0, seed=0)
    envs.close()
    # returns 5, 10, 15, 20: three of four reach 10
    assert result["success"].tolist() == [0.75]
    assert result["return"].tolist() == [12.5]


def test_evaluation_policy_sees_normalised_task_major_observations():
    seen = []

    def policy(obs):
        seen.append(obs.copy())
        return zero_policy(obs)

    normalizer = ObsNormalizer(2, 2, per_task=False)
    normalizer.rms.mean = np.array([1.0, 1.0])
    normalizer.rms.var = np.array([4.0, 4.0])
    envs = make_envs([(3, 1.0, None), (3, 1.0, None)], k=2)
    evaluate(policy, envs, 2, normalizer, 2, None, seed=0)
    envs.close()
    assert seen[0].shape == (2, 2, 2) and seen[0].dtype == np.float32
    # reset obs is [t=0, episode=1] -> ((0 - 1) / 2, (1 - 1) / 2)
    np.testing.assert_allclose(seen[0], np.broadcast_to([-0.5, 0.0], (2, 2, 2)), atol=1e-6)


class FirstEpisodeFlagEnv(FlagEnv):
    """``info['success']`` is 1 at step 2 of the first episode only."""

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        info["success"] = float(self.episode == 1 and self.t == 2)
        return obs, reward, terminated, truncated, info


def test_a_success_does_not_carry_into_the_next_episode():
    envs = gym.vector.SyncVectorEnv([lambda: gym.wrappers.RecordEpisodeStatistics(FirstEpisodeFlagEnv(4, 1.0, None))],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    result = evaluate(zero_policy, envs, 1, ObsNormalizer(1, 2, per_task=False), 3, None, seed=0)
    envs.close()
    assert result["success"].tolist() == [pytest.approx(1 / 3)]  # episodes 2 and 3 never raise the flag
