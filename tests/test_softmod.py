"""Soft Modularization (algos/ppo_softmod.py): routing, batched base network, sizes, counts, diagnostics."""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest
import torch

from shared.cli import UsageError
from shared.params import count_parameters
from shared.suites import apply_suite_defaults, make_suite, make_vector_env
from tests.conftest import ScriptRuns, describe, load_script, selected_test_names

softmod = load_script("ppo_softmod")


def task_major_ids(num_tasks: int, n: int) -> torch.Tensor:
    return torch.arange(num_tasks)[:, None].expand(num_tasks, n)  # [T, n], row t is task t


def test_routing_rows_are_probability_vectors_for_every_layer_and_task():
    torch.manual_seed(0)
    T, N, L, n = 3, 16, 4, 3
    agent = softmod.Agent(obs_dim=5, act_dim=2, discrete=True, num_tasks=T, num_layers=L, num_modules=n,
                          module_width=8, embedding_width=12)
    for net in (agent.actor, agent.critic):  # make the routing far from uniform, as after training
        for layer in net.route_down:
            torch.nn.init.normal_(layer.weight, std=3.0)
    routing = agent.routing(torch.randn(T, N, 5) * 3, task_major_ids(T, N))
    for net, probs in routing.items():
        assert probs.shape == (L - 1, T, N, n, n), net
        assert (probs >= 0).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(L - 1, T, N, n), atol=1e-6, rtol=0)
        assert probs.max() > 0.9  # not merely uniform rows: the test would pass trivially on those


def test_batched_base_network_equals_the_papers_formula_module_by_module():
    torch.manual_seed(1)
    T, N, L, n, d, D = 2, 5, 3, 3, 4, 6
    net = softmod.SoftModularNet(obs_dim=4, out_dim=2, num_tasks=T, num_layers=L, num_modules=n,
                                 module_width=d, embedding_width=D, out_std=1.0)
    for layer in net.route_down:
        torch.nn.init.normal_(layer.weight, std=1.0)
    obs, task_ids = torch.randn(T, N, 4), task_major_ids(T, N)
    out, routing = net(obs, task_ids)

    # Reference: one sample at a time, one module at a time, straight from the equations.
    for t in range(T):
        for b in range(N):
            f = net.state_encoder(obs[t, b])
            h = net.task_weight[task_ids[t, b]] + net.task_bias
            p = net.route_down[0](torch.relu(f * h))
            probs = [torch.softmax(p.view(n, n), dim=-1)]
            for depth in range(1, L - 1):
                p = net.route_down[depth](torch.relu(net.route_up[depth - 1](p) * f * h))
                probs.append(torch.softmax(p.view(n, n), dim=-1))
            inputs = [f] * n
            for depth in range(L):
                outputs = [torch.relu(inputs[j] @ net.module_weight[depth][j] + net.module_bias[depth][j])
                           for j in range(n)]
                if depth < L - 1:
                    inputs = [sum(probs[depth][i, j] * outputs[j] for j in range(n)) for i in range(n)]
            expected = sum(outputs[j] @ net.out_weight[j] for j in range(n)) + net.out_bias
            torch.testing.assert_close(out[t, b], expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(routing[:, t, b], torch.stack(probs), atol=1e-6, rtol=1e-6)


def test_get_action_and_value_shapes_discrete():
    T, N = 3, 7
    agent = softmod.Agent(4, 2, True, T, 2, 2, 8, 8)
    action, logprob, entropy, value = agent.get_action_and_value(torch.randn(T, N, 4), task_major_ids(T, N))
    assert action.shape == (T, N) and action.dtype == torch.long
    assert logprob.shape == entropy.shape == value.shape == (T, N)
    assert agent.get_value(torch.randn(T, N, 4), task_major_ids(T, N)).shape == (T, N)
    assert agent.act_deterministic(torch.randn(T, N, 4), task_major_ids(T, N)).shape == (T, N)
    torch.testing.assert_close(entropy, torch.full((T, N), math.log(2)), atol=1e-3, rtol=0)  # near-uniform start


def test_get_action_and_value_shapes_continuous():
    T, N, A = 3, 7, 4
    agent = softmod.Agent(6, A, False, T, 3, 2, 8, 8)
    obs, task_ids = torch.randn(T, N, 6), task_major_ids(T, N)
    action, logprob, entropy, value = agent.get_action_and_value(obs, task_ids)
    assert action.shape == (T, N, A) and action.dtype == torch.float32
    assert logprob.shape == entropy.shape == value.shape == (T, N)
    assert agent.act_deterministic(obs, task_ids).shape == (T, N, A)
    # log-std starts at 0: the Gaussian's entropy is A * (0.5 + log sqrt(2 pi)).
    torch.testing.assert_close(entropy, torch.full((T, N), A * (0.5 + 0.5 * math.log(2 * math.pi))))


def test_output_changes_when_the_task_id_changes_for_the_same_observation():
    torch.manual_seed(0)
    T = 4
    agent = softmod.Agent(6, 3, False, T, 2, 2, 16, 16)
    obs = torch.randn(1, 32, 6)
    heads = [agent.act_deterministic(obs, torch.full((1, 32), t)) for t in range(T)]
    values = [agent.get_value(obs, torch.full((1, 32), t)) for t in range(T)]
    torch.testing.assert_close(agent.act_deterministic(obs, torch.full((1, 32), 0)), heads[0], atol=0, rtol=0)
    for t in range(1, T):
        # The routing starts near uniform (W_d at gain 0.01), so the change is small at init (~0.1 %
        # measured) but three orders of magnitude above float32 noise.
        assert ((heads[t] - heads[0]).abs().mean() / heads[0].abs().mean()) > 1e-4
        assert ((values[t] - values[0]).abs().mean() / values[0].abs().mean()) > 1e-4


def test_routing_separates_tasks_with_inverted_actions_after_training_on_cartpole_conflict():
    """On cartpole-conflict, two tasks need opposite actions in the same state. The task enters only
    through the routing, so fitting both is possible only if their routing differs at the same state."""
    torch.manual_seed(0)
    args = softmod.Args(env_id="cartpole-conflict")
    suite = make_suite(args.env_id)
    apply_suite_defaults(args, suite)
    suite = softmod.select_run_tasks(args, suite)
    T, N = suite.num_tasks, 64
    envs, _ = make_vector_env(suite, 1, seed=0)
    raw, _ = envs.reset(seed=0)
    observations = []
    for _ in range(N):
        observations.append(raw)
        raw, *_ = envs.step(envs.action_space.sample())
    envs.close()
    obs = torch.as_tensor(np.stack(observations), dtype=torch.float32).transpose(0, 1)  # [T, N, 4]
    # Label: push toward the side the pole falls to; the inverted tasks need the other action id.
    inverted = torch.tensor([bool(p.get("invert_actions")) for p in suite.task_params])
    push_right = (obs[..., 2] + 0.5 * obs[..., 3] > 0).long()  # [T, N]
    labels = torch.where(inverted[:, None], 1 - push_right, push_right)
    standard, standard_inverted = suite.task_names.index("standard"), suite.task_names.index("standard-inverted")

    agent = softmod.make_agent(args, suite, 4, 2, True)
    optimizer = softmod.make_optimizer(args, agent)
    task_ids = task_major_ids(T, N)
    pooled = obs.reshape(1, T * N, 4).expand(T, -1, -1)  # every task sees the same states

    def pair_distance() -> float:
        with torch.no_grad():
            routing = agent.routing(pooled, task_major_ids(T, T * N))["actor"]  # [1, T, T*N, 2, 2]
        return float(0.5 * (routing[:, standard] - routing[:, standard_inverted]).abs().sum(-1).mean())

    def mean_task_distance() -> float:
        agent.get_action_and_value(obs, task_ids, labels)  # grad enabled: caches the routing
        logger = types.SimpleNamespace(task_names=suite.task_names)
        return softmod.method_diagnostics(args, agent, logger, 0)["softmod/actor/routing_task_distance"]

    before_pair, before_mean = pair_distance(), mean_task_distance()
    for step in range(150):  # behaviour cloning of the labels through the script's own update
        _, logprob, _, _ = agent.get_action_and_value(obs, task_ids, labels)
        softmod.method_update(args, agent, optimizer, -logprob.mean(dim=1), {"epoch": 0, "start": 0, "iteration": step})
    with torch.no_grad():
        accuracy = (agent.act_deterministic(obs, task_ids) == labels).float().mean(dim=1)  # [T]
    after_pair, after_mean = pair_distance(), mean_task_distance()

    assert accuracy.min() >= 0.9, accuracy  # both action meanings fitted at once
    assert before_pair < 1e-3 and before_mean < 1e-3  # all tasks start from (almost) the same routing
    assert after_pair > 0.1, after_pair  # measured 0.38 to 0.56 over seeds
    assert after_mean > 0.1 and after_mean > 100 * before_mean, (before_mean, after_mean)


def test_parameter_counts_match_a_count_by_hand():
    # obs 3, 2 continuous actions, T = 2 tasks, L = 3 layers, n = 2 modules, d = 4, D = 5. Per network:
    #   state encoder 3*5+5 + 5*5+5 = 50; task encoder T*D + D = 15; W_d: 2 x (5*4+4) = 48;
    #   W_u: 1 x (4*5+5) = 25; modules: 2*(5*4+4) + 2 x 2*(4*4+4) = 128; output maps 2*4*out + out.
    # actor (out 2): 284; critic (out 1): 275; log-std 2*2 = 4; total 563.
    # One task: drop the other task's task-encoder row in each network (5 + 5) and its log-std row (2).
    agent = softmod.Agent(obs_dim=3, act_dim=2, discrete=False, num_tasks=2, num_layers=3, num_modules=2,
                          module_width=4, embedding_width=5)
    assert count_parameters(agent) == {"total": 563, "active": 551, "trained_per_task": 551}
    discrete = softmod.Agent(obs_dim=3, act_dim=2, discrete=True, num_tasks=2, num_layers=3, num_modules=2,
                             module_width=4, embedding_width=5)
    assert count_parameters(discrete) == {"total": 559, "active": 549, "trained_per_task": 549}


def test_the_task_encoder_row_of_another_task_gets_no_gradient():
    agent = softmod.Agent(4, 2, False, 3, 2, 2, 8, 8)
    obs, task_ids, actions = torch.randn(1, 10, 4), torch.zeros(1, 10, dtype=torch.long), torch.randn(1, 10, 2)
    _, logprob, _, value = agent.get_action_and_value(obs, task_ids, actions)
    (logprob.sum() + value.sum()).backward()
    for net in (agent.actor, agent.critic):
        assert net.task_weight.grad[0].abs().sum() > 0
        assert net.task_weight.grad[1:].abs().sum() == 0
    assert agent.actor_logstd.grad[1:].abs().sum() == 0


def resolved(env_id: str, **flags) -> tuple[int, int]:
    args = softmod.Args(env_id=env_id, **flags)
    apply_suite_defaults(args, make_suite(env_id))
    softmod.select_run_tasks(args, make_suite(env_id))
    return args.embedding_width, args.module_width


def test_layers_and_modules_take_the_suite_kinds_default_and_a_given_value_stays():
    def shape(env_id, **flags):
        args = softmod.Args(env_id=env_id, **flags)
        apply_suite_defaults(args, make_suite(env_id))
        softmod.select_run_tasks(args, make_suite(env_id))
        return args.num_layers, args.num_modules

    assert shape("cartpole-mt") == (2, 2)
    assert shape("mt3-tune") == shape("mt10") == (4, 4)
    assert shape("mt10", num_layers=2, num_modules=2) == (2, 2)
    assert shape("cartpole-mt", num_modules=3) == (2, 3)


def test_a_transfer_run_keeps_the_base_runs_layers_and_modules_unless_given(tmp_path):
    """A base run made at 2 x 2 on Meta-World (before 4 x 4 became the default there, or by flag)
    transfers at 2 x 2 without repeating the flags; a given value is kept (and a mismatch is then
    refused when the weights load)."""
    (tmp_path / "args.json").write_text(json.dumps({"algo": "ppo_softmod", "env_id": "mt3-tune",
                                                    "num_layers": 2, "num_modules": 2}))

    def shape(**flags):
        args = softmod.Args(env_id="mt3-tune", init_from=str(tmp_path), tasks=["push-wall-v3"], **flags)
        apply_suite_defaults(args, make_suite("mt3-tune"))
        softmod.select_run_tasks(args, make_suite("mt3-tune"))
        return args.num_layers, args.num_modules

    assert shape() == (2, 2)
    assert shape(num_modules=4) == (2, 4)


def test_sizes_follow_the_paper_on_mt10_and_the_suite_width_elsewhere():
    assert resolved("mt10") == (400, 256)
    assert resolved("mt10", module_width=128) == (400, 128)
    assert resolved("cartpole-mt") == (64, 64)
    assert resolved("mt3") == (256, 256)
    assert resolved("cartpole-mt", hidden_sizes=(32, 96)) == (96, 96)
    assert resolved("cartpole-mt", embedding_width=20, module_width=10) == (20, 10)
    assert resolved("mt10", hidden_sizes=(128, 128)) == (128, 128)  # a width sweep reaches SoftMod too


@pytest.mark.parametrize("flags, words", [
    (dict(num_layers=1), "--num-layers"),
    (dict(num_modules=1), "--num-modules"),
    (dict(module_width=0), "--module-width"),
    (dict(embedding_width=-3), "--embedding-width"),
    (dict(embedding_width=32, module_width=32, hidden_sizes=(128, 128)), "--hidden-sizes has no effect"),
])
def test_bad_size_flags_raise_a_usage_error_before_any_env_is_built(flags, words):
    with pytest.raises(UsageError, match=words):
        softmod.main(softmod.Args(env_id="cartpole-mt", runs_dir="/nonexistent", **flags))


def test_diagnostics_give_routing_entropy_and_task_distance():
    identity = torch.eye(2)  # every target module reads one source: entropy 0
    uniform = torch.full((2, 2), 0.5)  # entropy log 2; total variation to identity: 0.5 per row
    routing = torch.stack([identity.expand(3, 2, 2), uniform.expand(3, 2, 2)])[None]  # [L-1=1, T=2, N=3, 2, 2]
    agent = softmod.Agent(4, 2, True, 2, 2, 2, 8, 8)
    agent.last_routing = {"actor": routing, "critic": routing.flip(1)}
    logger = types.SimpleNamespace(task_names=("a", "b"))
    out = softmod.method_diagnostics(softmod.Args(), agent, logger, 0)
    assert out["softmod/actor/a/routing_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert out["softmod/actor/b/routing_entropy"] == pytest.approx(math.log(2))
    assert out["softmod/critic/a/routing_entropy"] == pytest.approx(math.log(2))
    assert out["softmod/actor/routing_entropy"] == pytest.approx(math.log(2) / 2)
    assert out["softmod/actor/routing_task_distance"] == pytest.approx(0.5)
    assert out["softmod/critic/routing_task_distance"] == pytest.approx(0.5)


def test_only_update_minibatches_refresh_the_cached_routing():
    agent = softmod.Agent(4, 2, True, 2, 2, 2, 8, 8)
    with torch.inference_mode():
        agent.get_action_and_value(torch.randn(2, 5, 4), task_major_ids(2, 5))
    assert agent.last_routing == {}
    agent.get_action_and_value(torch.randn(2, 5, 4), task_major_ids(2, 5), torch.zeros(2, 5, dtype=torch.long))
    assert agent.last_routing["actor"].shape == (1, 2, 5, 2, 2) and not agent.last_routing["actor"].requires_grad


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
    pool = ScriptRuns({name: dict(script="ppo_softmod", argv=[*SMOKE_RUNS[name], "--no-cuda", "--runs-dir", str(d)])
                       for name, d in dirs.items()})
    yield pool, dirs
    pool.close()


def smoke_run_dir(smoke_runs, name: str):
    pool, dirs = smoke_runs
    proc = pool.result(name)
    assert proc.returncode == 0, describe(proc)
    (run_dir,) = list(dirs[name].iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algo"] == "ppo_softmod"
    return run_dir, summary


def test_smoke_cartpole_mt(smoke_runs):
    run_dir, summary = smoke_run_dir(smoke_runs, "test_smoke_cartpole_mt")
    assert summary["global_step"] == 2560 and len(summary["task_names"]) == 5
    args = json.loads((run_dir / "args.json").read_text())
    assert (args["embedding_width"], args["module_width"]) == (64, 64)  # derived sizes are recorded
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(run_dir)).Reload().Tags()["scalars"]
    assert {"softmod/actor/routing_entropy", "softmod/critic/routing_task_distance",
            "softmod/actor/long-pole/routing_entropy"} <= set(tags)


def test_smoke_mt3(smoke_runs):
    _, summary = smoke_run_dir(smoke_runs, "test_smoke_mt3")
    assert summary["global_step"] == 300 and len(summary["task_names"]) == 3
