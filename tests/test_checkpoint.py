"""save_checkpoint / load_checkpoint restore everything a resumed run needs."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.normalize import ObsNormalizer, RewardScaler
from tests.conftest import load_script

T, K, OBS_DIM, ACT_DIM = 3, 2, 4, 2


def build(seed: int):
    """A ppo_mtl_embed agent (continuous actions) after one Adam step, with used normalisers."""
    mod = load_script("ppo_mtl_embed")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    agent = mod.Agent(OBS_DIM, ACT_DIM, discrete=False, num_tasks=T, hidden_sizes=(8, 8), task_encoding="learned")
    optimizer = mod.make_adam(agent.parameters(), lr=1e-2)
    adam_step(agent, optimizer)
    obs_norm = ObsNormalizer(T, OBS_DIM, per_task=False)
    obs_norm.update(rng.normal(seed, 1.0, (T, K, OBS_DIM)))
    scaler = RewardScaler(T, K, gamma=0.99)
    scaler.scale(rng.normal(seed, 1.0, (T, K)), np.zeros((T, K), bool))
    return agent, optimizer, obs_norm, scaler


def adam_step(agent, optimizer):
    obs = torch.linspace(-1, 1, T * 5 * OBS_DIM).reshape(T, 5, OBS_DIM)
    task_ids = torch.arange(T)[:, None].expand(T, 5)
    _, logprob, entropy, value = agent.get_action_and_value(obs, task_ids, torch.ones(T, 5, ACT_DIM))
    optimizer.zero_grad()
    (value.square().mean() - logprob.mean() - entropy.mean()).backward()
    optimizer.step()


def test_checkpoint_round_trip_restores_weights_optimizer_normalisers_step_and_rng(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    agent, optimizer, obs_norm, scaler = build(seed=0)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    save_checkpoint(path, agent, optimizer, obs_norm, scaler, 12345, {"algo": "test"})
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # written atomically, no temporary left
    after_save = (torch.rand(4), np.random.rand(4), random.random())

    fresh_agent, fresh_opt, fresh_obs, fresh_scaler = build(seed=1)
    assert not torch.equal(fresh_agent.task_embedding, agent.task_embedding)
    torch.rand(10), np.random.rand(10), random.random()  # move every RNG elsewhere
    state = load_checkpoint(path, fresh_agent, fresh_opt, fresh_obs, fresh_scaler)

    assert state["global_step"] == 12345
    assert state["extra"] == {"algo": "test"}
    for (name, p), q in zip(agent.state_dict().items(), fresh_agent.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    for a, b in zip(optimizer.state_dict()["state"].values(), fresh_opt.state_dict()["state"].values(), strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    probe = np.random.default_rng(9).normal(0, 3, (T, K, OBS_DIM))
    np.testing.assert_array_equal(fresh_obs.normalize(probe), obs_norm.normalize(probe))
    np.testing.assert_array_equal(fresh_scaler.std(), scaler.std())
    np.testing.assert_array_equal(fresh_scaler.returns, scaler.returns)

    after_load = (torch.rand(4), np.random.rand(4), random.random())
    assert torch.equal(after_load[0], after_save[0])
    np.testing.assert_array_equal(after_load[1], after_save[1])
    assert after_load[2] == after_save[2]

    # The restored optimiser takes exactly the step the original would have taken.
    adam_step(agent, optimizer)
    adam_step(fresh_agent, fresh_opt)
    for (name, p), q in zip(agent.named_parameters(), fresh_agent.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_checkpoint_skips_objects_passed_as_none_and_can_keep_rng(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    agent, optimizer, obs_norm, scaler = build(seed=0)
    save_checkpoint(path, agent, optimizer, obs_norm, None, 7)
    fresh_agent, fresh_opt, fresh_obs, fresh_scaler = build(seed=1)
    scaler_before = fresh_scaler.state_dict()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    state = load_checkpoint(path, fresh_agent, None, None, fresh_scaler, restore_rng=False)
    assert state["global_step"] == 7
    assert torch.equal(torch.rand(3), expected)  # RNG untouched
    np.testing.assert_array_equal(fresh_scaler.returns, scaler_before["returns"])  # nothing saved for it
    assert torch.equal(fresh_agent.task_embedding, agent.task_embedding)
