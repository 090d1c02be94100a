"""Parameter counts of the shared-MTL, PCGrad and oracle agents against counts by hand, and the
width solver."""

from __future__ import annotations

import torch

from shared.params import count_parameters, mlp_count, solve_width
from tests.conftest import load_script

OBS, ACT, T, H = 3, 2, 4, 5  # tiny: obs 3, 2 actions, 4 tasks, one hidden layer of 5


def test_shared_mtl_and_pcgrad_counts_match_hand_count():
    for script in ("ppo_mtl_embed", "ppo_pcgrad"):
        module = load_script(script)
        agent = module.Agent(OBS, ACT, False, T, (H,), "onehot")  # continuous: a [T, A] log-std
        total = mlp_count([OBS + T, H, 1]) + mlp_count([OBS + T, H, ACT]) + T * ACT
        counts = count_parameters(agent)
        assert counts["total"] == total == 2 * ((OBS + T) * H + H) + (H + 1) + (H * ACT + ACT) + T * ACT
        # one task: all but the other tasks' one-hot columns (H per network) and log-std rows
        assert counts["trained_per_task"] == total - (T - 1) * (2 * H + ACT)
        # at inference the task's own one-hot column (H per network) folds into the bias
        assert counts["active"] == counts["trained_per_task"] - 2 * H
        assert counts["active"] == mlp_count([OBS, H, 1]) + mlp_count([OBS, H, ACT]) + ACT
        learned = count_parameters(module.Agent(OBS, ACT, False, T, (H,), "learned"))
        assert learned["total"] == total + T * T
        assert learned["trained_per_task"] == total + T * T - (T - 1) * (T + ACT)
        assert learned["active"] == counts["active"]  # the embedding row and every task column fold away


def test_task_blind_control_counts_and_ignores_the_task_id():
    module = load_script("ppo_mtl_embed")
    agent = module.Agent(OBS, ACT, False, T, (H,), "none")
    total = mlp_count([OBS, H, 1]) + mlp_count([OBS, H, ACT]) + T * ACT
    counts = count_parameters(agent)
    # no task columns: one task trains every weight but the other tasks' log-std rows, and uses as many
    assert counts == {"total": total, "trained_per_task": total - (T - 1) * ACT,
                      "active": total - (T - 1) * ACT}
    obs = torch.randn(1, 2, OBS).expand(T, 2, OBS)  # the same observations in every task's rows
    ids = torch.arange(T)[:, None].expand(T, 2)
    head = agent.act_deterministic(obs, ids)
    value = agent.get_value(obs, ids)
    assert torch.equal(head, head[:1].expand_as(head)) and torch.equal(value, value[:1].expand_as(value))
    # the one-hot agent, on the same observations, does tell the tasks apart
    onehot = module.Agent(OBS, ACT, False, T, (H,), "onehot")
    assert not torch.equal(onehot.get_value(obs, ids)[0], onehot.get_value(obs, ids)[1])


def test_oracle_counts_match_hand_count():
    agent = load_script("ppo_single").Agent(OBS, ACT, True, T, (H,))
    one = mlp_count([OBS, H, 1]) + mlp_count([OBS, H, ACT])
    assert count_parameters(agent) == {"total": T * one, "active": one, "trained_per_task": one}


def test_solve_width_hits_the_closest_count():
    def count(width):
        return mlp_count([10, width, width, 2])

    target = count(37) + 5
    assert solve_width(count, target) == 37
    assert abs(count(solve_width(count, 10_000)) - 10_000) <= abs(count(solve_width(count, 10_000) + 1) - 10_000)
