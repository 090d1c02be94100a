"""Observation normaliser, reward scaler and their running statistics."""

from __future__ import annotations

import numpy as np
import pytest

from shared.normalize import ObsNormalizer, RewardScaler, RunningMeanStd


def test_running_mean_std_matches_numpy_over_all_batches():
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc, scale, (n, 3)) for loc, scale, n in [(5.0, 2.0, 7), (-3.0, 0.5, 40), (1.0, 10.0, 1),
                                                                    (0.0, 1.0, 200)]]
    rms = RunningMeanStd((3,))
    for batch in batches:
        rms.update(batch)
    everything = np.concatenate(batches)
    np.testing.assert_allclose(rms.mean, everything.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rms.var, everything.var(axis=0), rtol=1e-5, atol=1e-5)
    assert rms.count == pytest.approx(len(everything), abs=1e-3)


@pytest.mark.parametrize("per_task", [False, True])
def test_obs_normalizer_state_dict_round_trip(per_task):
    rng = np.random.default_rng(1)
    T, k, d = 3, 4, 5
    original = ObsNormalizer(T, d, per_task=per_task, clip=5.0)
    for _ in range(6):
        original.update(rng.normal(3.0, 2.0, (T, k, d)))
    restored = ObsNormalizer(T, d, per_task=per_task)
    restored.load_state_dict(original.state_dict())
    probe = rng.normal(3.0, 4.0, (T, k, d))
    np.testing.assert_array_equal(restored.normalize(probe), original.normalize(probe))
    assert restored.clip == 5.0
    # both go on identically
    more = rng.normal(-1.0, 1.0, (T, k, d))
    original.update(more)
    restored.update(more)
    np.testing.assert_array_equal(restored.normalize(probe), original.normalize(probe))
    # the saved state is a copy: updating the original afterwards does not change it
    state = original.state_dict()
    mean_before = state["rms"]["mean"].copy()
    original.update(more + 100.0)
    np.testing.assert_array_equal(state["rms"]["mean"], mean_before)


def test_obs_normalizer_refuses_a_checkpoint_with_other_per_task_setting():
    with pytest.raises(ValueError):
        ObsNormalizer(2, 3, per_task=True).load_state_dict(ObsNormalizer(2, 3, per_task=False).state_dict())


def test_obs_normalizer_normalize_never_updates_and_clips():
    norm = ObsNormalizer(1, 2, per_task=False, clip=3.0)
    norm.update(np.array([[[0.0, 0.0], [2.0, 2.0]]]))  # mean ~1, var ~1
    before = norm.state_dict()
    out = norm.normalize(np.array([[[1.0, 100.0]]]))
    np.testing.assert_allclose(out, [[[0.0, 3.0]]], atol=1e-3)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(norm.state_dict()["rms"]["mean"], before["rms"]["mean"])


def test_per_task_obs_normalizer_keeps_separate_stats_per_task():
    rng = np.random.default_rng(2)
    T, k, d = 2, 8, 3
    norm = ObsNormalizer(T, d, per_task=True)
    shared = ObsNormalizer(T, d, per_task=False)
    seen = []
    for _ in range(50):
        obs = np.stack([rng.normal(0.0, 1.0, (k, d)), rng.normal(100.0, 10.0, (k, d))])  # [T, k, d]
        norm.update(obs)
        shared.update(obs)
        seen.append(obs)
    seen = np.stack(seen)  # [50, T, k, d]
    for t in range(T):
        np.testing.assert_allclose(norm.rms.mean[t], seen[:, t].reshape(-1, d).mean(axis=0), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(norm.rms.var[t], seen[:, t].reshape(-1, d).var(axis=0), rtol=1e-4)
    np.testing.assert_allclose(norm.rms.mean[1], 100.0, atol=1.0)
    # Each task's own data comes out standardised under per-task stats...
    out = norm.normalize(seen[-1])
    assert np.abs(out.mean(axis=(1, 2))).max() < 1.0
    # ...whereas one shared set of stats maps task 0 to about -1 and task 1 to about +1.
    out_shared = shared.normalize(seen[-1])
    assert out_shared[0].mean() == pytest.approx(-1.0, abs=0.1)
    assert out_shared[1].mean() == pytest.approx(1.0, abs=0.1)


def test_reward_scaler_state_dict_round_trip():
    rng = np.random.default_rng(3)
    T, k = 2, 3
    original = RewardScaler(T, k, gamma=0.99)
    for _ in range(20):
        original.scale(rng.normal(1.0, 1.0, (T, k)), rng.random((T, k)) < 0.1)
    restored = RewardScaler(T, k, gamma=0.5)
    restored.load_state_dict(original.state_dict())
    assert restored.gamma == 0.99
    np.testing.assert_array_equal(restored.returns, original.returns)
    np.testing.assert_array_equal(restored.std(), original.std())
    for _ in range(5):
        rewards, ended = rng.normal(1.0, 1.0, (T, k)), rng.random((T, k)) < 0.3
        np.testing.assert_array_equal(restored.scale(rewards, ended), original.scale(rewards, ended))
    np.testing.assert_array_equal(restored.returns, original.returns)


def test_reward_scaler_divides_each_task_by_its_own_return_std():
    """Two tasks with reward scales 1 and 100 come out at the same magnitude."""
    rng = np.random.default_rng(4)
    T, k, gamma = 2, 4, 0.9
    scaler = RewardScaler(T, k, gamma)
    scaled = []
    for step in range(300):
        base = rng.random(k)
        ended = np.zeros((T, k), bool)
        ended[:, (step % 50) == 49] = True
        scaled.append(scaler.scale(np.stack([base, 100.0 * base]), ended))
    scaled = np.abs(np.array(scaled[50:]))  # [S, T, k]
    ratio = scaled[:, 1].mean() / scaled[:, 0].mean()
    assert ratio == pytest.approx(1.0, abs=0.02)
    assert scaler.std()[1] / scaler.std()[0] == pytest.approx(100.0, rel=0.02)
    # the loud task is brought down from a mean raw magnitude of ~50 to the quiet task's level
    assert scaled[:, 1].mean() < 1.0


def test_reward_scaler_resets_the_return_of_ended_envs_only():
    scaler = RewardScaler(1, 2, gamma=0.5)
    scaler.scale(np.array([[1.0, 1.0]]), np.array([[False, False]]))
    scaler.scale(np.array([[2.0, 2.0]]), np.array([[True, False]]))
    np.testing.assert_allclose(scaler.returns, [[0.0, 2.5]])  # env 1: 1 * 0.5 + 2
