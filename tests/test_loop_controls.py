"""Loop controls, through main() on a two-task CartPole suite with tiny budgets: the learning-rate
schedule, --target-kl stopping the epochs, a non-finite parameter stopping the run with exit code 3
and the last good checkpoint kept, and the oracle's --task budget of total / T."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from shared.cli import UsageError
from tests.conftest import load_script

TASKS = ["standard", "long-pole"]
T, K, S = 2, 2, 16
BATCH = T * K * S  # env steps per iteration


def cartpole_args(module, tmp_path, **overrides):
    values = dict(env_id="cartpole-mt", tasks=TASKS, total_timesteps=4 * BATCH, num_envs_per_task=K, num_steps=S,
                  num_minibatches=2, update_epochs=3, hidden_sizes=(8,), learning_rate=0.01,
                  eval_every=10 * BATCH, eval_episodes=1, final_eval_episodes=1, runs_dir=str(tmp_path), cuda=False)
    values.update(overrides)
    return module.Args(**values)


def record_updates(module, monkeypatch, after=None):
    """Record (iteration, learning rate of every parameter group) at each minibatch update."""
    updates = []
    real_update = module.method_update

    def method_update(args, agent, optimizer, task_losses, info):
        updates.append((info["iteration"], [group["lr"] for group in optimizer.param_groups]))
        stats = real_update(args, agent, optimizer, task_losses, info)
        if after is not None:
            after(agent, info)
        return stats

    monkeypatch.setattr(module, "method_update", method_update)
    return updates


@pytest.mark.parametrize("anneal", [True, False])
def test_learning_rate_follows_the_linear_schedule(anneal, tmp_path, monkeypatch):
    module = load_script("ppo_mtl_embed")
    updates = record_updates(module, monkeypatch)
    module.main(cartpole_args(module, tmp_path, anneal_lr=anneal))
    # iteration i of N runs at lr * (1 - (i - 1) / N): 0.01, 0.0075, 0.005, 0.0025
    schedule = {1: 0.01, 2: 0.0075, 3: 0.005, 4: 0.0025} if anneal else {i: 0.01 for i in range(1, 5)}
    assert [i for i, _ in updates] == [i for i in range(1, 5) for _ in range(3 * 2)]  # 3 epochs x 2 minibatches
    for iteration, rates in updates:
        assert rates == [pytest.approx(schedule[iteration], rel=1e-12)] * len(rates), iteration


def test_target_kl_stops_the_epochs_of_that_update_only(tmp_path, monkeypatch):
    """approx_kl is scripted: above the target at the 3rd minibatch of iteration 1 (the first of
    epoch 2), below it everywhere else. Iteration 1 stops right after that update (3 of 6);
    iteration 2 runs all 3 epochs x 2 minibatches."""
    module = load_script("ppo_mtl_embed")
    updates = record_updates(module, monkeypatch)
    real_losses = module.ppo_task_losses
    calls = []

    def ppo_task_losses(args, agent, mb):
        task_losses, stats = real_losses(args, agent, mb)
        calls.append(None)
        stats["losses/approx_kl"] = torch.tensor(0.5 if len(calls) == 3 else 0.001)
        return task_losses, stats

    monkeypatch.setattr(module, "ppo_task_losses", ppo_task_losses)
    module.main(cartpole_args(module, tmp_path, total_timesteps=2 * BATCH, target_kl=0.01))
    assert [i for i, _ in updates] == [1, 1, 1] + [2] * 6

    updates.clear()
    calls.clear()
    module.main(cartpole_args(module, tmp_path / "off", total_timesteps=2 * BATCH, target_kl=None))
    assert [i for i, _ in updates] == [1] * 6 + [2] * 6  # without a target the scripted KL changes nothing


def test_non_finite_parameter_exits_3_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """One entry of the last parameter turns NaN in iteration 3's last update. Checkpoints are
    written after every iteration; the one from iteration 2 must survive untouched."""
    module = load_script("ppo_mtl_embed")
    good = {}

    def poison(agent, info):
        if info["iteration"] == 2:
            good.update({name: p.detach().clone() for name, p in agent.named_parameters()})
        if info["iteration"] == 3 and info["epoch"] == 2 and info["start"] > 0:
            name, param = list(agent.named_parameters())[-1]
            good["poisoned"] = name
            with torch.no_grad():
                param.view(-1)[0] = float("nan")

    record_updates(module, monkeypatch, after=poison)
    runs_dir = tmp_path / "runs"
    argv = ["ppo_mtl_embed.py", "--env-id", "cartpole-mt", "--tasks", *TASKS, "--total-timesteps", str(4 * BATCH),
            "--num-envs-per-task", str(K), "--num-steps", str(S), "--num-minibatches", "2", "--update-epochs", "3",
            "--hidden-sizes", "8", "--eval-every", str(BATCH), "--eval-episodes", "1", "--final-eval-episodes", "1",
            "--runs-dir", str(runs_dir), "--no-cuda"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        module.run_cli(module.main, module.Args)
    assert exit_info.value.code == 3

    (run_dir,) = runs_dir.iterdir()
    assert sorted(p.name for p in run_dir.glob("checkpoint*")) == ["checkpoint.pt"]
    checkpoint = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2 * BATCH
    assert set(checkpoint["agent"]) >= set(good) - {"poisoned"}
    for name, value in checkpoint["agent"].items():
        assert torch.equal(value, good[name]), name  # iteration 2's parameters, all finite
    err = capsys.readouterr().err.strip()
    assert err == (f"error: training diverged: parameter '{good['poisoned']}' is not finite after the update of "
                   f"iteration 3 (step {3 * BATCH}); the last good checkpoint is {run_dir / 'checkpoint.pt'}")
    lines = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    # no evaluation of the diverged agent (each evaluation: the deterministic pass, then the sampled one)
    assert [(line["global_step"], line["label"]) for line in lines] == [
        (BATCH, ""), (BATCH, "sampled"), (2 * BATCH, ""), (2 * BATCH, "sampled")]
    assert not (run_dir / "summary.json").exists()


def test_oracle_task_flag_trains_one_task_on_total_over_t(tmp_path, monkeypatch):
    module = load_script("ppo_single")
    built = []
    real_make_vector_env = module.make_vector_env

    def make_vector_env(suite, k, seed, async_envs=False, evaluation=False):
        built.append((suite.task_names, suite.task_params, k, evaluation))
        return real_make_vector_env(suite, k, seed, async_envs, evaluation=evaluation)

    monkeypatch.setattr(module, "make_vector_env", make_vector_env)
    updates = record_updates(module, monkeypatch)
    # cartpole-mt has 5 tasks: 5 x 96 steps gives heavy-cart 96 steps = 3 iterations of 2 envs x 16 steps
    args = module.Args(env_id="cartpole-mt", task="heavy-cart", total_timesteps=5 * 96 + 4, num_envs_per_task=2,
                       num_steps=16, num_minibatches=2, update_epochs=1, hidden_sizes=(8,), eval_every=64,
                       eval_episodes=1, final_eval_episodes=1, runs_dir=str(tmp_path), cuda=False)
    summary = module.main(args)
    assert summary["global_step"] == 96 and summary["task_names"] == ["heavy-cart"]
    assert sorted({i for i, _ in updates}) == [1, 2, 3]
    heavy_cart = ({"base": "CartPole-v1", "masscart": 3.0, "force_mag": 15.0},)
    assert built[0] == (("heavy-cart",), heavy_cart, 2, False)
    assert all(names == ("heavy-cart",) and params == heavy_cart for names, params, _, _ in built)
    (run_dir,) = tmp_path.iterdir()
    recorded = json.loads((run_dir / "args.json").read_text())
    assert recorded["total_timesteps"] == 96 and recorded["task"] == "heavy-cart"
    lines = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [(line["global_step"], line["final"]) for line in lines if not line["label"]] == [
        (64, False), (96, False), (96, True)]


@pytest.mark.parametrize("name", ["ppo_single", "ppo_mtl_embed", "ppo_varshare", "ppo_paco", "ppo_softmod",
                                  "ppo_pcgrad"])
def test_init_logstd_sets_the_policy_spread_before_the_first_update(name, tmp_path, monkeypatch):
    module = load_script(name)
    seen = []

    def method_update(args, agent, optimizer, task_losses, info):
        seen.append(agent.actor_logstd.detach().clone())
        raise KeyboardInterrupt  # the first update is all this test needs

    monkeypatch.setattr(module, "method_update", method_update)
    args = cartpole_args(module, tmp_path, env_id="Pendulum-v1", tasks=None, init_logstd=-1.0)
    with pytest.raises(KeyboardInterrupt):
        module.main(args)
    assert seen and torch.equal(seen[0], torch.full_like(seen[0], -1.0))


def test_init_logstd_is_refused_for_discrete_actions(tmp_path):
    module = load_script("ppo_mtl_embed")
    with pytest.raises(UsageError, match="--init-logstd sets a Gaussian policy's initial spread"):
        module.main(cartpole_args(module, tmp_path, init_logstd=-1.0))
