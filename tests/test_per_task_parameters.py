"""What belongs to one task stays that task's: the log-std row every script reads for task t, and
the oracle's per-task gradient clipping (one agent's huge gradient leaves the others' steps alone).
"""

from __future__ import annotations

import copy
import glob
import math
import os
from types import SimpleNamespace

import pytest
import torch

from shared.suites import apply_suite_defaults, make_suite
from tests.conftest import ALGOS, load_script

SCRIPTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(str(ALGOS / "ppo_*.py")))


def continuous_agent(module, num_tasks: int, obs_dim: int, act_dim: int):
    """The script's own agent for a continuous-action suite, built the way main() builds it."""
    args = module.Args(env_id="cartpole-mt", hidden_sizes=(8,), cuda=False)
    suite = make_suite("cartpole-mt")
    apply_suite_defaults(args, suite)
    suite = module.select_run_tasks(args, suite.subset(list(suite.task_names[:num_tasks])))
    return module.make_agent(args, suite, obs_dim, act_dim, False)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_task_reads_its_own_log_std_row(script):
    module = load_script(script)
    T, n, obs_dim, A = 3, 4, 5, 2
    torch.manual_seed(0)
    agent = continuous_agent(module, T, obs_dim, A)
    assert agent.actor_logstd.shape == (T, A)
    logstd = torch.tensor([[-1.0, 0.25], [0.5, 0.0], [1.5, -2.0]])
    with torch.no_grad():
        agent.actor_logstd.copy_(logstd)
    obs = torch.randn(T, n, obs_dim)
    task_ids = torch.arange(T)[:, None].expand(T, n)
    for given in (None, torch.randn(T, n, A)):  # rollout (sampled) and update (given actions)
        _, _, entropy, _ = agent.get_action_and_value(obs, task_ids, given)
        # a diagonal Gaussian's entropy depends on its log-std only: sum_a (0.5 + 0.5 log(2 pi) + logstd_a)
        expected = (0.5 + 0.5 * math.log(2 * math.pi) + logstd).sum(-1)  # [T]
        torch.testing.assert_close(entropy, expected[:, None].expand(T, n), rtol=1e-6, atol=1e-6)


def oracle(num_tasks: int = 3):
    module = load_script("ppo_single")
    torch.manual_seed(1)
    agent = module.Agent(obs_dim=3, act_dim=2, discrete=False, num_tasks=num_tasks, hidden_sizes=(4,))
    return module, agent


def oracle_task_losses(agent, scales: list[float]) -> torch.Tensor:
    """A loss per task that reaches every parameter of that task's agent: [T]."""
    T = len(scales)
    gen = torch.Generator().manual_seed(2)
    obs = torch.randn(T, 6, 3, generator=gen)
    actions = torch.randn(T, 6, 2, generator=gen)
    _, logprob, entropy, value = agent.get_action_and_value(obs, torch.arange(T)[:, None].expand(T, 6), actions)
    per_task = (value - 1.0).square().mean(dim=1) - logprob.mean(dim=1) - 0.1 * entropy.mean(dim=1)
    return per_task * torch.tensor(scales)


def own_gradients(agent, scales: list[float]) -> list[list[torch.Tensor]]:
    """For each task, the gradient of its own loss alone, restricted to its rows of every parameter."""
    params = list(agent.parameters())
    result = []
    for t in range(len(scales)):
        grads = torch.autograd.grad(oracle_task_losses(agent, scales)[t], params)
        for g in grads:  # one task's loss reaches no other task's parameters
            others = torch.cat([g[:t], g[t + 1:]])
            assert not others.any()
        result.append([g[t].clone() for g in grads])
    return result


@pytest.mark.parametrize("max_grad_norm", [0.5, 1e9])
def test_oracle_clips_each_tasks_gradient_on_its_own(max_grad_norm):
    module, agent = oracle()
    scales = [1e4, 1.0, 1e-3]  # task 0's gradient is huge, task 2's far below the clip
    expected = own_gradients(agent, scales)
    for grads in expected:  # the reference: torch's own clip applied to that task's gradient alone
        holders = [torch.zeros_like(g, requires_grad=True) for g in grads]
        for holder, g in zip(holders, grads, strict=True):
            holder.grad = g
        torch.nn.utils.clip_grad_norm_(holders, max_grad_norm)
    norms = [math.sqrt(sum(g.square().sum().item() for g in grads)) for grads in expected]
    if max_grad_norm == 0.5:
        assert norms[0] == pytest.approx(0.5, rel=1e-4) and norms[2] < 0.5  # clipped / left alone
    optimizer = torch.optim.SGD(agent.parameters(), lr=0.0)  # keeps the gradients to look at
    module.method_update(SimpleNamespace(max_grad_norm=max_grad_norm), agent, optimizer,
                         oracle_task_losses(agent, scales), {})
    for t in range(len(scales)):
        for p, g in zip(agent.parameters(), expected[t], strict=True):
            torch.testing.assert_close(p.grad[t], g, rtol=1e-5, atol=1e-12)


def test_one_oracle_agents_huge_gradient_leaves_the_others_steps_unchanged():
    module, agent = oracle()
    args = SimpleNamespace(max_grad_norm=0.5, learning_rate=1e-3)
    results = []
    for scale in (1.0, 1e6):
        trial = copy.deepcopy(agent)
        optimizer = module.make_optimizer(args, trial)
        module.method_update(args, trial, optimizer, oracle_task_losses(trial, [scale, 1.0, 3.0]), {})
        results.append([p.detach().clone() for p in trial.parameters()])
    for before, small, huge in zip(agent.parameters(), *results, strict=True):
        assert torch.equal(small[1:], huge[1:])  # tasks 1 and 2: bit-identical steps
        assert not torch.equal(small[1:], before[1:].detach())  # (they did take a step)
