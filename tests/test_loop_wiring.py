"""The training loop's data path, run through main() with the real ObsNormalizer and RewardScaler.

A "drift" suite of two continuous-action tasks is injected: a noisy point whose episodes end by a
time limit (6 and 9 steps) or for real when it leaves [-2, 2], with rewards on scales 1 and 25.
The training vector env is wrapped so that every raw observation, reward and end flag it returns
is recorded; a slow reference then replays them:

- observation statistics: the pooled mean and variance of every raw rollout observation so far
  (plus the RunningMeanStd prior: weight 1e-4, mean 0, variance 1), per task for the oracle;
- reward scaling: each env's discounted return, restarted after every episode end, and each
  task's pooled variance of those returns;
- the truncation bootstrap: gamma * V(final observation, normalised with the current stats) is
  added to the scaled reward.

The value function is replaced by V(obs) = 10 * obs[0] + 7 so that bootstrapped values are
known numbers. Evaluation runs after every iteration, so evaluation observations would show up in
the statistics if evaluation updated them; the evaluation policy must see its observations
normalised with the rollout statistics of that moment.

A second run records every minibatch the update sees and checks that each transition is used
exactly once per epoch, in a fresh shuffle, with all its fields from the same rollout step and env.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import shared.suites as suites
from tests.conftest import load_script

GAMMA = 0.9
PRIOR = 1e-4  # RunningMeanStd's initial count, at mean 0 and variance 1
T, K, S = 2, 2, 12


class DriftTask(gym.Env):
    """A point pushed by a 1-D action with noise. Observation [position, velocity, steps / 10];
    reward reward_scale * (1 - |position|); terminated when |position| > 2, truncated after
    ``limit`` steps."""

    def __init__(self, reward_scale: float, limit: int):
        self.reward_scale, self.limit = reward_scale, limit
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def _obs(self):
        return np.array([self.pos, self.vel, self.t / 10], np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.pos, self.vel = 0, float(self.np_random.uniform(-0.5, 0.5)), 0.0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        self.vel = 0.7 * self.vel + 0.5 * float(action[0]) + float(self.np_random.normal(0.0, 0.3))
        self.pos += self.vel
        reward = self.reward_scale * (1.0 - abs(self.pos))
        return self._obs(), reward, abs(self.pos) > 2.0, self.t >= self.limit, {}


if "DriftTask-v0" not in gym.registry:
    gym.register("DriftTask-v0", entry_point=DriftTask)


def drift_suite():
    return suites.Suite("drift-mt", ("quiet", "loud"), "gym",
                        (dict(base="DriftTask-v0", reward_scale=1.0, limit=6),
                         dict(base="DriftTask-v0", reward_scale=25.0, limit=9)), 1e9, "cartpole-mt")


class RecordingEnvs:
    """A vector env, recording what it hands to the loop."""

    def __init__(self, envs):
        self.envs = envs
        self.observations: list[np.ndarray] = []  # [T*k, d] per reset or step, in order
        self.episodes: list[list[np.ndarray]] = []  # the same, cut at each reset
        self.steps: list[dict] = []

    def __getattr__(self, name):
        return getattr(self.envs, name)

    def reset(self, **kwargs):
        obs, info = self.envs.reset(**kwargs)
        self.observations.append(obs.astype(np.float64))
        self.episodes.append([self.observations[-1]])
        return obs, info

    def step(self, actions):
        obs, reward, terminated, truncated, info = self.envs.step(actions)
        ended = terminated | truncated
        final_obs = np.array([info["final_obs"][i] if ended[i] else obs[i] for i in range(len(obs))], np.float64)
        self.observations.append(obs.astype(np.float64))
        self.episodes[-1].append(self.observations[-1])
        self.steps.append(dict(reward=reward.astype(np.float64), terminated=terminated.copy(),
                               truncated=truncated.copy(), final_obs=final_obs))
        return obs, reward, terminated, truncated, info


def fake_value(obs: torch.Tensor) -> torch.Tensor:
    return 10.0 * obs[..., 0] + 7.0


def install_probes(module, monkeypatch, fake_values: bool):
    """Inject the drift suite and record the training and evaluation envs, the rollout's network
    calls, the evaluation policy's inputs, GAE's inputs and outputs, every minibatch, and the
    normalisers the loop builds."""
    monkeypatch.setitem(suites.MULTITASK_SUITES, "drift-mt", drift_suite)
    seen = dict(train_envs=[], eval_envs=[], rollout=[], evaluation=[], sampled_evaluation=[], gae=[], minibatches=[],
                obs_normalizers=[], reward_scalers=[])

    real_make_vector_env = module.make_vector_env

    def make_vector_env(suite, k, seed, async_envs=False, evaluation=False):
        envs, column_tasks = real_make_vector_env(suite, k, seed, async_envs, evaluation=evaluation)
        envs = RecordingEnvs(envs)
        seen["eval_envs" if evaluation else "train_envs"].append(envs)
        return envs, column_tasks

    monkeypatch.setattr(module, "make_vector_env", make_vector_env)

    class ObsNormalizer(module.ObsNormalizer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen["obs_normalizers"].append(self)

    class RewardScaler(module.RewardScaler):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen["reward_scalers"].append(self)

    monkeypatch.setattr(module, "ObsNormalizer", ObsNormalizer)
    monkeypatch.setattr(module, "RewardScaler", RewardScaler)

    real_get_value, real_action_and_value = module.Agent.get_value, module.Agent.get_action_and_value
    real_act_deterministic = module.Agent.act_deterministic

    def act_deterministic(self, obs, task_ids):
        seen["evaluation"].append(obs.clone())
        return real_act_deterministic(self, obs, task_ids)

    monkeypatch.setattr(module.Agent, "act_deterministic", act_deterministic)

    def get_value(self, obs, task_ids):
        value = real_get_value(self, obs, task_ids)
        return fake_value(obs) + 0.0 * value if fake_values else value

    def get_action_and_value(self, obs, task_ids, action=None):
        action, logprob, entropy, value = real_action_and_value(self, obs, task_ids, action)
        if fake_values:
            value = fake_value(obs) + 0.0 * value  # keeps the critic in the graph (zero gradient)
        if torch.is_inference_mode_enabled():  # a rollout step (train mode) or the sampled evaluation pass
            seen["rollout" if self.training else "sampled_evaluation"].append(
                dict(obs=obs.clone(), action=action.clone(), logprob=logprob.clone(), value=value.clone()))
        return action, logprob, entropy, value

    monkeypatch.setattr(module.Agent, "get_value", get_value)
    monkeypatch.setattr(module.Agent, "get_action_and_value", get_action_and_value)

    real_gae = module.compute_gae

    def compute_gae(rewards, values, ended, next_value, gamma, gae_lambda):
        advantages = real_gae(rewards, values, ended, next_value, gamma, gae_lambda)
        seen["gae"].append(dict(rewards=rewards.clone(), values=values.clone(), ended=ended.clone(),
                                next_value=next_value.clone(), advantages=advantages.clone()))
        return advantages

    monkeypatch.setattr(module, "compute_gae", compute_gae)

    real_losses = module.ppo_task_losses

    def ppo_task_losses(args, agent, mb):
        seen["minibatches"].append({key: value.detach().clone() for key, value in mb.items()})
        return real_losses(args, agent, mb)

    monkeypatch.setattr(module, "ppo_task_losses", ppo_task_losses)
    return seen


def drift_args(module, tmp_path, **overrides):
    values = dict(env_id="drift-mt", total_timesteps=3 * T * K * S, num_envs_per_task=K, num_steps=S,
                  num_minibatches=2, update_epochs=2, gamma=GAMMA, gae_lambda=0.8, hidden_sizes=(8,),
                  eval_every=T * K * S, eval_episodes=2, final_eval_episodes=2, runs_dir=str(tmp_path), cuda=False,
                  # the replay below follows the deterministic evaluation's episodes; the sampled pass
                  # (tests/test_determinism.py) would interleave its own on the same envs
                  eval_sampled=False)
    values.update(overrides)
    return module.Args(**values)


def pooled_moments(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of all rows together with the prior pseudo-sample (weight 1e-4, mean 0,
    variance 1): what a running mean/variance over the same data must hold."""
    n = rows.shape[0] + PRIOR
    mean = rows.sum(axis=0) / n
    var = (((rows - mean) ** 2).sum(axis=0) + PRIOR * (1.0 + mean**2)) / n
    return mean, var


def normalise(obs: np.ndarray, history: list[np.ndarray], per_task: bool) -> np.ndarray:
    """obs [T*k', d] normalised with the statistics of every rollout row in ``history`` (each [T*k, d])."""
    rows = np.stack(history)  # [N, T*k, d]
    out = np.empty_like(obs)
    k = obs.shape[0] // T  # 1 in evaluation
    groups = [(slice(t * K, (t + 1) * K), slice(t * k, (t + 1) * k)) for t in range(T)] if per_task else \
        [(slice(None), slice(None))]
    for history_cols, cols in groups:
        mean, var = pooled_moments(rows[:, history_cols].reshape(-1, obs.shape[-1]))
        out[cols] = (obs[cols] - mean) / np.sqrt(var + 1e-8)
    return np.clip(out, -10.0, 10.0)


def reference_rollout(recorder: RecordingEnvs, per_task_obs: bool):
    """Replay the recorded env data: normalised observations the agent must see, and the rewards
    GAE must receive, for every step of every iteration."""
    history = [recorder.observations[0]]
    seen_obs = [normalise(recorder.observations[0], history, per_task_obs)]
    discounted = np.zeros(T * K)
    task_returns: list[list[float]] = [[] for _ in range(T)]
    rewards = []
    for step, data in enumerate(recorder.steps):
        history.append(recorder.observations[step + 1])
        seen_obs.append(normalise(recorder.observations[step + 1], history, per_task_obs))
        discounted = GAMMA * discounted + data["reward"]
        scaled = np.empty(T * K)
        for t in range(T):
            task_returns[t].extend(discounted[t * K:(t + 1) * K])
            _, var = pooled_moments(np.array(task_returns[t])[:, None])
            scaled[t * K:(t + 1) * K] = data["reward"][t * K:(t + 1) * K] / np.sqrt(var[0] + 1e-8)
        scaled = np.clip(scaled, -10.0, 10.0)
        bootstrap = data["truncated"] & ~data["terminated"]
        final_value = 10.0 * normalise(data["final_obs"], history, per_task_obs)[:, 0] + 7.0
        scaled[bootstrap] += GAMMA * final_value[bootstrap]
        rewards.append(scaled)
        discounted[data["terminated"] | data["truncated"]] = 0.0
    return np.stack(seen_obs), np.stack(rewards), np.stack(history)


@pytest.mark.parametrize("script", ["ppo_mtl_embed", "ppo_single"])
def test_normalisers_in_the_loop_match_a_replay_of_the_raw_env_data(script, tmp_path, monkeypatch):
    module = load_script(script)
    per_task_obs = {"ppo_single": True}.get(script, False)  # the oracle's agents share nothing
    assert module.OBS_NORM_PER_TASK == per_task_obs
    seen = install_probes(module, monkeypatch, fake_values=True)
    iterations = 3
    summary = module.main(drift_args(module, tmp_path))
    assert summary["global_step"] == iterations * T * K * S

    (recorder,) = seen["train_envs"]
    assert len(recorder.steps) == iterations * S
    truncations = sum((d["truncated"] & ~d["terminated"]).sum() for d in recorder.steps)
    terminations = sum(d["terminated"].sum() for d in recorder.steps)
    assert truncations >= 4 and terminations >= 4, (truncations, terminations)  # both kinds of ending occur
    expected_obs, expected_rewards, rollout_rows = reference_rollout(recorder, per_task_obs)

    # What the agent saw at each rollout step: raw observations normalised with statistics that
    # include them (the update comes first).
    assert len(seen["rollout"]) == iterations * S
    agent_obs = np.stack([call["obs"].reshape(T * K, -1).numpy() for call in seen["rollout"]])
    np.testing.assert_allclose(agent_obs, expected_obs[:-1], rtol=1e-5, atol=1e-5)

    # What GAE received: per-task scaled rewards plus the bootstrap from the normalised final
    # observation; next_value is V of the normalised observation after the last step.
    assert len(seen["gae"]) == iterations
    for i, gae in enumerate(seen["gae"]):
        np.testing.assert_allclose(gae["rewards"].reshape(S, T * K).numpy(), expected_rewards[i * S:(i + 1) * S],
                                   rtol=1e-5, atol=1e-4)
        next_value = 10.0 * expected_obs[(i + 1) * S][:, 0] + 7.0
        np.testing.assert_allclose(gae["next_value"].reshape(T * K).numpy(), next_value, rtol=1e-5, atol=1e-4)
    # The two tasks differ by a factor 25 in reward, yet their scaled rewards are of one size.
    scaled_only = np.abs(np.stack([g["rewards"] for g in seen["gae"]]))
    assert 0.2 < scaled_only[..., 1, :].mean() / scaled_only[..., 0, :].mean() < 5.0

    # Evaluation after iteration i sees its observations normalised with the statistics of the
    # rollouts so far: the periodic env evaluates after iterations 1, 2, 3, a fresh env at the end.
    periodic, final = seen["eval_envs"]
    evaluations = [(episodes, i + 1) for i, episodes in enumerate(periodic.episodes)] + [(final.episodes[0], 3)]
    assert len(evaluations) == 4
    expected_eval = [normalise(raw, list(rollout_rows[:1 + after * S]), per_task_obs)
                     for episodes, after in evaluations for raw in episodes[:-1]]  # the last obs is not acted on
    assert len(seen["evaluation"]) == len(expected_eval)
    for got, expected in zip(seen["evaluation"], expected_eval, strict=True):
        np.testing.assert_allclose(got.reshape(T, -1).numpy(), expected, rtol=1e-5, atol=1e-5)

    # After the run (three evaluations and a final one), the observation statistics still hold
    # the rollout observations alone, and so does the checkpoint.
    (obs_normalizer,) = seen["obs_normalizers"]
    expected_count = PRIOR + (rollout_rows.shape[0] * (K if per_task_obs else T * K))
    assert obs_normalizer.rms.count == pytest.approx(expected_count, abs=1e-9)
    groups = [rollout_rows[:, t * K:(t + 1) * K].reshape(-1, 3) for t in range(T)] if per_task_obs else \
        [rollout_rows.reshape(-1, 3)]
    expected_moments = [pooled_moments(rows) for rows in groups]
    mean = np.stack([m for m, _ in expected_moments]).reshape(obs_normalizer.rms.mean.shape)
    var = np.stack([v for _, v in expected_moments]).reshape(obs_normalizer.rms.var.shape)
    # (float32 observations: each batch's own mean and variance carry float32 rounding)
    np.testing.assert_allclose(obs_normalizer.rms.mean, mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(obs_normalizer.rms.var, var, rtol=1e-6, atol=1e-7)
    (run_dir,) = tmp_path.iterdir()
    checkpoint = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    np.testing.assert_array_equal(checkpoint["obs_normalizer"]["rms"]["mean"], obs_normalizer.rms.mean)
    assert checkpoint["obs_normalizer"]["rms"]["count"] == obs_normalizer.rms.count
    (reward_scaler,) = seen["reward_scalers"]
    assert reward_scaler.rms.count == pytest.approx(PRIOR + iterations * S * K, abs=1e-9)  # k returns per step
    np.testing.assert_array_equal(checkpoint["reward_scaler"]["rms"]["var"], reward_scaler.rms.var)
    np.testing.assert_array_equal(checkpoint["reward_scaler"]["returns"], reward_scaler.returns)


def test_the_final_sampled_pass_runs_on_fresh_envs_with_the_rollout_statistics(tmp_path, monkeypatch):
    """--eval-sampled: the final evaluation's sampled pass gets envs of its own (on Meta-World a
    fresh env is what makes its 50 episodes visit each goal once, as the deterministic pass's do)
    and acts on their observations normalised with the statistics of the rollouts."""
    module = load_script("ppo_mtl_embed")
    seen = install_probes(module, monkeypatch, fake_values=False)
    module.main(drift_args(module, tmp_path, eval_sampled=True))
    periodic, final, final_sampled = seen["eval_envs"]
    assert len(periodic.episodes) == 2 * 3  # three periodic evaluations, each a deterministic and a sampled pass
    assert len(final.episodes) == 1 and len(final_sampled.episodes) == 1
    acted_on = final_sampled.observations[:-1]  # the last observation is not acted on
    assert len(acted_on) >= 2
    (train_envs,) = seen["train_envs"]
    rollout_rows = train_envs.observations
    expected = [normalise(raw, rollout_rows, per_task=False) for raw in acted_on]
    got = seen["sampled_evaluation"][-len(acted_on):]
    for call, want in zip(got, expected, strict=True):
        np.testing.assert_allclose(call["obs"].reshape(T, -1).numpy(), want, rtol=1e-5, atol=1e-5)


def test_minibatches_use_every_transition_once_per_epoch_with_aligned_fields(tmp_path, monkeypatch):
    module = load_script("ppo_mtl_embed")
    seen = install_probes(module, monkeypatch, fake_values=False)
    iterations, epochs, num_minibatches = 2, 3, 4
    n = K * S // num_minibatches
    module.main(drift_args(module, tmp_path, total_timesteps=iterations * T * K * S, update_epochs=epochs,
                           num_minibatches=num_minibatches))
    assert len(seen["minibatches"]) == iterations * epochs * num_minibatches
    assert len(seen["gae"]) == iterations

    orders = []  # (step, env) sequence of each task in each epoch
    for it in range(iterations):
        rollout = seen["rollout"][it * S:(it + 1) * S]
        obs = torch.stack([c["obs"] for c in rollout])  # [S, T, k, d]
        actions = torch.stack([c["action"] for c in rollout])
        logprobs = torch.stack([c["logprob"] for c in rollout])
        values = torch.stack([c["value"] for c in rollout])
        gae = seen["gae"][it]
        torch.testing.assert_close(gae["values"], values, rtol=0, atol=0)  # GAE got the rollout values
        advantages = gae["advantages"]
        returns = advantages + values
        # every stored observation row is distinct, so a row identifies its (step, env)
        where = {}
        for s in range(S):
            for t in range(T):
                for i in range(K):
                    where[(t, tuple(obs[s, t, i].tolist()))] = (s, i)
        assert len(where) == T * S * K

        for epoch in range(epochs):
            first = (it * epochs + epoch) * num_minibatches
            used = {t: [] for t in range(T)}
            for mb in seen["minibatches"][first:first + num_minibatches]:
                assert mb["obs"].shape == (T, n, 3) and mb["actions"].shape == (T, n, 1)
                for key in ("logprobs", "advantages", "returns", "values", "task_ids"):
                    assert mb[key].shape == (T, n), key
                assert torch.equal(mb["task_ids"], torch.arange(T)[:, None].expand(T, n))
                for t in range(T):
                    for j in range(n):
                        s, i = where[(t, tuple(mb["obs"][t, j].tolist()))]  # a row of task t's own data
                        used[t].append((s, i))
                        assert torch.equal(mb["actions"][t, j], actions[s, t, i])
                        assert mb["logprobs"][t, j] == logprobs[s, t, i]
                        assert mb["values"][t, j] == values[s, t, i]
                        assert mb["advantages"][t, j] == advantages[s, t, i]
                        assert mb["returns"][t, j] == returns[s, t, i]
            for t in range(T):
                assert sorted(used[t]) == sorted((s, i) for s in range(S) for i in range(K)), (it, epoch, t)
                orders.append(used[t])
    # a fresh shuffle for every task and epoch: no two orders alike, none the rollout's own
    assert len({tuple(order) for order in orders}) == len(orders) == iterations * epochs * T
    assert all(order != sorted(order) for order in orders)
