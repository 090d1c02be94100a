"""PCGrad (algos/ppo_pcgrad.py): the surgery by hand, the equivalence with ppo_mtl_embed when no task
conflicts, the task-only entries, the diagnostics, and smoke runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import ScriptRuns, describe, load_script, selected_test_names

pcgrad = load_script("ppo_pcgrad")
mtl = load_script("ppo_mtl_embed")


# ---------------------------------------------------------------------------------------------
# The surgery itself, on vectors computed by hand.
# ---------------------------------------------------------------------------------------------

def test_conflicting_pair_is_projected_onto_the_normal_plane_of_the_other():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # dot = -1: conflict
    # g0 - (-1 / |g1|^2 = 2) g1 = [1, 0] + 0.5 [-1, 1];  g1 - (-1 / |g0|^2 = 1) g0 = [-1, 1] + [1, 0]
    out = pcgrad.project_conflicting(grads, torch.tensor([[1], [0]]))
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5], [0.0, 1.0]]), rtol=0, atol=1e-7)
    assert float(out[0] @ grads[1]) == pytest.approx(0.0, abs=1e-7)
    assert float(out[1] @ grads[0]) == pytest.approx(0.0, abs=1e-7)


def test_non_conflicting_gradients_are_left_untouched():
    grads = torch.tensor([[1.0, 2.0, 0.0], [3.0, -1.0, 0.5], [0.0, 1.0, 1.0]])  # dots 1, 2, -0.5: one conflict
    out = pcgrad.project_conflicting(grads, torch.tensor([[1, 2], [0, 2], [0, 1]]))
    torch.testing.assert_close(out[0], grads[0], rtol=0, atol=0)  # conflicts with nobody
    # g1 . g2 = -1 + 0.5 = -0.5, |g2|^2 = 2: g1 + 0.25 g2;  g2 + (0.5 / |g1|^2 = 10.25) g1
    torch.testing.assert_close(out[1], torch.tensor([3.0, -0.75, 0.75]), rtol=0, atol=1e-7)
    torch.testing.assert_close(out[2], grads[2] + (0.5 / 10.25) * grads[1], rtol=0, atol=1e-7)


def test_projection_uses_the_original_gradients_not_the_projected_ones():
    grads = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, -1.0, 1.0]])
    orders = torch.tensor([[1, 2], [0, 2], [0, 1]])
    out = pcgrad.project_conflicting(grads, orders)
    # row 0: visit 1 (dot -1, |g1|^2 2) -> [.5, .5, 0]; visit 2 (dot -.5, |g2|^2 2) -> [.5, .25, .25]
    # row 1: visit 0 (dot -1, |g0|^2 1) -> [0, 1, 0];    visit 2 (dot -1, |g2|^2 2) -> [0, .5, .5]
    # row 2: visit 0 (dot 0: no conflict);               visit 1 (dot -1, |g1|^2 2) -> [-.5, -.5, 1]
    expected = torch.tensor([[0.5, 0.25, 0.25], [0.0, 0.5, 0.5], [-0.5, -0.5, 1.0]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)
    # Against the already-projected g0 = [.5, .25, .25], row 1 would have become [-2/3, 7/6, 1/6]; and
    # against the already-projected g1 = [0, .5, .5] (dot 0), row 2 would have stayed [0, -1, 1].
    assert not torch.allclose(out[1], torch.tensor([-2 / 3, 7 / 6, 1 / 6]))
    assert not torch.allclose(out[2], grads[2])


def test_visiting_order_is_taken_from_orders():
    grads = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, -1.0, 1.0]])
    out = pcgrad.project_conflicting(grads, torch.tensor([[1, 2], [0, 2], [1, 0]]))
    # row 2 visits 1 first -> [-.5, -.5, 1], which now conflicts with g0 (dot -.5): + .5 g0 -> [0, -.5, 1]
    torch.testing.assert_close(out[2], torch.tensor([0.0, -0.5, 1.0]), rtol=0, atol=1e-7)


def test_a_zero_gradient_projects_nothing():
    grads = torch.tensor([[1.0, -2.0], [0.0, 0.0]])
    out = pcgrad.project_conflicting(grads, torch.tensor([[1], [0]]))
    torch.testing.assert_close(out, grads, rtol=0, atol=0)


def test_one_task_keeps_its_plain_gradient():
    grads = torch.tensor([[0.3, -1.5, 2.0]])
    torch.testing.assert_close(pcgrad.project_conflicting(grads), grads, rtol=0, atol=0)


def test_random_orders_are_seeded_permutations_of_the_other_tasks():
    torch.manual_seed(3)
    orders = pcgrad.random_orders(5)
    assert orders.shape == (5, 4)
    for i, row in enumerate(orders.tolist()):
        assert sorted(row) == [j for j in range(5) if j != i]
    torch.manual_seed(3)
    assert torch.equal(pcgrad.random_orders(5), orders)
    rows_seen = {tuple(pcgrad.random_orders(5)[0].tolist()) for _ in range(300)}
    assert len(rows_seen) == 24  # every order of 4 tasks turns up: the order is fresh each call


def test_conflict_statistics_count_unordered_pairs():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]])  # cosines: -1, 0, 0
    fraction, cosine = pcgrad.conflict_statistics(grads @ grads.T)
    assert float(fraction) == pytest.approx(1 / 3)
    assert float(cosine) == pytest.approx(-1 / 3)


# ---------------------------------------------------------------------------------------------
# method_update on real agents and PPO losses.
# ---------------------------------------------------------------------------------------------

OBS_DIM, ACT_DIM, N = 4, 2, 16


def make_args(module, **overrides):
    args = module.Args()
    defaults = dict(clip_coef=0.2, ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.5, learning_rate=1e-3,
                    hidden_sizes=(16, 16), norm_adv=True, clip_vloss=True)
    for key, value in {**defaults, **overrides}.items():
        setattr(args, key, value)
    return args


def make_agent(module, num_tasks: int, encoding: str, discrete: bool, seed: int = 0):
    torch.manual_seed(seed)
    agent = module.Agent(OBS_DIM, 2 if discrete else ACT_DIM, discrete, num_tasks, (16, 16), encoding)
    if module is pcgrad:  # as pcgrad.make_agent does: the update reads the layers' inputs and outputs
        pcgrad.keep_linear_io(agent)
    return agent


def zero_task_columns(agent) -> None:
    """Zero the first layers' task-input columns, so that identical data gives every task the same output."""
    with torch.no_grad():
        agent.actor[0].weight[:, OBS_DIM:] = 0.0
        agent.critic[0].weight[:, OBS_DIM:] = 0.0


def minibatch(agent, num_tasks: int, discrete: bool, identical: bool, seed: int = 1, advantage_scales=None):
    """A task-stratified minibatch [T, N, ...]; identical=True repeats one task's data for every task."""
    g = torch.Generator().manual_seed(seed)
    rows = 1 if identical else num_tasks
    obs = torch.randn(rows, N, OBS_DIM, generator=g).expand(num_tasks, N, OBS_DIM).contiguous()
    if discrete:
        actions = torch.randint(0, 2, (rows, N), generator=g).expand(num_tasks, N).contiguous()
    else:
        actions = torch.randn(rows, N, ACT_DIM, generator=g).expand(num_tasks, N, ACT_DIM).contiguous()
    advantages = torch.randn(rows, N, generator=g).expand(num_tasks, N).contiguous()
    if advantage_scales is not None:
        advantages = advantages * torch.tensor(advantage_scales)[:, None]
    returns = torch.randn(rows, N, generator=g).expand(num_tasks, N).contiguous()
    task_ids = torch.arange(num_tasks)[:, None].expand(num_tasks, N)
    with torch.no_grad():
        _, logprobs, _, values = agent.get_action_and_value(obs, task_ids, actions)
    return {"obs": obs, "actions": actions, "logprobs": logprobs, "advantages": advantages, "returns": returns,
            "values": values, "task_ids": task_ids}


def one_update(module, agent, mb, args, optimizer=None):
    optimizer = optimizer or module.make_optimizer(args, agent)
    task_losses, _ = module.ppo_task_losses(args, agent, mb)
    return module.method_update(args, agent, optimizer, task_losses, {"epoch": 0, "start": 0, "iteration": 1})


@pytest.mark.parametrize("num_tasks, encoding, discrete", [(1, "onehot", False), (1, "onehot", True),
                                                           (3, "onehot", False), (3, "learned", False),
                                                           (4, "onehot", True)])
def test_update_equals_ppo_mtl_embed_when_no_task_conflicts(num_tasks, encoding, discrete):
    # One task never conflicts with itself. With several tasks: the task columns of the first layers are
    # zeroed and every task gets the same data, so every task's gradient on the shared entries is the
    # same vector (pairwise dot = its squared norm > 0): nothing to project.
    agents = [make_agent(m, num_tasks, encoding, discrete) for m in (pcgrad, mtl)]
    if num_tasks > 1:
        for agent in agents:
            zero_task_columns(agent)
    before = [p.detach().clone() for p in agents[0].parameters()]
    for p, q in zip(agents[0].parameters(), agents[1].parameters(), strict=True):
        assert torch.equal(p, q)
    mb = minibatch(agents[0], num_tasks, discrete, identical=num_tasks > 1)
    stats = one_update(pcgrad, agents[0], mb, make_args(pcgrad, task_encoding=encoding))
    reference = one_update(mtl, agents[1], mb, make_args(mtl, task_encoding=encoding))
    for p, q, p0 in zip(agents[0].parameters(), agents[1].parameters(), before, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        if p is not agents[0].task_embedding:  # the zeroed columns cut the embedding's gradient here
            assert not torch.equal(p, p0)  # the step did move the parameter
    assert float(stats["losses/grad_norm"]) == pytest.approx(float(reference["losses/grad_norm"]), rel=1e-5)
    if num_tasks > 1:
        assert float(stats["pcgrad/actor_conflict_fraction"]) == float(stats["pcgrad/critic_conflict_fraction"]) == 0.0
        # Identical gradients (cosine 1), except that a learned embedding's columns are shared and there
        # each task's gradient lies on its own column (orthogonal parts): cosine a little below 1.
        expected_cosine = 1.0 if encoding == "onehot" else pytest.approx(0.99, abs=0.01)
        assert float(stats["pcgrad/critic_cosine"]) == pytest.approx(expected_cosine, abs=1e-5)
    else:
        assert not any(key.startswith("pcgrad/") for key in stats)


def plain_gradients(agent, mb, args):
    task_losses, _ = pcgrad.ppo_task_losses(args, agent, mb)
    return dict(zip(agent.parameters(), torch.autograd.grad(task_losses.mean(), list(agent.parameters())), strict=True))


def test_opposite_actor_gradients_cancel_but_task_only_entries_keep_their_plain_gradient():
    # Two tasks on the same data, advantages +a and -3a (not normalised), at ratio 1: on the shared actor
    # entries g1 = -3 g0 (cosine -1), so each projects the other away and the shared actor gradient is 0,
    # where the plain mean (g0 + g1) / 2 = -g0 is not. The critic sees the same returns: no conflict,
    # plain gradient. The one-hot columns and the log-std rows are task-only: plain gradient.
    agent = make_agent(pcgrad, 2, "onehot", discrete=False)
    zero_task_columns(agent)
    args = make_args(pcgrad, max_grad_norm=math.inf, task_encoding="onehot", norm_adv=False)
    mb = minibatch(agent, 2, discrete=False, identical=True, advantage_scales=[1.0, -3.0])
    plain = plain_gradients(agent, mb, args)
    stats = one_update(pcgrad, agent, mb, args, optimizer=torch.optim.SGD(agent.parameters(), lr=0.0))

    assert float(stats["pcgrad/actor_conflict_fraction"]) == 1.0
    assert float(stats["pcgrad/actor_cosine"]) == pytest.approx(-1.0, abs=1e-6)
    assert float(stats["pcgrad/critic_conflict_fraction"]) == 0.0
    assert float(stats["pcgrad/critic_cosine"]) == pytest.approx(1.0, abs=1e-6)
    actor_first = agent.actor[0].weight
    torch.testing.assert_close(actor_first.grad[:, :OBS_DIM], torch.zeros(16, OBS_DIM), rtol=0, atol=1e-7)
    for p in list(agent.actor.parameters())[1:]:
        torch.testing.assert_close(p.grad, torch.zeros_like(p), rtol=0, atol=1e-7)
    assert plain[agent.actor[2].weight].abs().max() > 1e-4  # the plain mean is not zero there
    torch.testing.assert_close(actor_first.grad[:, OBS_DIM:], plain[actor_first][:, OBS_DIM:], rtol=1e-5, atol=1e-7)
    assert plain[actor_first][:, OBS_DIM:].abs().max() > 1e-5
    torch.testing.assert_close(agent.actor_logstd.grad, plain[agent.actor_logstd], rtol=1e-5, atol=1e-7)
    for p in agent.critic.parameters():
        torch.testing.assert_close(p.grad, plain[p], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("encoding", ["onehot", "learned"])
def test_task_only_entries_keep_their_plain_gradient_under_conflict(encoding):
    agent = make_agent(pcgrad, 3, encoding, discrete=False, seed=4)
    args = make_args(pcgrad, max_grad_norm=math.inf, task_encoding=encoding)
    mb = minibatch(agent, 3, discrete=False, identical=False, seed=5, advantage_scales=[1.0, -1.0, 1.0])
    plain = plain_gradients(agent, mb, args)
    torch.manual_seed(0)
    stats = one_update(pcgrad, agent, mb, args, optimizer=torch.optim.SGD(agent.parameters(), lr=0.0))
    assert float(stats["pcgrad/actor_conflict_fraction"]) > 0.0  # the surgery had something to do
    task_only = [agent.actor_logstd]
    if encoding == "onehot":
        for net in (agent.actor, agent.critic):
            torch.testing.assert_close(net[0].weight.grad[:, OBS_DIM:], plain[net[0].weight][:, OBS_DIM:],
                                       rtol=1e-5, atol=1e-7)
    else:
        task_only.append(agent.task_embedding)
    for p in task_only:
        torch.testing.assert_close(p.grad, plain[p], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(agent.actor[2].weight.grad, plain[agent.actor[2].weight], atol=1e-6)


def test_shared_entries_split_the_first_layer_at_the_one_hot_columns():
    onehot = make_agent(pcgrad, 3, "onehot", discrete=True)
    learned = make_agent(pcgrad, 3, "learned", discrete=True)
    entries = pcgrad.shared_entries(onehot, onehot.actor)
    assert entries[0][0] is onehot.actor[0].weight and entries[0][1] == slice(0, OBS_DIM)
    actor_size = sum(p.numel() for p in onehot.actor.parameters())
    assert sum(p[..., cols].numel() for p, cols in entries) == actor_size - 16 * 3
    entries = pcgrad.shared_entries(learned, learned.critic)
    assert sum(p[..., cols].numel() for p, cols in entries) == sum(p.numel() for p in learned.critic.parameters())


# ---------------------------------------------------------------------------------------------
# The one-pass update against PCGrad written literally: T backward passes and the paper's loop.
# ---------------------------------------------------------------------------------------------

def reference_pcgrad_gradients(agent, mb, args) -> tuple[dict, dict]:
    """PCGrad's clipped update direction the slow, obvious way, and its diagnostics.

    One torch.autograd.grad per task; per network, each task's shared entries flattened into one vector
    and projected in a Python loop over the other tasks (in the order that random_orders draws: the
    same draws as the update's); the mean of the projected vectors on the shared entries, the plain
    mean everywhere else; then one global-norm clip."""
    task_losses, _ = pcgrad.ppo_task_losses(args, agent, mb)
    params = list(agent.parameters())
    num_tasks = task_losses.shape[0]
    per_task = [dict(zip(params, torch.autograd.grad(task_losses[t], params, retain_graph=True), strict=True))
                for t in range(num_tasks)]
    direction = {p: sum(g[p] for g in per_task) / num_tasks for p in params}
    stats = {}
    for name, net in (("actor", agent.actor), ("critic", agent.critic)):
        entries = pcgrad.shared_entries(agent, net)
        flat = [torch.cat([g[p][..., cols].reshape(-1) for p, cols in entries]) for g in per_task]
        orders = pcgrad.random_orders(num_tasks)
        projected = []
        for i in range(num_tasks):
            g_i = flat[i].clone()
            for j in orders[i].tolist():
                dot = g_i @ flat[j]
                if dot < 0:
                    g_i = g_i - dot / (flat[j] @ flat[j]) * flat[j]
            projected.append(g_i)
        mean = sum(projected) / num_tasks
        offset = 0
        for p, cols in entries:
            size = direction[p][..., cols].numel()
            direction[p][..., cols] = mean[offset:offset + size].view_as(direction[p][..., cols])
            offset += size
        pairs = [(i, j) for i in range(num_tasks) for j in range(i + 1, num_tasks)]
        if pairs:
            stats[f"pcgrad/{name}_conflict_fraction"] = sum(float(flat[i] @ flat[j] < 0) for i, j in pairs) / len(pairs)
            stats[f"pcgrad/{name}_cosine"] = sum(float(torch.nn.functional.cosine_similarity(flat[i], flat[j], dim=0))
                                                 for i, j in pairs) / len(pairs)
    norm = torch.sqrt(sum((g * g).sum() for g in direction.values()))
    scale = min(1.0, args.max_grad_norm / (float(norm) + 1e-6))  # clip_grad_norm_'s rule
    stats["losses/grad_norm"] = float(norm)
    return {p: g * scale for p, g in direction.items()}, stats


@pytest.mark.parametrize("num_tasks, encoding, discrete, dtype, tolerance", [
    (1, "onehot", False, torch.float64, 1e-12),
    (3, "onehot", False, torch.float64, 1e-12),
    (3, "learned", False, torch.float64, 1e-12),
    (4, "onehot", True, torch.float64, 1e-12),
    (5, "learned", True, torch.float64, 1e-12),
    (4, "onehot", False, torch.float32, 1e-5),
])
def test_one_pass_update_equals_the_t_pass_reference(num_tasks, encoding, discrete, dtype, tolerance):
    agent = make_agent(pcgrad, num_tasks, encoding, discrete, seed=7)
    args = make_args(pcgrad, task_encoding=encoding, max_grad_norm=0.05)  # small: the clip is active
    # The same observations and actions for every task, with advantages and returns of alternating sign
    # and different sizes: actor and critic gradients of neighbouring tasks conflict.
    signs = [(-1.0) ** t * (1 + t) for t in range(num_tasks)]
    mb = minibatch(agent, num_tasks, discrete, identical=True, seed=8, advantage_scales=signs)
    mb["returns"] = mb["returns"].abs() * torch.tensor(signs)[:, None]
    agent = agent.to(dtype)
    mb = {key: value.to(dtype) if value.is_floating_point() else value for key, value in mb.items()}
    torch.manual_seed(11)
    expected, expected_stats = reference_pcgrad_gradients(agent, mb, args)
    torch.manual_seed(11)  # the same visiting orders
    stats = one_update(pcgrad, agent, mb, args, optimizer=torch.optim.SGD(agent.parameters(), lr=0.0))

    for name, p in agent.named_parameters():
        torch.testing.assert_close(p.grad, expected[p], rtol=tolerance, atol=tolerance * 1e-2, msg=name)
    assert set(stats) == set(expected_stats)
    for key, value in expected_stats.items():
        assert float(stats[key]) == pytest.approx(value, rel=max(tolerance, 1e-6), abs=1e-6), key
    if num_tasks > 1:  # the surgery had something to do in both networks
        assert expected_stats["pcgrad/actor_conflict_fraction"] > 0
        assert expected_stats["pcgrad/critic_conflict_fraction"] > 0
        plain = plain_gradients(agent, mb, args)
        assert not torch.allclose(agent.actor[2].weight.grad, plain[agent.actor[2].weight] * 0.05
                                  / float(stats["losses/grad_norm"]), rtol=1e-3)


def test_update_refuses_an_agent_without_the_layer_hooks():
    agent = pcgrad.Agent(OBS_DIM, ACT_DIM, False, 2, (16, 16), "onehot")  # built without make_agent
    mb = minibatch(agent, 2, discrete=False, identical=False)
    with pytest.raises(RuntimeError, match="make_agent"):
        one_update(pcgrad, agent, mb, make_args(pcgrad))


def test_layer_inputs_are_kept_only_from_differentiable_passes_and_dropped_by_the_update():
    agent = make_agent(pcgrad, 2, "onehot", discrete=False)
    mb = minibatch(agent, 2, discrete=False, identical=False)  # its forward runs under no_grad
    layers = pcgrad.linear_layers(agent)
    assert len(layers) == 6 and all(layer.last_io is None for layer in layers)
    with torch.inference_mode():  # as at rollout and evaluation
        agent.get_action_and_value(mb["obs"], mb["task_ids"])
    assert all(layer.last_io is None for layer in layers)
    task_losses, _ = pcgrad.ppo_task_losses(make_args(pcgrad), agent, mb)
    assert all(layer.last_io is not None for layer in layers)
    pcgrad.method_update(make_args(pcgrad), agent, pcgrad.make_optimizer(make_args(pcgrad), agent), task_losses, {})
    assert all(layer.last_io is None for layer in layers)


# ---------------------------------------------------------------------------------------------
# Smoke runs.
# ---------------------------------------------------------------------------------------------

SMOKE_RUNS = {  # test name: argv; the two runs go in parallel (a 2-core machine)
    "test_smoke_cartpole_mt": ["--env-id", "cartpole-mt", "--total-timesteps", "2560", "--eval-every", "2560",
                               "--eval-episodes", "1", "--final-eval-episodes", "1"],
    "test_smoke_mt3": ["--env-id", "mt3", "--num-envs-per-task", "1", "--num-steps", "100", "--num-minibatches", "2",
                       "--update-epochs", "1", "--total-timesteps", "300", "--eval-every", "300",
                       "--eval-episodes", "1", "--final-eval-episodes", "1"],
}


@pytest.fixture(scope="module")
def smoke_runs(request, tmp_path_factory):
    wanted = selected_test_names(request)
    dirs = {name: tmp_path_factory.mktemp(name) / "runs" for name in SMOKE_RUNS if name in wanted}
    pool = ScriptRuns({name: dict(script="ppo_pcgrad", argv=[*SMOKE_RUNS[name], "--no-cuda", "--runs-dir", str(d)])
                       for name, d in dirs.items()})
    yield pool, dirs
    pool.close()


def smoke_summary(smoke_runs, name: str) -> dict:
    pool, dirs = smoke_runs
    proc = pool.result(name)
    assert proc.returncode == 0, describe(proc)
    (run_dir,) = list(dirs[name].iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algo"] == "ppo_pcgrad"
    return summary


def test_smoke_cartpole_mt(smoke_runs):
    summary = smoke_summary(smoke_runs, "test_smoke_cartpole_mt")
    assert summary["global_step"] == 2560 and len(summary["task_names"]) == 5


def test_smoke_mt3(smoke_runs):
    summary = smoke_summary(smoke_runs, "test_smoke_mt3")
    assert summary["global_step"] == 300 and len(summary["task_names"]) == 3
