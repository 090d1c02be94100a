"""compute_gae (PPO CORE 2/2) against advantages worked out by hand."""

import pytest
import torch

from tests.conftest import load_script

GAMMA, LAM = 0.9, 0.8


@pytest.mark.parametrize("script", ["ppo_single", "ppo_mtl_embed"])
def test_gae_stops_at_truncation_and_termination_and_bootstraps_next_value(script):
    compute_gae = load_script(script).compute_gae
    # Two envs, three steps. Tensors are [S, num_envs].
    # env 0: truncated after step 1; its reward already holds gamma * V(final_obs) = 0.9 * 5.0,
    #        then a fresh episode runs on and is bootstrapped with next_value 4.0.
    # env 1: terminated after the last step: next_value 10.0 must not be used.
    v_final = 5.0
    rewards = torch.tensor([[1.0, 1.0], [2.0 + GAMMA * v_final, 1.0], [3.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 1.0], [1.0, 2.0], [2.0, 3.0]], dtype=torch.float64)
    ended = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    next_value = torch.tensor([4.0, 10.0], dtype=torch.float64)

    adv = compute_gae(rewards, values, ended, next_value, GAMMA, LAM)

    # env 0, by hand (gamma * lambda = 0.72)
    a0_2 = 3.0 + 0.9 * 4.0 - 2.0  # 4.6: bootstrapped with next_value
    a0_1 = (2.0 + 0.9 * 5.0) - 1.0  # 5.5: truncation, its bootstrap is in the reward, no carry
    a0_0 = (1.0 + 0.9 * 1.0 - 0.5) + 0.72 * a0_1  # 1.4 + 3.96 = 5.36
    # env 1
    a1_2 = 1.0 - 3.0  # -2.0: termination, nothing bootstrapped
    a1_1 = (1.0 + 0.9 * 3.0 - 2.0) + 0.72 * a1_2  # 1.7 - 1.44 = 0.26
    a1_0 = (1.0 + 0.9 * 2.0 - 1.0) + 0.72 * a1_1  # 1.8 + 0.1872 = 1.9872
    expected = torch.tensor([[a0_0, a1_0], [a0_1, a1_1], [a0_2, a1_2]], dtype=torch.float64)
    assert expected[0, 0].item() == pytest.approx(5.36)
    assert expected[0, 1].item() == pytest.approx(1.9872)

    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("script", ["ppo_single", "ppo_mtl_embed"])
def test_gae_keeps_extra_axes_of_the_task_major_buffer(script):
    """The core calls compute_gae on [S, T, k] buffers: each column is independent."""
    compute_gae = load_script(script).compute_gae
    torch.manual_seed(0)
    S, T, k = 4, 2, 3
    rewards, values = torch.randn(S, T, k), torch.randn(S, T, k)
    ended = (torch.rand(S, T, k) < 0.3).float()
    next_value = torch.randn(T, k)
    adv = compute_gae(rewards, values, ended, next_value, GAMMA, LAM)
    assert adv.shape == (S, T, k)
    flat = compute_gae(rewards.reshape(S, T * k), values.reshape(S, T * k), ended.reshape(S, T * k),
                       next_value.reshape(T * k), GAMMA, LAM)
    torch.testing.assert_close(adv.reshape(S, T * k), flat)
