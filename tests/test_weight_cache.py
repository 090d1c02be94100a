"""The agents that cache derived weights for acting (VarShare, PaCo) drop the cache whenever
their parameters change outside the update rule: a state-dict load, a move or a cast."""

from __future__ import annotations

import torch

from tests.conftest import load_script

vs, paco = load_script("ppo_varshare"), load_script("ppo_paco")
T, N, OBS = 2, 3, 3


def agents():
    torch.manual_seed(0)
    yield vs.Agent(OBS, 2, True, num_tasks=T, hidden_sizes=(5,), variational=True, prior=lambda fan_in: (0.1, 0.05),
                   residual_bias=False, rollout_weights="mean", estimator="flipout", eval_sample_weights=0)
    yield paco.Agent(OBS, 2, True, num_tasks=T, hidden_sizes=(5,), num_copies=2)


def cached(agent) -> list:
    """The actor's cached weights (acting deterministically runs the actor only)."""
    if hasattr(agent, "layers"):  # VarShare
        return [layer._mean_cache for layer in agent.actor.layers]
    return [layer.composed for layer in agent.actor.layers]


def test_load_and_cast_clear_the_acting_cache():
    obs, ids = torch.randn(T, N, OBS), torch.arange(T)[:, None].expand(T, N)
    for agent in agents():
        with torch.inference_mode():
            before = agent.act_deterministic(obs, ids)
        assert all(c is not None for c in cached(agent))
        state = {k: v.clone() for k, v in agent.state_dict().items()}
        with torch.no_grad():
            for p in agent.parameters():
                p.mul_(0.5)  # stand-in for parameters that changed elsewhere
        agent.load_state_dict(state)  # back to the original values: a fresh forward must agree
        assert all(c is None for c in cached(agent))
        with torch.inference_mode():
            assert torch.equal(agent.act_deterministic(obs, ids), before)
        agent.double()
        assert all(c is None for c in cached(agent))
        with torch.inference_mode():
            assert agent.actor(obs.double(), *((agent.mode(),) if hasattr(agent, "layers") else
                                               agent.task_vectors(ids))).dtype == torch.float64
