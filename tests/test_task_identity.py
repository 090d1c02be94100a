"""For every algorithm: the task id the network sees at rollout, update and evaluation is the
true task of the env that produced the observation.

An "echo" suite is injected whose env for task t emits observations with first entry
t + noise (|noise| < 0.2). With observation normalisation replaced by the identity, every row of
every network call can be checked: round(obs[..., 0]) must equal task_ids, and row t of the
task-major batch must be task t (what the batched per-task layers rely on).
"""

from __future__ import annotations

import glob
import os

import gymnasium as gym
import numpy as np
import pytest
import torch

import shared.suites as suites
from shared.normalize import ObsNormalizer
from tests.conftest import ALGOS, load_script

SCRIPTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(str(ALGOS / "ppo_*.py")))
NUM_TASKS = 3


class EchoTask(gym.Env):
    """Observation [task + noise, noise, noise]; 2 actions; 12-step episodes (truncated)."""

    def __init__(self, task: int):
        self.task = task
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.t = 0

    def _obs(self):
        noise = self.np_random.uniform(-0.2, 0.2, 3)
        noise[0] += self.task
        return noise.astype(np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        reward = float(action == self.task % 2)
        return self._obs(), reward, False, self.t >= 12, {}


if "EchoTask-v0" not in gym.registry:
    gym.register("EchoTask-v0", entry_point=EchoTask)


class IdentityNormalizer(ObsNormalizer):
    def normalize(self, obs):
        return np.asarray(obs, dtype=np.float32)


def echo_suite():
    names = tuple(f"echo-{t}" for t in range(NUM_TASKS))
    params = tuple(dict(base="EchoTask-v0", task=t) for t in range(NUM_TASKS))
    return suites.Suite("echo-mt", names, "gym", params, 6.0, "cartpole-mt")


@pytest.mark.parametrize("script", SCRIPTS)
def test_network_sees_each_envs_true_task(script, tmp_path, monkeypatch):
    module = load_script(script)
    monkeypatch.setitem(suites.MULTITASK_SUITES, "echo-mt", echo_suite)
    monkeypatch.setattr(module, "ObsNormalizer", IdentityNormalizer)
    seen = {"rollout": 0, "update": 0, "evaluation": 0}
    mismatches = []

    def check(obs, task_ids, where):
        phase = "update" if torch.is_grad_enabled() else ("rollout" if module_agent[0].training else "evaluation")
        T = obs.shape[0]
        rows = torch.arange(T)[:, None].expand_as(task_ids)
        from_obs = obs[..., 0].round().long()
        if not (torch.equal(from_obs, task_ids) and torch.equal(task_ids, rows)):
            mismatches.append((phase, where))
        seen[phase] += 1

    module_agent = [None]
    original = {name: getattr(module.Agent, name)
                for name in ("get_value", "get_action_and_value", "act_deterministic")}

    def wrap(name):
        def wrapped(self, obs, task_ids, *rest, **kw):
            module_agent[0] = self
            check(obs, task_ids, name)
            return original[name](self, obs, task_ids, *rest, **kw)
        return wrapped

    for name in original:
        monkeypatch.setattr(module.Agent, name, wrap(name))

    args = module.Args(env_id="echo-mt", total_timesteps=2 * NUM_TASKS * 2 * 16, num_envs_per_task=2, num_steps=16,
                       num_minibatches=2, update_epochs=1, eval_every=NUM_TASKS * 2 * 16, eval_episodes=1,
                       final_eval_episodes=2, hidden_sizes=(8, 8), runs_dir=str(tmp_path), cuda=False)
    summary = module.main(args)
    assert summary["global_step"] == 2 * NUM_TASKS * 2 * 16
    assert not mismatches, f"{script}: task ids disagree with the env's true task in {mismatches[:5]}"
    assert seen["rollout"] >= 32 and seen["update"] >= 4 and seen["evaluation"] >= 12, seen
