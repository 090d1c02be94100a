"""PaCo (algos/ppo_paco.py): composed layers, initialisation, loss maskout and w-reset, counts, smoke runs."""

from __future__ import annotations

import json
import types

import pytest
import torch

from tests.conftest import describe, load_script, run_script

paco = load_script("ppo_paco")

T, K, OBS, ACT, N = 4, 5, 3, 2, 16  # tasks, copies, obs dim, action dim, rows per task in a minibatch


def make_args(**overrides):
    """Args as make_agent leaves them on a toy suite: the maskout ratio resolved to 50 unless --no-maskout."""
    values = dict(max_grad_norm=0.5, learning_rate=1e-2, clip_coef=0.2, ent_coef=0.01, vf_coef=0.5,
                  maskout_ratio=50.0 if overrides.get("maskout", True) else None)
    values.update(overrides)
    return paco.Args(**values)


def make_agent_and_optimizer(args, seed: int = 0):
    torch.manual_seed(seed)
    agent = paco.Agent(OBS, ACT, discrete=False, num_tasks=T, hidden_sizes=(8,), num_copies=K)
    return agent, paco.make_optimizer(args, agent)


def make_minibatch(seed: int = 1) -> dict:
    """A task-stratified minibatch ([T, N, ...]) whose PPO losses are O(1) for every task."""
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randn(T, N, OBS, generator=g), "actions": torch.randn(T, N, ACT, generator=g),
            "logprobs": torch.randn(T, N, generator=g) - 2.0, "advantages": torch.randn(T, N, generator=g),
            "returns": 2.0 * torch.randn(T, N, generator=g), "values": torch.zeros(T, N),
            "task_ids": torch.arange(T)[:, None].expand(T, N)}


def healthy_losses(args, agent, mb) -> torch.Tensor:
    task_losses, _ = paco.ppo_task_losses(args, agent, mb)
    return task_losses  # [T]


def exploding(losses: torch.Tensor, task: int) -> torch.Tensor:
    """Task `task`'s loss and its gradient blown up by 1e6; the loss value is 1e6 x the largest |loss|."""
    scale = losses.detach().abs().max()
    blown = 1e6 * (losses[task] - losses[task].detach() + scale)
    return torch.where(torch.arange(T) == task, blown, losses)


def step(args, agent, optimizer, losses, epoch=0, start=0, iteration=1) -> dict:
    return paco.method_update(args, agent, optimizer, losses, {"epoch": epoch, "start": start, "iteration": iteration})


# ---------------------------------------------------------------------------------------------
# The composed network
# ---------------------------------------------------------------------------------------------
def test_composed_layer_equals_explicit_per_task_layer_in_forward_and_gradients():
    torch.manual_seed(0)
    num_tasks, num_copies, d_in, d_out, n = 3, 4, 5, 7, 6
    layer = paco.CompositionalLinear(num_copies, d_in, d_out, std=1.0)
    with torch.no_grad():  # distinct copies, so that the composition is really exercised
        layer.weight.normal_()
        layer.bias.normal_()
    w = torch.randn(num_tasks, num_copies, requires_grad=True)
    x = torch.randn(num_tasks, n, d_in)
    upstream = torch.randn(num_tasks, n, d_out)

    y = layer(x, w)
    (y * upstream).sum().backward()

    V = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    w2 = w.detach().clone().requires_grad_(True)
    rows = []
    for t in range(num_tasks):  # the per-task network built by hand: W_t = sum_k w_tk V_k
        W_t = sum(w2[t, k] * V[k] for k in range(num_copies))
        b_t = sum(w2[t, k] * b[k] for k in range(num_copies))
        rows.append(x[t] @ W_t + b_t)
    y_explicit = torch.stack(rows)
    (y_explicit * upstream).sum().backward()

    assert y.shape == (num_tasks, n, d_out)
    torch.testing.assert_close(y, y_explicit, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, V.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, b.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-5)
    assert w.grad.abs().min() > 0  # every task's every coefficient receives gradient


def test_agent_runs_each_task_through_its_own_composed_network():
    torch.manual_seed(0)
    num_tasks, num_copies, obs_dim, act_dim = 3, 4, 5, 2
    agent = paco.Agent(obs_dim, act_dim, discrete=False, num_tasks=num_tasks, hidden_sizes=(7, 3),
                       num_copies=num_copies)
    with torch.no_grad():
        for p in agent.parameters():
            p.normal_()
    obs = torch.randn(num_tasks, 4, obs_dim)
    task_ids = torch.arange(num_tasks)[:, None].expand(num_tasks, 4)

    def explicit(mlp, t):
        x = obs[t]
        for i, layer in enumerate(mlp.layers):
            x = x @ torch.einsum("k,kio->io", agent.w[t], layer.weight) + agent.w[t] @ layer.bias
            x = torch.tanh(x) if i < len(mlp.layers) - 1 else x
        return x

    with torch.no_grad():
        value = agent.get_value(obs, task_ids)
        mean = agent.act_deterministic(obs, task_ids)
        expected_value = torch.stack([explicit(agent.critic, t).squeeze(-1) for t in range(num_tasks)])
        expected_mean = torch.stack([explicit(agent.actor, t) for t in range(num_tasks)])
    torch.testing.assert_close(value, expected_value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-5, atol=1e-5)


def test_copies_start_identical_and_every_task_starts_as_the_layer_init_network():
    agent, _ = make_agent_and_optimizer(make_args())
    torch.testing.assert_close(agent.w.sum(dim=1), torch.ones(T))  # each task: sum_k w_tk = 1
    assert (agent.w.max(dim=1).values - agent.w.min(dim=1).values).min() > 0.01  # copies' symmetry is broken
    assert (agent.w.max(dim=1).values - agent.w.min(dim=1).values).max() <= 2 / T ** 0.5  # U(-1/sqrt(T), 1/sqrt(T))
    for mlp, head_gain in ((agent.actor, 0.01), (agent.critic, 1.0)):
        for i, layer in enumerate(mlp.layers):
            assert torch.equal(layer.weight, layer.weight[:1].expand_as(layer.weight))
            assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
            gain = head_gain if i == len(mlp.layers) - 1 else 2 ** 0.5
            W = layer.weight[0]  # [d_in, d_out]; orthogonal init: the shorter side is orthonormal x gain
            gram = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
            torch.testing.assert_close(gram, gain ** 2 * torch.eye(gram.shape[0]), rtol=1e-4, atol=1e-6)
            composed = (agent.w @ layer.weight.flatten(1)).view(T, *layer.weight.shape[1:])
            torch.testing.assert_close(composed, layer.weight[:1].expand(T, -1, -1), rtol=1e-5, atol=1e-6)


def test_acting_reuses_composed_weights_until_a_parameter_changes():
    args = make_args()
    agent, optimizer = make_agent_and_optimizer(args)
    mb = make_minibatch()
    obs, ids = mb["obs"], mb["task_ids"]

    def acting():
        with torch.inference_mode():
            return agent.act_deterministic(obs, ids)

    def fresh(o=obs, i=ids):  # composed anew: the autograd path never uses the cache
        with torch.enable_grad():
            return agent.act_deterministic(o, i).detach()

    first = acting()
    assert all(layer.composed is not None for layer in agent.actor.layers)
    assert torch.equal(acting(), first) and torch.allclose(first, fresh(), atol=1e-6)
    step(args, agent, optimizer, healthy_losses(args, agent, mb))  # fused Adam may leave version counters alone
    assert all(layer.composed is None for layer in [*agent.actor.layers, *agent.critic.layers])
    after_step = acting()
    assert not torch.allclose(after_step, first) and torch.allclose(after_step, fresh(), atol=1e-6)
    with torch.no_grad():
        agent.w[1].mul_(-1.0)  # an in-place edit outside the optimiser
    assert torch.allclose(acting(), fresh(), atol=1e-6) and not torch.allclose(acting(), after_step)
    with torch.inference_mode():  # a batch whose rows are not the task table in order is composed anew
        swapped = agent.act_deterministic(obs.flip(0), ids.flip(0))
    assert torch.allclose(swapped, fresh(obs.flip(0), ids.flip(0)), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The maskout rule
# ---------------------------------------------------------------------------------------------
def test_maskout_rule_fires_only_on_losses_far_above_the_median_task():
    args = make_args()  # ratio 50, floor 0.1
    everyone = torch.ones(4, dtype=torch.bool)

    def fires(values, taking_part=everyone):
        return paco.exploding_tasks(args, torch.tensor(values), taking_part)[0].tolist()

    assert fires([1.0, 2.0, 1.5, 30.0]) == [False] * 4  # a 20x spread between healthy tasks
    assert fires([1.0, 2.0, 1.5, 1e6]) == [False, False, False, True]
    assert fires([1e-3, 2e-3, -1e-3, 4.0]) == [False] * 4  # median below the floor: threshold 50 x 0.1
    assert fires([1e-3, 2e-3, -1e-3, 6.0]) == [False, False, False, True]
    assert fires([1.0, -1e6, 1.5, 1.0]) == [False] * 4  # a very negative loss is not an explosion
    assert fires([1.0, float("nan"), 1.5, float("inf")]) == [False, True, False, True]
    skipped_last = torch.tensor([True, True, True, False])
    assert fires([1.0, 2.0, 1.5, 1e6], skipped_last) == [False, False, False, False]  # skipped: not judged
    _, max_relative = paco.exploding_tasks(args, torch.tensor([1.0, 2.0, 1.5, 30.0]), everyone)
    assert max_relative.item() == pytest.approx(30.0 / 1.5)


def test_without_an_exploding_task_nothing_fires_and_the_update_is_the_plain_mean_loss_step():
    args = make_args()
    agent, optimizer = make_agent_and_optimizer(args)
    plain, plain_optimizer = make_agent_and_optimizer(args)
    mb = make_minibatch()
    for iteration in (1, 2):
        for epoch in (0, 1):
            for start in (0, N):
                stats = step(args, agent, optimizer, healthy_losses(args, agent, mb), epoch, start, iteration)
                assert stats["paco/masked_fraction"].item() == 0.0
                plain_optimizer.zero_grad()
                healthy_losses(args, plain, mb).mean().backward()
                torch.nn.utils.clip_grad_norm_(plain.parameters(), args.max_grad_norm)
                plain_optimizer.step()
    assert agent.resets.tolist() == [0] * T and not agent.skipped.any()
    for (name, p), q in zip(agent.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# Maskout and reset on an injected exploding task
# ---------------------------------------------------------------------------------------------
def run_two_steps(second_losses):
    """A healthy warm-up step (Adam moments everywhere), then a step with `second_losses(losses)`."""
    args = make_args()
    agent, optimizer = make_agent_and_optimizer(args)
    mb = make_minibatch()
    step(args, agent, optimizer, healthy_losses(args, agent, mb), epoch=0, start=0, iteration=1)
    torch.manual_seed(123)  # the same random stream for the reset draw in both runs
    stats = step(args, agent, optimizer, second_losses(healthy_losses(args, agent, mb)), epoch=0, start=0, iteration=2)
    return args, agent, optimizer, mb, stats


def test_exploding_task_is_masked_and_the_healthy_update_is_exactly_the_one_without_it():
    _, blown, _, _, stats = run_two_steps(lambda losses: exploding(losses, task=2))
    _, absent, _, _, _ = run_two_steps(lambda losses: torch.where(torch.arange(T) == 2, 0.0, losses))
    _, unmasked, _, _, _ = run_two_steps(lambda losses: losses)

    assert blown.resets.tolist() == [0, 0, 1, 0]
    assert blown.skipped.tolist() == [False, False, True, False]
    assert stats["paco/masked_fraction"].item() == pytest.approx(1 / T)
    assert absent.resets.sum().item() == 0
    for (name, p), q in zip(blown.named_parameters(), absent.parameters(), strict=True):
        if name == "w":
            keep = torch.arange(T) != 2
            assert torch.equal(p[keep], q[keep])
            assert not torch.allclose(p[2], q[2])  # task 2's w was reset
        else:
            assert torch.equal(p, q), name  # copies, biases, log-std: bit-identical
    moved = (blown.critic.layers[0].weight - unmasked.critic.layers[0].weight).abs().max()
    assert moved > 1e-4  # the comparison can tell a different update apart


def test_reset_w_is_a_dirichlet_convex_combination_of_the_healthy_tasks_w():
    coefficient_draws = []
    for seed in range(3):
        def blow_up(losses, seed=seed):
            torch.manual_seed(seed)
            return exploding(losses, task=1)

        _, agent, optimizer, _, _ = run_two_steps(blow_up)
        w = agent.w.detach().double()
        healthy = w[[0, 2, 3]]  # [3, K], after this step's update (the reset uses them)
        # Solve w_1 = sum_j c_j w_j with sum_j c_j = 1 (K + 1 equations, 3 unknowns).
        A = torch.cat([healthy.T, torch.ones(1, 3, dtype=w.dtype)])  # [K + 1, 3]
        target = torch.cat([w[1], torch.ones(1, dtype=w.dtype)])
        c = torch.linalg.lstsq(A, target.unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(A @ c, target, rtol=0, atol=1e-5)
        assert (c > 0).all() and c.sum().item() == pytest.approx(1.0)
        coefficient_draws.append(c)
        assert optimizer.state[agent.w]["exp_avg"][1].abs().max() == 0  # stale momentum of the reset row gone
        assert optimizer.state[agent.actor_logstd]["exp_avg"][1].abs().max() == 0
    assert not torch.allclose(coefficient_draws[0], coefficient_draws[1])  # a random point, not a fixed rule


def test_reset_task_skips_its_remaining_minibatches_until_the_next_iteration():
    args, agent, optimizer, mb, _ = run_two_steps(lambda losses: exploding(losses, task=2))
    w_reset = agent.w[2].detach().clone()
    logstd_reset = agent.actor_logstd[2].detach().clone()
    w_other = agent.w[0].detach().clone()
    # The rest of this iteration: later minibatches of epoch 0, then epoch 1. Even a huge loss of
    # the skipped task neither counts nor fires again.
    for epoch, start, losses in ((0, N, None), (1, 0, "blown"), (1, N, None)):
        task_losses = healthy_losses(args, agent, mb)
        if losses == "blown":
            task_losses = exploding(task_losses, task=2)
        stats = step(args, agent, optimizer, task_losses, epoch, start, iteration=2)
        assert stats["paco/masked_fraction"].item() == pytest.approx(1 / T)
        assert torch.equal(agent.w[2], w_reset) and torch.equal(agent.actor_logstd[2], logstd_reset)
    assert agent.resets.tolist() == [0, 0, 1, 0]
    assert not torch.equal(agent.w[0], w_other)  # the others kept training
    # First minibatch of the next iteration: task 2 takes part again.
    stats = step(args, agent, optimizer, healthy_losses(args, agent, mb), epoch=0, start=0, iteration=3)
    assert stats["paco/masked_fraction"].item() == 0.0
    assert not agent.skipped.any()
    assert not torch.equal(agent.w[2], w_reset)


def test_no_maskout_flag_lets_every_task_contribute():
    args = make_args(maskout=False)
    agent, optimizer = make_agent_and_optimizer(args)
    losses = exploding(healthy_losses(args, agent, make_minibatch()), task=2)
    stats = step(args, agent, optimizer, losses)
    assert stats["paco/masked_fraction"].item() == 0.0 and agent.resets.sum().item() == 0


@pytest.mark.parametrize(("kind", "ratio"), [("gym", 50.0), ("metaworld", 20.0)])
def test_unset_maskout_ratio_takes_the_suite_kinds_value_and_a_given_one_stays(kind, ratio):
    suite = types.SimpleNamespace(num_tasks=T, kind=kind)
    unset = make_args(maskout_ratio=None, hidden_sizes=(8,))
    paco.make_agent(unset, suite, OBS, ACT, discrete=False)
    assert unset.maskout_ratio == ratio
    given = make_args(maskout_ratio=7.0, hidden_sizes=(8,))
    paco.make_agent(given, suite, OBS, ACT, discrete=False)
    assert given.maskout_ratio == 7.0
    # --no-maskout leaves the ratio unset, so args.json stays valid input for --resume
    off = make_args(maskout=False, hidden_sizes=(8,))
    paco.make_agent(off, suite, OBS, ACT, discrete=False)
    assert off.maskout_ratio is None
    paco.check_paco_args(off)


# ---------------------------------------------------------------------------------------------
# Parameter counts, flags, diagnostics
# ---------------------------------------------------------------------------------------------
def test_parameter_counts_match_a_count_by_hand():
    from shared.params import count_parameters

    # obs 3, hidden (4,), T = 3, K = 2. One copy: actor 3*4+4 + 4*2+2 = 26, critic 3*4+4 + 4*1+1 = 21.
    continuous = paco.Agent(3, 2, discrete=False, num_tasks=3, hidden_sizes=(4,), num_copies=2)
    assert count_parameters(continuous) == {
        "total": 2 * 47 + 3 * 2 + 3 * 2,  # K copies + w table [T, K] + log-std [T, A]
        "active": 47 + 2,  # one composed network (the w row folds into it) + the task's log-std row
        "trained_per_task": 2 * 47 + 2 + 2,  # every copy + the task's w row + its log-std row
    }
    discrete = paco.Agent(3, 2, discrete=True, num_tasks=3, hidden_sizes=(4,), num_copies=2)
    assert count_parameters(discrete) == {"total": 100, "active": 47, "trained_per_task": 96}


@pytest.mark.parametrize("flags", [dict(num_copies=0), dict(maskout_ratio=1.0), dict(maskout_floor=-1.0),
                                   dict(maskout=False, maskout_ratio=20.0)])
def test_bad_paco_flags_raise_a_usage_error(flags):
    from shared.cli import UsageError

    with pytest.raises(UsageError):
        paco.check_paco_args(make_args(**flags))


def test_diagnostics_report_w_resets_and_copy_spread_per_task():
    args, agent, _, _, _ = run_two_steps(lambda losses: exploding(losses, task=2))

    class Logger:
        task_names = ("a", "b", "c", "d")

    out = paco.method_diagnostics(args, agent, Logger(), 0)
    assert out["paco/resets_total"] == 1.0 and out["paco/c/resets"] == 1.0 and out["paco/a/resets"] == 0.0
    assert out["paco/b/w_3"] == pytest.approx(agent.w[1, 3].item())
    assert out["paco/c/w_sum"] == pytest.approx(agent.w[2].sum().item())
    assert out["paco/copy_spread"] > 0  # two steps moved the copies apart


# ---------------------------------------------------------------------------------------------
# Smoke runs
# ---------------------------------------------------------------------------------------------
SMOKE = {
    "cartpole-mt": ["--total-timesteps", "2560", "--eval-every", "2560"],
    "mt3": ["--num-envs-per-task", "1", "--num-steps", "100", "--num-minibatches", "2", "--update-epochs", "1",
            "--total-timesteps", "300", "--eval-every", "300"],
}


@pytest.mark.parametrize("env_id", list(SMOKE))
def test_smoke_run_writes_a_summary(env_id, tmp_path):
    proc = run_script("ppo_paco", ["--env-id", env_id, *SMOKE[env_id], "--eval-episodes", "1",
                                   "--final-eval-episodes", "1", "--runs-dir", str(tmp_path), "--no-cuda"], timeout=600)
    assert proc.returncode == 0, describe(proc)
    (run_dir,) = list(tmp_path.iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algo"] == "ppo_paco"
    assert summary["parameter_counts"]["trained_per_task"] > summary["parameter_counts"]["active"]
