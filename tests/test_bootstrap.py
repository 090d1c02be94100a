"""The core's time-limit bootstrap, checked with numbers: a truncated step's stored reward is
r + gamma * V(final observation); a terminated step's is r alone; both end the episode for GAE
(test_gae.py checks that GAE stops there).

Task 0's episodes are cut by a time limit after 4 steps, task 1's terminate after 4 steps. The
observation's first entry counts the steps of the episode (the final observation of a 4-step
episode reads 4, the next episode's first reads 0), and the value function is replaced by
V(obs) = 10 * obs[0] + 7, so V(final obs) = 47 while a value taken from the reset observation
would be 7. Normalisers are the identity. The core is byte-identical in every script
(test_core_identical.py), so ppo_mtl_embed stands for all of them.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

import shared.suites as suites
from shared.normalize import ObsNormalizer, RewardScaler
from tests.conftest import load_script

GAMMA = 0.9


class CountingTask(gym.Env):
    """Observation [steps so far, 0]; reward 1 per step; the episode ends after 4 steps, by a time
    limit (truncated) or for real (terminated)."""

    def __init__(self, truncate: bool):
        self.truncate = truncate
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0, 0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        done = self.t >= 4
        return np.array([self.t, 0.0], np.float32), 1.0, done and not self.truncate, done and self.truncate, {}


if "CountingTask-v0" not in gym.registry:
    gym.register("CountingTask-v0", entry_point=CountingTask)


class IdentityNormalizer(ObsNormalizer):
    def normalize(self, obs):
        return np.asarray(obs, dtype=np.float32)


class IdentityRewards(RewardScaler):
    def scale(self, rewards, ended):
        return np.asarray(rewards, dtype=np.float32)


def test_truncation_bootstraps_from_the_final_observation_and_termination_does_not(tmp_path, monkeypatch):
    module = load_script("ppo_mtl_embed")
    suite = suites.Suite("count-mt", ("truncated", "terminated"), "gym",
                         (dict(base="CountingTask-v0", truncate=True), dict(base="CountingTask-v0", truncate=False)),
                         4.0, "cartpole-mt")
    monkeypatch.setitem(suites.MULTITASK_SUITES, "count-mt", lambda: suite)
    monkeypatch.setattr(module, "ObsNormalizer", IdentityNormalizer)
    monkeypatch.setattr(module, "RewardScaler", IdentityRewards)

    def value(self, obs, task_ids):
        return 10.0 * obs[..., 0] + 7.0

    def action_and_value(self, obs, task_ids, action=None):
        action, logprob, entropy, _ = original(self, obs, task_ids, action)
        return action, logprob, entropy, value(self, obs, task_ids)

    original = module.Agent.get_action_and_value
    monkeypatch.setattr(module.Agent, "get_value", value)
    monkeypatch.setattr(module.Agent, "get_action_and_value", action_and_value)
    seen = []
    gae = module.compute_gae

    def recording_gae(rewards, values, ended, next_value, gamma, gae_lambda):
        seen.append((rewards.clone(), ended.clone(), values.clone()))
        return gae(rewards, values, ended, next_value, gamma, gae_lambda)

    monkeypatch.setattr(module, "compute_gae", recording_gae)
    args = module.Args(env_id="count-mt", total_timesteps=2 * 2 * 10, num_envs_per_task=2, num_steps=10,
                       num_minibatches=2, update_epochs=1, gamma=GAMMA, eval_every=1000, eval_episodes=1,
                       final_eval_episodes=1, hidden_sizes=(4,), runs_dir=str(tmp_path), cuda=False)
    module.main(args)
    assert len(seen) == 1
    rewards, ended, values = seen[0]  # [S, T, k]
    steps = torch.arange(10)[:, None].expand(10, 2)
    episode_end = (steps % 4 == 3).float()  # the 4th, 8th step of each episode (resets are at steps 4 and 8)
    assert torch.equal(ended[:, 0], episode_end) and torch.equal(ended[:, 1], episode_end)
    expected_truncated = 1.0 + GAMMA * 47.0 * episode_end  # V(final obs = 4) = 47, not V(reset obs = 0) = 7
    assert torch.allclose(rewards[:, 0], expected_truncated)
    assert torch.equal(rewards[:, 1], torch.ones(10, 2))  # terminated: no bootstrap
    assert torch.equal(values[:, 0], 10.0 * (steps % 4).float() + 7.0)  # rollout values follow the obs count

