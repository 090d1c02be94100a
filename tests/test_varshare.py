"""VarShare's layer, KL, estimators, regulariser and update rule, checked against slow references."""

from __future__ import annotations

import glob
import json
import math
import types

import pytest
import torch

from tests.conftest import load_script

vs = load_script("ppo_varshare")


def fixed_prior(sigma_prior=0.1, rho_init=-2.0):
    """Every layer gets this prior std and initial sigma = softplus(rho_init)."""
    return lambda fan_in: (sigma_prior, math.log1p(math.exp(rho_init)))


def make_layer(T=3, d_in=5, d_out=4, variational=True, residual_bias=False, seed=0):
    torch.manual_seed(seed)
    sigma_prior, sigma_init = fixed_prior()(d_in)
    layer = vs.VarShareLinear(T, d_in, d_out, 1.0, variational, sigma_prior, sigma_init, residual_bias)
    with torch.no_grad():
        layer.mu.normal_(0, 0.3)
        if layer.mu_bias is not None:
            layer.mu_bias.normal_(0, 0.3)
    return layer


def args_for(**overrides):
    base = dict(residual="variational", beta=1.0, l2_lambda=None, kl_scale="per-rollout", reg_grad_scale="rl-clip",
                num_envs_per_task=2, num_steps=8, max_grad_norm=0.5, prior_step="gradient")
    base.update(overrides)
    return types.SimpleNamespace(**base)


def test_closed_form_kl_matches_monte_carlo_and_vanishes_at_the_prior():
    torch.manual_seed(1)
    sigma_prior = 0.1
    agent = vs.Agent(3, 2, True, num_tasks=2, hidden_sizes=(4,), variational=True, prior=fixed_prior(sigma_prior),
                     residual_bias=False, rollout_weights="mean", estimator="flipout", eval_sample_weights=0)
    with torch.no_grad():
        for layer in agent.layers():
            layer.mu.normal_(0, 0.05)
            layer.rho.uniform_(-4, -1)
    kl = agent.kl_per_task()  # [T]
    # Monte Carlo: E_q[log q(phi) - log p(phi)] with many samples
    samples = 20000
    mc = torch.zeros(2, dtype=torch.float64)
    for layer in agent.layers():
        mu, sigma = layer.mu.double(), layer.sigma().double()
        phi = mu + sigma * torch.randn(samples, *mu.shape, dtype=torch.float64)
        log_q = torch.distributions.Normal(mu, sigma).log_prob(phi)
        log_p = torch.distributions.Normal(0.0, sigma_prior).log_prob(phi)
        mc += (log_q - log_p).mean(0).flatten(1).sum(1)
    assert torch.allclose(kl.double(), mc, rtol=0.02), (kl, mc)

    with torch.no_grad():
        for layer in agent.layers():
            layer.mu.zero_()
            layer.rho.fill_(vs.softplus_inverse(sigma_prior))
    assert agent.kl_per_task().abs().max() < 1e-3  # float32 softplus round trip
    with torch.no_grad():  # exactly zero when sigma equals sigma_prior exactly
        for layer in agent.layers():
            layer.rho.fill_(0.0)
            layer.sigma_prior = math.log1p(math.e**0.0)
    exact = agent.kl_per_task()
    assert torch.equal(exact, torch.zeros(2))


def test_batched_layer_equals_per_task_python_loop_forward_and_gradients():
    for T, n, d_in, d_out in [(3, 5, 4, 6), (1, 7, 3, 2), (4, 1, 6, 3)]:
        layer = make_layer(T, d_in, d_out, residual_bias=True, seed=T)
        x = torch.randn(T, n, d_in, requires_grad=True)
        y = layer(x, "mean")
        ref = torch.stack([x[t] @ (layer.theta + layer.mu[t]) + layer.bias + layer.mu_bias[t, 0] for t in range(T)])
        assert torch.allclose(y, ref, atol=1e-6)
        grad_out = torch.randn_like(y)
        grads = torch.autograd.grad((y * grad_out).sum(), [x, layer.theta, layer.mu, layer.bias])
        grads_ref = torch.autograd.grad((ref * grad_out).sum(), [x, layer.theta, layer.mu, layer.bias])
        for a, b in zip(grads, grads_ref, strict=True):
            assert torch.allclose(a, b, atol=1e-5)


def test_reparam_uses_one_weight_sample_per_task():
    layer = make_layer(T=2, d_in=3, d_out=2)
    x = torch.randn(2, 4, 3)
    torch.manual_seed(5)
    y = layer(x, "reparam")
    torch.manual_seed(5)
    eps = torch.randn_like(layer.mu)
    weight = layer.theta + layer.mu + layer.sigma() * eps
    ref = torch.stack([x[t] @ weight[t] + layer.bias for t in range(2)])
    assert torch.allclose(y, ref, atol=1e-6)


@pytest.mark.parametrize("T, n, d_in, d_out, shared_bias, input_grad",
                         [(3, 5, 4, 6, True, True), (1, 7, 3, 2, False, True), (4, 1, 6, 3, True, False)])
def test_hand_written_backward_equals_autograd(T, n, d_in, d_out, shared_bias, input_grad):
    """FlipoutMatmul and ReparamMatmul give autograd's numbers through their defining expression."""
    torch.manual_seed(T)
    theta = torch.randn(d_in, d_out, requires_grad=True)
    mu = torch.randn(T, d_in, d_out, requires_grad=True)
    rho = torch.randn(T, d_in, d_out).sub_(2).requires_grad_()
    bias = torch.randn(d_out if shared_bias else (T, 1, d_out), requires_grad=True)
    x = torch.randn(T, n, d_in, requires_grad=input_grad)
    eps = torch.randn(T, d_in, d_out)
    s_in, s_out = vs.random_signs((T, n, d_in), x), vs.random_signs((T, n, d_out), x)
    sigma, slope = torch.nn.functional.softplus(rho).detach(), torch.sigmoid(rho).detach()
    grad_y = torch.randn(T, n, d_out)
    inputs = [x, theta, mu, rho, bias] if input_grad else [theta, mu, rho, bias]
    sig = torch.nn.functional.softplus(rho)
    cases = [(vs.FlipoutMatmul.apply(x, theta, mu, rho, bias, sigma, slope, eps, s_in, s_out),
              x @ (theta + mu) + bias + ((x * s_in) @ (sig * eps)) * s_out),
             (vs.ReparamMatmul.apply(x, theta, mu, rho, bias, sigma, slope, eps),
              x @ (theta + mu + sig * eps) + bias)]
    for fused, reference in cases:
        assert torch.allclose(fused, reference, atol=1e-5)
        got = torch.autograd.grad((fused * grad_y).sum(), inputs)
        want = torch.autograd.grad((reference * grad_y).sum(), inputs, retain_graph=True)
        for a, b in zip(got, want, strict=True):
            assert a.shape == b.shape
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["flipout", "reparam"])
def test_a_second_loss_forward_before_backward_makes_the_first_backward_refuse(mode):
    """The loss's forward writes eps, theta + mu and sigma * eps into tensors each layer allocates
    once. A second forward overwrites what the first one's backward needs: autograd must then
    refuse that backward instead of returning gradients that mix the two draws."""
    layer = make_layer()
    x = torch.randn(3, 4, 5)
    first = layer(x, mode)
    second = layer(x, mode)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.sum().backward()
    second.sum().backward()
    assert layer.rho.grad.abs().sum() > 0


def test_random_signs_are_balanced_and_independent():
    s = vs.random_signs((2000, 301), torch.zeros(1))
    assert s.shape == (2000, 301) and set(s.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(s.mean())) < 0.005  # 602,000 fair signs: standard error 0.0013
    assert abs(float((s[:, 1:] * s[:, :-1]).mean())) < 0.005  # neighbours within a row
    assert abs(float((s[1:] * s[:-1]).mean())) < 0.005  # the same column in neighbouring rows
    wide = vs.random_signs((4, 9), torch.zeros(1, dtype=torch.float64))  # the table follows the dtype
    assert wide.dtype == torch.float64 and set(wide.unique().tolist()) <= {-1.0, 1.0}


def replicated(layer, copies):
    """The same layer with every task repeated ``copies`` times: one call = ``copies`` independent draws."""
    T, d_in, d_out = layer.mu.shape
    big = vs.VarShareLinear(T * copies, d_in, d_out, 1.0, True, *fixed_prior()(d_in), False)
    with torch.no_grad():
        big.theta.copy_(layer.theta)
        big.bias.copy_(layer.bias)
        big.mu.copy_(layer.mu.repeat(copies, 1, 1))
        big.rho.copy_(layer.rho.repeat(copies, 1, 1))
    return big


def test_flipout_mean_variance_and_decorrelation():
    T, n, d_in, d_out, D = 2, 3, 4, 3, 20000
    layer = make_layer(T, d_in, d_out)
    x = torch.randn(T, n, d_in)
    x[:, 1] = x[:, 0]  # two identical examples: without sign flips their noise would be identical
    big = replicated(layer, D)
    with torch.no_grad():
        mean_out = layer(x, "mean")
        draws = big(x.repeat(D, 1, 1), "flipout").view(D, T, n, d_out)
        reparam = big(x.repeat(D, 1, 1), "reparam").view(D, T, n, d_out)
    assert torch.allclose(draws.mean(0), mean_out, atol=0.02)
    expected_var = torch.einsum("tni,tio->tno", x**2, layer.sigma().detach() ** 2)
    assert torch.allclose(draws.var(0), expected_var, rtol=0.06, atol=1e-4)
    # the two identical examples of one task share eps, yet Flipout's random signs leave their
    # noise uncorrelated; the reparam estimator (one sample per task) makes it identical.
    noise = draws - mean_out
    corr = torch.corrcoef(torch.stack([noise[:, 0, 0].flatten(), noise[:, 0, 1].flatten()]))[0, 1]
    assert abs(float(corr)) < 0.05
    noise_r = reparam - mean_out
    corr_r = torch.corrcoef(torch.stack([noise_r[:, 0, 0].flatten(), noise_r[:, 0, 1].flatten()]))[0, 1]
    assert float(corr_r) > 0.99


def tiny_agent(variational=True, T=2):
    """Each layer with its own prior std (fan-in scaled), as the script builds them by default."""
    torch.manual_seed(0)
    return vs.Agent(3, 2, True, num_tasks=T, hidden_sizes=(5,), variational=variational,
                    prior=lambda fan_in: (0.1 / math.sqrt(fan_in), 0.007), residual_bias=False,
                    rollout_weights="mean", estimator="flipout", eval_sample_weights=0)


def rl_loss(agent):
    obs = torch.randn(agent.num_tasks, 6, 3)
    task_ids = torch.arange(agent.num_tasks)[:, None].expand(-1, 6)
    _, logprob, _, value = agent.get_action_and_value(obs, task_ids, torch.randint(0, 2, (agent.num_tasks, 6)))
    return -(logprob * torch.randn_like(logprob)).mean(dim=1) + value.pow(2).mean(dim=1)  # [T]


def test_with_beta_zero_rl_gradients_reach_mu_and_rho():
    agent = tiny_agent()
    opt = torch.optim.Adam(agent.parameters(), lr=1e-3)
    vs.method_update(args_for(beta=0.0), agent, opt, rl_loss(agent), {})
    for layer in agent.layers():
        assert layer.mu.grad.abs().sum() > 0
        assert layer.rho.grad.abs().sum() > 0


def test_large_beta_without_rl_signal_shrinks_mu_to_zero():
    agent = tiny_agent()
    with torch.no_grad():
        for layer in agent.layers():
            layer.mu.normal_(0, 0.5)
    start = sum(layer.mu.abs().mean() for layer in agent.layers())
    opt = torch.optim.Adam(agent.parameters(), lr=1e-2)
    args = args_for(beta=100.0)
    for _ in range(600):
        vs.method_update(args, agent, opt, torch.zeros(agent.num_tasks, requires_grad=True), {})
    end = sum(layer.mu.abs().mean() for layer in agent.layers())
    assert end < 0.01 * start


def linear_pull_run(mode, noise, steps=800, beta=50.0, max_grad_norm=1e9):
    """Adam (the script's settings, lr 1e-2) on a loss linear in mu, sum(G * mu) with G fixed
    (plus Gaussian noise), and the prior's pull: mu's stationary point is -G / k per entry.
    Returns (relative error of the last 300 steps' mean, their mean step over |mu*|)."""
    agent = tiny_agent()
    torch.manual_seed(1)
    G = [torch.randn_like(layer.mu) * 0.01 for layer in agent.layers()]
    opt = vs.make_adam(agent.parameters(), 1e-2)
    args = args_for(beta=beta, max_grad_norm=max_grad_norm, prior_step=mode)
    history = []
    for _ in range(steps):
        grads = [g + noise * torch.randn_like(g) for g in G]
        losses = sum((layer.mu * g).flatten(1).sum(1) for layer, g in zip(agent.layers(), grads, strict=True))
        vs.method_update(args, agent, opt, losses * agent.num_tasks, {})  # the update takes the mean over tasks
        history.append(torch.cat([layer.mu.detach().flatten() for layer in agent.layers()]))
    target = torch.cat([(-g / vs.pull_curvature(args, agent, layer)).flatten()
                        for layer, g in zip(agent.layers(), G, strict=True)])
    tail = torch.stack(history[-300:])
    error = float((tail.mean(0) - target).norm() / target.norm())
    step = float((tail[1:] - tail[:-1]).norm(dim=1).mean() / target.norm())
    return error, step


def test_prox_prior_step_reaches_the_stationary_point_without_oscillating():
    """--prior-step prox: the same stationary point as the pull's gradient in Adam, mu = -g / k.
    With a noisy RL gradient (as every minibatch's is) the gradient form circles it in steps
    several times |mu*| wide, because Adam normalises the stiff pull's gradient to full-size steps;
    prox keeps mu's step a small fraction of |mu*| (what the flag is for)."""
    error, step = linear_pull_run("prox", noise=0.0)
    assert error < 1e-4 and step < 1e-4
    error, step = linear_pull_run("prox", noise=0.01)
    error_g, step_g = linear_pull_run("gradient", noise=0.01)
    assert error < 0.15 and error_g < 0.15  # both about the same point on average ...
    assert step_g > 1.0  # ... the gradient form by steps larger than the residual itself
    assert step < 0.05 * step_g


def test_prox_prior_step_keeps_the_stationary_point_when_the_rl_gradient_is_clipped():
    """Under rl-clip Adam sees c * g_RL (c < 1 here, about 0.005), so the pull must be scaled by
    the same c: mu's stationary point stays -g / k, not -c g / k."""
    error, step = linear_pull_run("prox", noise=0.0, max_grad_norm=1e-3)
    assert error < 1e-3 and step < 1e-3


def test_prox_prior_step_leaves_theta_and_rho_as_the_gradient_form_does():
    """Only mu's update changes under prox: theta and rho take the same step in both forms."""
    after = {}
    for mode in ("gradient", "prox"):
        agent = tiny_agent()
        with torch.no_grad():
            for layer in agent.layers():
                layer.mu.normal_(0, 0.05)
        opt = vs.make_adam(agent.parameters(), 1e-3)
        torch.manual_seed(3)
        vs.method_update(args_for(beta=3.0, prior_step=mode), agent, opt, rl_loss(agent), {})
        after[mode] = agent
    for a, b in zip(after["gradient"].layers(), after["prox"].layers(), strict=True):
        assert torch.equal(a.theta, b.theta) and torch.equal(a.rho, b.rho)
        assert not torch.equal(a.mu, b.mu)


def test_kl_gradient_is_added_after_clipping_and_never_touches_theta():
    agent = tiny_agent()
    opt = torch.optim.SGD(agent.parameters(), lr=0.0)
    losses = rl_loss(agent)
    vs.method_update(args_for(beta=1e4, max_grad_norm=1e-3, reg_grad_scale="none"), agent, opt, losses, {})
    theta_grads = torch.cat([layer.theta.grad.flatten() for layer in agent.layers()])
    # theta's gradient is the clipped RL gradient alone: its norm is at most the clip
    assert theta_grads.norm() <= 1e-3 + 1e-6
    rho_grads = torch.cat([layer.rho.grad.flatten() for layer in agent.layers()])
    assert rho_grads.norm() > 1.0  # the huge KL gradient was added unclipped to the residuals


@pytest.mark.parametrize("max_grad_norm", [1e-3, 1e3])
def test_rl_clip_scaling_keeps_the_elbo_ratio_of_rl_to_kl_gradient(max_grad_norm):
    """--reg-grad-scale rl-clip: every parameter's gradient is c * (g_RL + g_KL) with the one
    clip coefficient c = min(1, max_grad_norm / ||g_RL||) that the RL gradient alone sets."""
    agent = tiny_agent()
    with torch.no_grad():
        for layer in agent.layers():
            layer.mu.normal_(0, 0.05)
    args = args_for(beta=3.0, max_grad_norm=max_grad_norm)
    params = list(agent.parameters())
    losses = rl_loss(agent)
    g_rl = torch.autograd.grad(losses.mean(), params, retain_graph=True)
    reg, _ = vs.regularizer(args, agent)
    g_reg = torch.autograd.grad(reg, params, allow_unused=True)
    c = min(1.0, max_grad_norm / float(torch.cat([g.flatten() for g in g_rl]).norm()))
    stats = vs.method_update(args, agent, torch.optim.SGD(params, lr=0.0), losses, {})
    for p, a, b in zip(params, g_rl, g_reg, strict=True):
        expected = c * (a + (0 if b is None else b))
        assert torch.allclose(p.grad, expected, rtol=1e-4, atol=1e-7), p.shape
    assert float(stats["varshare/rl_clip_factor"]) == pytest.approx(1 / c, rel=1e-4)
    assert float(stats["varshare/effective_beta"]) == 3.0


def test_l2soft_at_matched_lambda_gives_varshare_mu_gradient_with_sigma_at_prior():
    var_agent, l2_agent = tiny_agent(True), tiny_agent(False)
    with torch.no_grad():
        for lv, ll in zip(var_agent.layers(), l2_agent.layers(), strict=True):
            lv.mu.normal_(0, 0.1)
            ll.mu.copy_(lv.mu)
            lv.rho.fill_(vs.softplus_inverse(lv.sigma_prior))  # sigma fixed at the layer's prior
    assert len({layer.sigma_prior for layer in var_agent.layers()}) == 2  # fan-in 3 and fan-in 5
    beta = 0.7
    reg_var, _ = vs.regularizer(args_for(beta=beta), var_agent)
    reg_l2, _ = vs.regularizer(args_for(residual="l2", beta=beta), l2_agent)
    g_var = torch.autograd.grad(reg_var, [layer.mu for layer in var_agent.layers()])
    g_l2 = torch.autograd.grad(reg_l2, [layer.mu for layer in l2_agent.layers()])
    for a, b in zip(g_var, g_l2, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    # and the RL forward is the same without noise: mean weights equal
    obs = torch.randn(2, 4, 3)
    with torch.no_grad():
        assert torch.allclose(var_agent.actor(obs, "mean"), l2_agent.actor(obs, "mean"))


def test_mean_weight_cache_follows_optimizer_steps():
    agent = tiny_agent()
    obs = torch.randn(2, 4, 3)
    task_ids = torch.arange(2)[:, None].expand(-1, 4)
    with torch.inference_mode():
        before = agent.act_deterministic(obs, task_ids).clone()
        before_head = agent.actor(obs, "mean").clone()
    opt = torch.optim.Adam(agent.parameters(), lr=0.1, fused=True)
    vs.method_update(args_for(beta=0.0), agent, opt, rl_loss(agent), {})
    with torch.inference_mode():
        after_head = agent.actor(obs, "mean")
    with torch.no_grad():
        first, second = agent.actor.layers[0], agent.actor.layers[1]
        fresh = torch.stack([obs[t] @ (first.theta + first.mu[t]) + first.bias for t in range(2)])
        fresh = torch.stack([torch.tanh(fresh[t]) @ (second.theta + second.mu[t]) + second.bias for t in range(2)])
    assert not torch.allclose(before_head, after_head)
    assert torch.allclose(after_head, fresh, atol=1e-6)
    assert before.shape == (2, 4)
    # fused Adam leaves version counters alone: the sigma shared by the loss and the KL gradient
    # must still follow the step
    for layer in agent.layers():
        assert torch.equal(layer.sigma_and_slope()[0], torch.nn.functional.softplus(layer.rho.detach()))


def test_modes_follow_autograd_training_and_eval_state():
    agent = tiny_agent()
    assert agent.mode() == "flipout"  # a loss is being computed
    with torch.no_grad():
        assert agent.mode() == "mean"  # acting
        agent.eval()
        assert agent.mode() == "mean"  # evaluation
        agent.train()
    agent.eval_sample_weights, agent.eval_passes = 3, 3
    agent.eval()
    with torch.no_grad():
        assert agent.mode() == "fixed"
    agent.train()


def test_episode_rollout_weights_redraw_only_for_ended_envs():
    torch.manual_seed(0)
    agent = vs.Agent(3, 2, True, num_tasks=2, hidden_sizes=(5,), variational=True, prior=fixed_prior(0.1, -1.0),
                     residual_bias=False, rollout_weights="episode", estimator="flipout", eval_sample_weights=0)
    obs = torch.randn(2, 3, 3)  # T=2 tasks, k=3 envs
    task_ids = torch.arange(2)[:, None].expand(-1, 3)
    with torch.inference_mode():  # the rollout's forward (it builds the cached sampled weights)
        agent.get_action_and_value(obs, task_ids)
    eps_before = agent.actor.layers[0].fixed_eps.clone()
    ended = torch.tensor([[True, False, False], [False, False, True]])
    agent.episode_boundaries(ended)  # outside inference mode, as the core calls it
    eps_after = agent.actor.layers[0].fixed_eps
    changed = (eps_before != eps_after).flatten(1).any(1)
    assert changed.tolist() == [True, False, False, False, False, True]
    # every env's output uses the explicit weight theta + mu + sigma * eps of its own sample,
    # redrawn rows included (the cache is updated row by row)
    layer = agent.actor.layers[0]
    with torch.inference_mode():
        y = layer(obs, "fixed")
    for row in range(6):
        t, j = divmod(row, 3)
        w = layer.theta + layer.mu[t] + layer.sigma()[t] * layer.fixed_eps[row]
        assert torch.allclose(y[t, j], obs[t, j] @ w + layer.bias, atol=1e-6)
    # after an update the cached sampled weights follow the new theta, mu and sigma
    optimizer = torch.optim.Adam(agent.parameters(), lr=0.1, fused=True)
    vs.method_update(args_for(beta=0.0), agent, optimizer, rl_loss(agent), {})
    with torch.inference_mode():
        y = layer(obs, "fixed")
    w = layer.theta + layer.mu[1] + layer.sigma()[1] * layer.fixed_eps[5]
    assert torch.allclose(y[1, 2], obs[1, 2] @ w + layer.bias, atol=1e-6)


def test_each_sampled_evaluation_pass_draws_new_weights():
    torch.manual_seed(0)
    agent = vs.Agent(3, 2, True, num_tasks=2, hidden_sizes=(5,), variational=True, prior=fixed_prior(0.1, -1.0),
                     residual_bias=False, rollout_weights="mean", estimator="flipout", eval_sample_weights=2)
    obs = torch.randn(2, 1, 3)
    outputs = []
    for _ in range(2):
        agent.eval()  # one evaluation pass: a new weight sample per task
        with torch.inference_mode():
            outputs.append(agent.actor(obs, agent.mode()))
        agent.train()
    assert not torch.allclose(outputs[0], outputs[1])


def test_sampled_weight_runs_train_and_evaluate_end_to_end(tmp_path):
    """Smoke run of --rollout-weights episode with --eval-sample-weights and --residual-bias
    through main(): episodes end mid-rollout (outside inference mode, as the core calls it),
    evaluations sample their own weights, updates follow; the layer-level tests check the numbers."""
    args = vs.Args(env_id="cartpole-mt", total_timesteps=3 * 5 * 2 * 64, num_envs_per_task=2, num_steps=64,
                   num_minibatches=2, update_epochs=1, eval_every=5 * 2 * 64, eval_episodes=1, final_eval_episodes=2,
                   hidden_sizes=(8,), runs_dir=str(tmp_path), rollout_weights="episode", eval_sample_weights=2,
                   residual_bias=True)
    summary = vs.main(args)
    assert summary["global_step"] == 3 * 5 * 2 * 64
    assert all(math.isfinite(task["return"]) for task in summary["per_task"].values())
    evals = [json.loads(line) for path in glob.glob(str(tmp_path / "*" / "eval.jsonl")) for line in open(path)]
    deterministic = [e for e in evals if not e["label"]]
    assert len(deterministic) >= 3 and all(e["passes"] == 2 for e in deterministic)  # each: two weight samples
    assert set(summary["residual_ratios"]) == set(summary["task_names"])  # the report's heatmap input


def test_the_sampled_evaluation_pass_leaves_training_untouched_with_sampled_eval_weights(tmp_path):
    """--eval-sample-weights draws a weight sample on entering eval mode; the sampled action pass
    does so inside its own RNG stream, so training is bit-identical with or without that pass."""
    states = []
    for eval_sampled in (True, False):
        args = vs.Args(env_id="cartpole-mt", tasks=["standard", "long-pole"], total_timesteps=3 * 2 * 2 * 16,
                       num_envs_per_task=2, num_steps=16, num_minibatches=2, update_epochs=1, eval_every=2 * 2 * 16,
                       eval_episodes=1, final_eval_episodes=1, hidden_sizes=(8,), eval_sample_weights=2,
                       runs_dir=str(tmp_path / str(eval_sampled)), cuda=False, eval_sampled=eval_sampled)
        vs.main(args)
        (run_dir,) = (tmp_path / str(eval_sampled)).iterdir()
        states.append(torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False))
    for name, value in states[0]["agent"].items():
        assert torch.equal(value, states[1]["agent"][name]), name
    assert torch.equal(states[0]["rng"]["torch"], states[1]["rng"]["torch"])


def test_summary_residual_ratios_are_the_logged_per_layer_ratios_under_each_task_name():
    """method_final's ratios (summary.json, read by the report) equal the diagnostics' tensorboard
    values ||mu_m|| / ||theta|| per layer, keyed by the selected tasks' names in the run's order."""
    args = vs.Args(env_id="cartpole-mt", tasks=["heavy-pole", "standard"], hidden_sizes=(8,))
    suite = vs.make_suite("cartpole-mt")
    vs.apply_suite_defaults(args, suite)
    suite = vs.select_run_tasks(args, suite)
    torch.manual_seed(0)
    agent = vs.make_agent(args, suite, 4, 2, True)
    with torch.no_grad():
        for t, layer in enumerate(agent.layers()):
            layer.mu.normal_(0, 0.05 * (t + 1))
    ratios = vs.method_final(args, agent, final_evaluation=None)["residual_ratios"]
    logged = vs.method_diagnostics(args, agent, types.SimpleNamespace(task_names=suite.task_names), 0)
    assert list(ratios) == ["heavy-pole", "standard"]
    for task, per_layer in ratios.items():
        assert list(per_layer) == ["critic0", "critic1", "actor0", "actor1"]
        for layer, value in per_layer.items():
            assert value > 0 and value == pytest.approx(logged[f"varshare/{task}/residual_ratio/{layer}"])


def test_parameter_counts_match_hand_count():
    agent = tiny_agent()  # obs 3, hidden 5, 2 actions (discrete), T = 2
    theta = (3 * 5 + 5 * 1) + (3 * 5 + 5 * 2)  # critic + actor weights
    bias = (5 + 1) + (5 + 2)
    from shared.params import count_parameters

    counts = count_parameters(agent)
    assert counts["total"] == theta + bias + 2 * 2 * theta  # mu and rho per task
    assert counts["active"] == theta + bias
    assert counts["trained_per_task"] == theta + bias + 2 * theta


def test_l2_refuses_flags_that_need_weight_noise():
    from shared.cli import UsageError

    args = types.SimpleNamespace(residual="l2", estimator="reparam", rollout_weights="mean", eval_sample_weights=0,
                                 l2_lambda=None, prior_scaling="fan-in", sigma_prior=None, sigma_prior_gain=None,
                                 sigma_init_ratio=vs.Args.sigma_init_ratio, beta=1.0, hidden_sizes=(4,),
                                 residual_bias=False, task_input="none")
    suite = types.SimpleNamespace(num_tasks=2)
    with pytest.raises(UsageError, match="estimator"):
        vs.make_agent(args, suite, 3, 2, True)
    args = types.SimpleNamespace(**{**vars(args), "residual": "variational", "estimator": "flipout", "l2_lambda": 1.0})
    with pytest.raises(UsageError, match="l2-lambda"):
        vs.make_agent(args, suite, 3, 2, True)
    # L2Soft with an explicit --l2-lambda: --beta and --sigma-prior would be silently unused
    args = types.SimpleNamespace(**{**vars(args), "residual": "l2", "l2_lambda": 1.0, "beta": 2.0})
    with pytest.raises(UsageError, match="--beta does nothing"):
        vs.make_agent(args, suite, 3, 2, True)
    args.beta = vs.Args.beta
    assert vs.make_agent(args, suite, 3, 2, True).variational is False


def test_prox_with_no_pull_is_refused_rather_than_silently_equal_to_the_gradient_form():
    from shared.cli import UsageError

    base = dict(residual="variational", estimator="flipout", rollout_weights="mean", eval_sample_weights=0,
                l2_lambda=None, prior_scaling="fan-in", sigma_prior=None, sigma_prior_gain=None,
                sigma_init_ratio=vs.Args.sigma_init_ratio, hidden_sizes=(4,), residual_bias=False,
                task_input="none", prior_step="prox")
    suite = types.SimpleNamespace(num_tasks=2)
    for extra in (dict(beta=0.0), dict(residual="l2", beta=0.0), dict(residual="l2", beta=None, l2_lambda=0.0)):
        with pytest.raises(UsageError, match="there is no pull: drop --prior-step prox"):
            vs.make_agent(types.SimpleNamespace(**{**base, **extra}), suite, 3, 2, True)
    assert vs.make_agent(types.SimpleNamespace(**{**base, "beta": 0.3}), suite, 3, 2, True).variational


@pytest.mark.parametrize("residual", ["variational", "l2"])
@pytest.mark.parametrize("kl_scale", ["per-rollout", "sum", "per-param"])
def test_closed_form_regularizer_gradient_equals_autograd(residual, kl_scale):
    agent = tiny_agent(residual == "variational", T=3)
    with torch.no_grad():
        for layer in agent.layers():
            layer.mu.normal_(0, 0.1)
            if layer.rho is not None:
                layer.rho.uniform_(-6, 0)
    args = args_for(residual=residual, kl_scale=kl_scale, beta=0.3)
    params = [p for layer in agent.layers() for pair in layer.residuals() for p in pair if p is not None]
    reg, _ = vs.regularizer(args, agent)
    expected = torch.autograd.grad(reg, params)
    for p in params:
        p.grad = torch.zeros_like(p)
    vs.add_regularizer_gradient(args, agent)
    for p, g in zip(params, expected, strict=True):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))


def test_evaluation_keeps_the_rollouts_per_episode_samples_and_prunes_sampled_weights():
    torch.manual_seed(0)
    agent = vs.Agent(3, 2, True, num_tasks=2, hidden_sizes=(5,), variational=True, prior=fixed_prior(0.1, -1.0),
                     residual_bias=False, rollout_weights="episode", estimator="flipout", eval_sample_weights=2)
    obs = torch.randn(2, 3, 3)
    task_ids = torch.arange(2)[:, None].expand(-1, 3)
    with torch.inference_mode():
        agent.get_action_and_value(obs, task_ids)
    rollout_eps = agent.actor.layers[0].fixed_eps.clone()
    agent.eval()  # draws the evaluation sample: one per task
    assert agent.actor.layers[0].fixed_eps.shape[0] == 2
    agent.train()
    assert torch.equal(agent.actor.layers[0].fixed_eps, rollout_eps)  # mid-episode samples survive
    # a sampled-weight evaluation of the pruned model uses the pruned residual
    agent.eval()
    layer = agent.actor.layers[0]
    with torch.no_grad():
        layer.mu.normal_(0, 0.1)
        with agent.pruned(1e9):  # everything pruned: residual mean and noise are zero
            y = layer(obs[:, :1], "fixed")
            assert torch.allclose(y, obs[:, :1] @ layer.theta + layer.bias, atol=1e-6)
    agent.train()


def noise_std_at_preactivation(args, width, samples=4000):
    """Std of the Flipout noise one hidden layer (fan-in = width) adds to its pre-activations, with
    every sigma at the layer's prior std and inputs of unit rms."""
    torch.manual_seed(0)
    sigma_prior = vs.layer_prior_std(args, width)
    layer = vs.VarShareLinear(1, width, 8, 1.0, True, sigma_prior, sigma_prior, False)
    x = torch.randn(1, samples, width)
    with torch.no_grad():
        return float((layer(x, "flipout") - layer(x, "mean")).std())


def test_fan_in_prior_keeps_the_preactivation_noise_constant_across_widths():
    toy_gain = vs.SUITE_KIND_DEFAULTS["gym"]["sigma_prior_gain"]
    fan_in = types.SimpleNamespace(prior_scaling="fan-in", sigma_prior_gain=toy_gain, sigma_prior=None)
    absolute = types.SimpleNamespace(prior_scaling="absolute", sigma_prior_gain=None, sigma_prior=None)
    assert vs.layer_prior_std(fan_in, 64) == pytest.approx(0.03)  # the toy width keeps the old default
    assert vs.layer_prior_std(fan_in, 400) == pytest.approx(0.012)
    assert vs.layer_prior_std(absolute, 400) == 0.03
    narrow, wide = noise_std_at_preactivation(fan_in, 64), noise_std_at_preactivation(fan_in, 400)
    assert narrow == pytest.approx(0.24, rel=0.1) and wide == pytest.approx(narrow, rel=0.1)
    grows = noise_std_at_preactivation(absolute, 400) / noise_std_at_preactivation(absolute, 64)
    assert grows == pytest.approx(math.sqrt(400 / 64), rel=0.1)


def test_make_agent_records_per_layer_priors_and_refuses_mixed_scalings():
    from shared.cli import UsageError

    args = types.SimpleNamespace(residual="variational", estimator="flipout", rollout_weights="mean",
                                 eval_sample_weights=0, l2_lambda=None, prior_scaling="fan-in", sigma_prior=None,
                                 sigma_prior_gain=0.5, sigma_init_ratio=0.1, beta=1.0, hidden_sizes=(16, 4),
                                 residual_bias=False, task_input="none")
    suite = types.SimpleNamespace(num_tasks=2)
    agent = vs.make_agent(args, suite, 9, 2, True)
    expected = {"critic0": 0.5 / 3, "critic1": 0.5 / 4, "critic2": 0.25, "actor0": 0.5 / 3, "actor1": 0.5 / 4,
                "actor2": 0.25}
    assert args.derived["sigma_prior_per_layer"] == pytest.approx(expected)
    first = agent.actor.layers[0]
    assert float(first.sigma().mean()) == pytest.approx(0.1 * 0.5 / 3, rel=1e-4)  # the initial sigma ratio
    with pytest.raises(UsageError, match="--prior-scaling absolute"):
        vs.make_agent(types.SimpleNamespace(**{**vars(args), "sigma_prior": 0.03}), suite, 9, 2, True)
    with pytest.raises(UsageError, match="--sigma-prior-gain applies"):
        vs.make_agent(types.SimpleNamespace(**{**vars(args), "prior_scaling": "absolute"}), suite, 9, 2, True)
    with pytest.raises(UsageError, match="positive number"):
        vs.make_agent(types.SimpleNamespace(**{**vars(args), "sigma_prior_gain": float("nan")}), suite, 9, 2, True)
    l2 = types.SimpleNamespace(**{**vars(args), "residual": "l2", "sigma_init_ratio": vs.Args.sigma_init_ratio})
    vs.make_agent(l2, suite, 9, 2, True)
    assert l2.derived["l2_lambda_per_layer"]["critic2"] == pytest.approx(1.0 / (2 * 0.25**2))


@pytest.mark.parametrize(("kind", "gain", "beta", "step"), [("gym", 0.24, 1.0, "gradient"),
                                                         ("metaworld", 0.03, 0.0003, "prox")])
def test_unset_gain_beta_and_step_take_the_suite_kinds_values_and_given_ones_stay(kind, gain, beta, step,
                                                                                 monkeypatch):
    base = dict(residual="variational", estimator="flipout", rollout_weights="mean", eval_sample_weights=0,
                l2_lambda=None, prior_scaling="fan-in", sigma_prior=None, sigma_prior_gain=None,
                sigma_init_ratio=0.1, beta=None, hidden_sizes=(16,), residual_bias=False, task_input="none")
    suite = types.SimpleNamespace(num_tasks=2, kind=kind)
    args = types.SimpleNamespace(**base)
    vs.make_agent(args, suite, 16, 2, True)
    assert (args.sigma_prior_gain, args.beta, args.prior_step) == (gain, beta, step)
    assert args.derived["sigma_prior_per_layer"]["actor0"] == pytest.approx(gain / 4)  # fan-in 16
    given = types.SimpleNamespace(**{**base, "sigma_prior_gain": 0.5, "beta": 0.0})
    vs.make_agent(given, suite, 16, 2, True)
    assert (given.sigma_prior_gain, given.beta) == (0.5, 0.0)
    assert given.prior_step == "gradient"  # no pull: one step, recorded as the plain gradient
    for other in ("gradient", "prox"):
        chosen = types.SimpleNamespace(**{**base, "prior_step": other})
        vs.make_agent(chosen, suite, 16, 2, True)
        assert chosen.prior_step == other
    # a run from before --prior-step (no such key in its args.json) took the gradient step; so it resumes
    resumed = types.SimpleNamespace(**{**base, "beta": 0.3, "sigma_prior_gain": 0.03, "resume": "/nowhere"})
    monkeypatch.setattr(vs, "check_resumed_prior", lambda args: None)  # it reads the run's args.json
    vs.make_agent(resumed, suite, 16, 2, True)
    assert resumed.prior_step == "gradient"
    # L2Soft with its own lambda uses neither beta nor the prior: beta stays unset, not a made-up value
    l2 = types.SimpleNamespace(**{**base, "residual": "l2", "l2_lambda": 2.0,
                                  "sigma_init_ratio": vs.Args.sigma_init_ratio})
    vs.make_agent(l2, suite, 16, 2, True)
    assert l2.beta is None and set(l2.derived["l2_lambda_per_layer"].values()) == {2.0}


def onehot_agent(T=3, obs=4, hidden=(8, 8), act=2):
    torch.manual_seed(0)
    return vs.Agent(obs, act, False, num_tasks=T, hidden_sizes=hidden, variational=True,
                    prior=lambda fan_in: (0.1 / math.sqrt(fan_in), 0.007), residual_bias=False,
                    rollout_weights="mean", estimator="flipout", eval_sample_weights=0, task_input=True)


def test_one_hot_task_input_is_shared_mtls_first_layer_and_no_residual():
    """--task-input onehot: at mu = 0 the network is shared MTL's over [observation, one-hot] (same
    outputs once the weights are copied across), initialised as one orthogonal draw over both kinds
    of column; the task rows get gradient from their own task only and carry no KL."""
    T, OBS, ACT = 3, 4, 2
    agent = onehot_agent(T, OBS)
    mtl = load_script("ppo_mtl_embed").Agent(OBS, ACT, False, T, (8, 8), "onehot")
    with torch.no_grad():
        for name, net, ref in (("critic", agent.critic, mtl.critic), ("actor", agent.actor, mtl.actor)):
            first = torch.cat([net.layers[0].theta.T, net.task_bias.squeeze(1).T], dim=1)  # [h, obs + T]
            gram = first.T @ first  # orthogonal init with gain sqrt(2): orthonormal columns times sqrt(2)
            assert torch.allclose(gram, 2 * torch.eye(OBS + T), atol=1e-5), name
            for i, layer in enumerate(net.layers):
                ref[2 * i].weight.copy_(first if i == 0 else layer.theta.T)
                ref[2 * i].bias.copy_(layer.bias)
        mtl.actor_logstd.copy_(agent.actor_logstd)
    obs = torch.randn(1, 5, OBS).expand(T, 5, OBS)  # the same observations in every task's rows
    ids = torch.arange(T)[:, None].expand(T, 5)
    agent.eval()
    with torch.no_grad():
        assert torch.allclose(agent.get_value(obs, ids), mtl.get_value(obs, ids), atol=1e-6)
        head = agent.act_deterministic(obs, ids)
        assert torch.allclose(head, mtl.act_deterministic(obs, ids), atol=1e-6)
        assert not torch.allclose(head[0], head[1])  # the tasks differ with every residual at zero
    kl_before = agent.kl_per_task()
    agent.train()
    value = agent.get_value(obs, ids)  # flipout: the loss path
    value[1].sum().backward()  # task 1's loss only
    grad = agent.critic.task_bias.grad
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0
    with torch.no_grad():
        agent.critic.task_bias.add_(1.0)
    assert torch.equal(agent.kl_per_task(), kl_before)  # the task rows are outside the prior


def test_one_hot_task_input_counts_and_smoke_run(tmp_path):
    plain, onehot = tiny_agent(), vs.Agent(3, 2, True, num_tasks=2, hidden_sizes=(5,), variational=True,
                                           prior=lambda fan_in: (0.1 / math.sqrt(fan_in), 0.007),
                                           residual_bias=False, rollout_weights="mean", estimator="flipout",
                                           eval_sample_weights=0, task_input=True)
    from shared.params import count_parameters

    a, b = count_parameters(plain), count_parameters(onehot)
    assert b["total"] == a["total"] + 2 * 2 * 5  # a row of 5 per task in critic and actor
    assert b["trained_per_task"] == a["trained_per_task"] + 2 * 5  # the task's own rows
    assert b["active"] == a["active"]  # they fold into the first layers' biases
    args = vs.Args(env_id="cartpole-mt", total_timesteps=2 * 5 * 2 * 64, num_envs_per_task=2, num_steps=64,
                   num_minibatches=2, update_epochs=1, eval_every=10**9, final_eval_episodes=2,
                   hidden_sizes=(8,), runs_dir=str(tmp_path), task_input="onehot")
    summary = vs.main(args)
    assert summary["global_step"] == 2 * 5 * 2 * 64  # two iterations of five tasks
    saved = json.load(open(glob.glob(str(tmp_path / "*" / "args.json"))[0]))
    assert saved["task_input"] == "onehot"


def test_step_split_tells_a_steady_walk_from_steps_that_cancel():
    """benchmarks/varshare_step_split.py: theta moved the same way every step has net/path 1;
    mu stepped back and forth has net/path 0 and a step ratio equal to the step sizes' ratio."""
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("step_split", REPO / "benchmarks" / "varshare_step_split.py")
    split = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(split)
    agent = tiny_agent()
    recorder = split.StepSplit(horizon=2)

    def update(args, agent, optimizer, task_losses, info):
        sign = 1.0 if recorder.calls % 2 == 0 else -1.0
        with torch.no_grad():
            for layer in agent.layers():
                layer.theta.add_(0.01)
                layer.mu.add_(0.02 * sign)
        return {}

    wrapped = recorder.wrap(update)
    args = types.SimpleNamespace(target_kl=None, update_epochs=2, num_minibatches=2)
    for _ in range(16):  # four iterations of four steps
        wrapped(args, agent, None, None, {})
    assert len(recorder.records) == 4
    last = recorder.records[-1]["actor0"]
    theta_numel = agent.actor.layers[0].theta.numel()
    assert last["net_theta"] == pytest.approx(last["path_theta"]) == pytest.approx(4 * 0.01 * theta_numel**0.5)
    assert max(last["net_mu"]) < 1e-6 and last["long_net_mu"] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert last["long_net_theta"] == pytest.approx(last["long_path_theta"])  # the last two iterations
    assert last["step"] == pytest.approx([2.0, 2.0])  # per task: |d mu_t| / |d theta|, same shapes per row
    lines = split.summarise(recorder.records, windows=1, horizon=2)
    assert any(" actor0 " in line and "  1.000" in line for line in lines)
