"""ppo_task_losses and action_logprob_entropy (the PPO core) against numbers worked out by hand,
a plain-Python loop, and torch.distributions.

The policy is replaced by fixed tensors, so every term of the loss can be written down: which side
of the clip the surrogate takes for positive and negative advantages, the clipped value loss, the
entropy bonus's sign and coefficient, and advantage normalisation within each task's rows. The
core is byte-identical in every script (test_core_identical.py), so ppo_mtl_embed stands for all.
"""

from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import load_script

CLIP = 0.2


class FixedPolicy:
    """Stands in for an agent: returns the given log-probabilities, entropies and values."""

    def __init__(self, newlogprob, entropy, newvalue):
        self.newlogprob, self.entropy, self.newvalue = newlogprob, entropy, newvalue

    def get_action_and_value(self, obs, task_ids, action=None):
        return action, self.newlogprob, self.entropy, self.newvalue


def loss_args(**overrides):
    values = dict(clip_coef=CLIP, norm_adv=False, clip_vloss=True, ent_coef=0.1, vf_coef=0.5)
    values.update(overrides)
    return SimpleNamespace(**values)


def minibatch(oldlogprob, advantages, returns, values):
    T, n = advantages.shape
    return {"obs": torch.zeros(T, n, 1), "actions": torch.zeros(T, n, dtype=torch.long),
            "task_ids": torch.arange(T)[:, None].expand(T, n), "logprobs": oldlogprob,
            "advantages": advantages, "returns": returns, "values": values}


def hand_case():
    """Two tasks of three transitions, every case of the clipped surrogate and of the value clip.

    Task 0 has advantage +2 and ratios 1.5 (above 1 + clip), 0.5 (below 1 - clip), 1.1 (inside);
    task 1 has advantage -1 and ratios 0.5, 1.5, 0.95."""
    ratio = torch.tensor([[1.5, 0.5, 1.1], [0.5, 1.5, 0.95]], dtype=torch.float64)
    oldlogprob = torch.tensor([[-0.7, -1.2, -0.3], [-2.0, -0.1, -0.9]], dtype=torch.float64)
    newlogprob = (oldlogprob + ratio.log()).requires_grad_()
    advantages = torch.tensor([[2.0, 2.0, 2.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    values = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    newvalue = torch.tensor([[0.5, -0.1, 0.1], [1.05, 3.0, 0.7]], dtype=torch.float64, requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, 0.3], [0.0, 2.0, 1.0]], dtype=torch.float64)
    entropy = torch.tensor([[1.0, 0.6, 0.8], [0.2, 0.4, 0.3]], dtype=torch.float64, requires_grad=True)
    policy = FixedPolicy(newlogprob, entropy, newvalue)
    return policy, minibatch(oldlogprob, advantages, returns, values)


def test_clipped_surrogate_value_clip_and_entropy_bonus_by_hand():
    module = load_script("ppo_mtl_embed")
    policy, mb = hand_case()
    task_losses, stats = module.ppo_task_losses(loss_args(), policy, mb)

    # Surrogate objective per transition: min(r, 1 + clip) * A for A > 0, max(r, 1 - clip) * A for
    # A < 0 (the pessimistic side); the loss is its negative.
    # task 0 (A = +2): r 1.5 -> 1.2 * 2 = 2.4 (clipped); r 0.5 -> 0.5 * 2 = 1.0; r 1.1 -> 2.2
    pg0 = -(2.4 + 1.0 + 2.2) / 3
    # task 1 (A = -1): r 0.5 -> 0.8 * -1 = -0.8 (clipped); r 1.5 -> -1.5; r 0.95 -> -0.95
    pg1 = (0.8 + 1.5 + 0.95) / 3
    # Value loss: 0.5 * max((v - R)^2, (v_old + clamp(v - v_old, -clip, clip) - R)^2)
    # task 0: v 0.5 -> clipped 0.2: max(0.25, 0.64); v -0.1 inside: 1.21; v 0.1 inside: 0.04
    v0 = 0.5 * (0.64 + 1.21 + 0.04) / 3
    # task 1: v 1.05 inside: 1.1025; v 3.0 -> clipped 1.2: max(1.0, 0.64); v 0.7 -> clipped 0.8: max(0.09, 0.04)
    v1 = 0.5 * (1.1025 + 1.0 + 0.09) / 3
    ent0, ent1 = 0.8, 0.3
    # loss = policy loss - ent_coef * entropy + vf_coef * value loss
    expected = torch.tensor([pg0 - 0.1 * ent0 + 0.5 * v0, pg1 - 0.1 * ent1 + 0.5 * v1], dtype=torch.float64)
    assert expected.tolist() == pytest.approx([-1.7891666667, 1.2360416667])
    torch.testing.assert_close(task_losses, expected, rtol=0, atol=1e-12)

    torch.testing.assert_close(stats["losses/policy_loss"], torch.tensor((pg0 + pg1) / 2, dtype=torch.float64))
    torch.testing.assert_close(stats["losses/value_loss"], torch.tensor((v0 + v1) / 2, dtype=torch.float64))
    torch.testing.assert_close(stats["losses/entropy"], torch.tensor((ent0 + ent1) / 2, dtype=torch.float64))
    # approx_kl = mean((r - 1) - log r); clipfrac = share of |r - 1| > clip (four of six)
    kl = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.1, 0.5, 1.5, 0.95)]
    assert float(stats["losses/approx_kl"]) == pytest.approx(sum(kl) / 6, rel=1e-12)
    assert sum(kl) / 6 == pytest.approx(0.0969, abs=1e-4)  # the r - 1 terms do not cancel here (mean -log r: 0.0886)
    assert float(stats["losses/clipfrac"]) == pytest.approx(4 / 6)


def test_gradient_flows_only_through_the_unclipped_side():
    """d loss / d log-prob is -A * r / n where the surrogate takes the ratio, 0 where it takes the
    clipped constant; d loss / d entropy is -ent_coef / n; d loss / d value is vf_coef * (v - R) / n
    on the side of the value clip that is taken, 0 when the clamped value is taken."""
    module = load_script("ppo_mtl_embed")
    policy, mb = hand_case()
    task_losses, _ = module.ppo_task_losses(loss_args(), policy, mb)
    task_losses.sum().backward()
    expected_logprob = torch.tensor([[0.0, -2 * 0.5 / 3, -2 * 1.1 / 3], [0.0, 1.5 / 3, 0.95 / 3]], dtype=torch.float64)
    torch.testing.assert_close(policy.newlogprob.grad, expected_logprob, rtol=0, atol=1e-12)
    torch.testing.assert_close(policy.entropy.grad, torch.full((2, 3), -0.1 / 3, dtype=torch.float64))
    expected_value = 0.5 * torch.tensor([[0.0, -1.1, -0.2], [1.05, 1.0, -0.3]], dtype=torch.float64) / 3
    torch.testing.assert_close(policy.newvalue.grad, expected_value, rtol=0, atol=1e-12)


def test_without_value_clipping_the_value_loss_is_the_plain_squared_error():
    module = load_script("ppo_mtl_embed")
    policy, mb = hand_case()
    task_losses, stats = module.ppo_task_losses(loss_args(clip_vloss=False, ent_coef=0.0, vf_coef=1.0), policy, mb)
    v0 = 0.5 * (0.25 + 1.21 + 0.04) / 3
    v1 = 0.5 * (1.1025 + 1.0 + 0.09) / 3
    pg0, pg1 = -(2.4 + 1.0 + 2.2) / 3, (0.8 + 1.5 + 0.95) / 3
    torch.testing.assert_close(task_losses, torch.tensor([pg0 + v0, pg1 + v1], dtype=torch.float64),
                               rtol=0, atol=1e-12)


def reference_task_losses(args, newlogprob, oldlogprob, advantages, newvalue, values, returns, entropy):
    """The same losses, one transition at a time in plain Python floats."""
    losses = []
    for t in range(advantages.shape[0]):
        adv = advantages[t].tolist()
        if args.norm_adv:
            mean, std = statistics.mean(adv), statistics.stdev(adv)  # sample std, as CleanRL
            adv = [(a - mean) / (std + 1e-8) for a in adv]
        pg, vf, ent = [], [], []
        for i, a in enumerate(adv):
            r = math.exp(newlogprob[t, i].item() - oldlogprob[t, i].item())
            surrogate = min(r, 1 + args.clip_coef) * a if a >= 0 else max(r, 1 - args.clip_coef) * a
            pg.append(-surrogate)
            v, v_old, ret = newvalue[t, i].item(), values[t, i].item(), returns[t, i].item()
            v_clipped = v_old + min(max(v - v_old, -args.clip_coef), args.clip_coef)
            vf.append(0.5 * max((v - ret) ** 2, (v_clipped - ret) ** 2))
            ent.append(entropy[t, i].item())
        losses.append(statistics.mean(pg) - args.ent_coef * statistics.mean(ent) + args.vf_coef * statistics.mean(vf))
    return losses


def test_advantages_are_normalised_within_each_task():
    """Tasks whose advantages live on very different scales (means 0, 50, -5; spreads 1, 20, 0.1):
    each task's rows are standardised on their own, which the loop reference does per task."""
    module = load_script("ppo_mtl_embed")
    gen = torch.Generator().manual_seed(0)
    T, n = 3, 6
    advantages = torch.randn(T, n, generator=gen, dtype=torch.float64) * torch.tensor([[1.0], [20.0], [0.1]])
    advantages += torch.tensor([[0.0], [50.0], [-5.0]], dtype=torch.float64)
    oldlogprob = -torch.rand(T, n, generator=gen, dtype=torch.float64)
    newlogprob = oldlogprob + 0.4 * torch.randn(T, n, generator=gen, dtype=torch.float64)
    values = torch.randn(T, n, generator=gen, dtype=torch.float64)
    newvalue = values + 0.5 * torch.randn(T, n, generator=gen, dtype=torch.float64)
    returns = values + torch.randn(T, n, generator=gen, dtype=torch.float64)
    entropy = torch.rand(T, n, generator=gen, dtype=torch.float64)
    args = loss_args(norm_adv=True, ent_coef=0.01)
    task_losses, _ = module.ppo_task_losses(args, FixedPolicy(newlogprob, entropy, newvalue),
                                            minibatch(oldlogprob, advantages, returns, values))
    expected = reference_task_losses(args, newlogprob, oldlogprob, advantages, newvalue, values, returns, entropy)
    assert task_losses.tolist() == pytest.approx(expected, rel=1e-10, abs=1e-12)

    # The same advantages shifted and scaled per task give the same normalised loss: only each
    # task's own mean and spread are removed (up to the 1e-8 that keeps the division finite).
    rescaled = advantages * torch.tensor([[3.0], [0.01], [7.0]]) + torch.tensor([[-4.0], [9.0], [100.0]])
    again, _ = module.ppo_task_losses(args, FixedPolicy(newlogprob, entropy, newvalue),
                                      minibatch(oldlogprob, rescaled, returns, values))
    torch.testing.assert_close(again, task_losses, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# action_logprob_entropy against torch.distributions
# ---------------------------------------------------------------------------------------------
def test_categorical_logprob_and_entropy_match_torch_distributions():
    module = load_script("ppo_mtl_embed")
    gen = torch.Generator().manual_seed(1)
    logits = 3.0 * torch.randn(3, 7, 4, generator=gen)  # [T, n, num_actions]
    actions = torch.randint(0, 4, (3, 7), generator=gen)
    action, logprob, entropy = module.action_logprob_entropy(logits, None, actions)
    dist = torch.distributions.Categorical(logits=logits)
    assert torch.equal(action, actions)
    torch.testing.assert_close(logprob, dist.log_prob(actions), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(entropy, dist.entropy(), rtol=1e-6, atol=1e-6)


def test_gaussian_logprob_and_entropy_match_torch_distributions_with_a_log_std_per_task():
    module = load_script("ppo_mtl_embed")
    gen = torch.Generator().manual_seed(2)
    T, n, A = 3, 5, 2
    mean = torch.randn(T, n, A, generator=gen, dtype=torch.float64)
    logstd = torch.tensor([[[-1.0, 0.5]], [[0.0, 0.0]], [[1.2, -0.3]]], dtype=torch.float64)  # [T, 1, A]
    actions = mean + torch.randn(T, n, A, generator=gen, dtype=torch.float64) * 2.0
    _, logprob, entropy = module.action_logprob_entropy(mean, logstd, actions)
    dist = torch.distributions.Normal(mean, logstd.exp().expand(T, n, A))
    torch.testing.assert_close(logprob, dist.log_prob(actions).sum(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(entropy, dist.entropy().sum(-1), rtol=1e-12, atol=1e-12)


def test_sampled_actions_follow_the_distribution_and_carry_their_own_logprob():
    module = load_script("ppo_mtl_embed")
    torch.manual_seed(3)
    N = 20000
    # Gaussian: mean (1, -2), std (2, 0.5) for every row
    mean = torch.tensor([1.0, -2.0]).expand(1, N, 2)
    logstd = torch.tensor([[[math.log(2.0), math.log(0.5)]]])
    action, logprob, _ = module.action_logprob_entropy(mean, logstd, None)
    assert action.shape == (1, N, 2)
    torch.testing.assert_close(action.mean(dim=(0, 1)), torch.tensor([1.0, -2.0]), rtol=0, atol=0.05)
    torch.testing.assert_close(action.std(dim=(0, 1)), torch.tensor([2.0, 0.5]), rtol=0.03, atol=0)
    dist = torch.distributions.Normal(mean, logstd.exp().expand(1, N, 2))
    torch.testing.assert_close(logprob, dist.log_prob(action).sum(-1), rtol=1e-5, atol=1e-5)
    # Categorical: probabilities (0.6, 0.3, 0.1) in every row
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().expand(2, N // 2, 3)
    action, logprob, _ = module.action_logprob_entropy(logits, None, None)
    assert action.shape == (2, N // 2) and action.dtype == torch.long
    frequency = torch.bincount(action.flatten(), minlength=3).float() / N
    torch.testing.assert_close(frequency, probs, rtol=0, atol=0.015)
    torch.testing.assert_close(logprob, probs.log()[action], rtol=1e-6, atol=1e-6)
