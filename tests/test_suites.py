"""Suites: every toy variant's parameters take effect, columns are task-major, Meta-World builds and
reports success, and seeding reproduces the first rollouts."""

from __future__ import annotations

import numpy as np
import pytest

from shared.evaluate import step_success
from shared.suites import (
    CARTPOLE_CONFLICT,
    CARTPOLE_MT,
    InvertActions,
    env_seed,
    make_suite,
    make_task_env_fn,
    make_vector_env,
)

CARTPOLE_DEFAULTS = dict(gravity=9.8, masscart=1.0, masspole=0.1, length=0.5, force_mag=10.0)
CARTPOLE_ACTIONS = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0]
LUNAR_ACTIONS = [2, 2, 0, 1, 2, 3, 2, 0, 0, 2] * 4


def trajectory(suite, task: int, seed: int, actions) -> np.ndarray:
    """Observations and rewards of one task's env from reset(seed) under a fixed action sequence."""
    env = make_task_env_fn(suite, task, seed=0, env_index=0, evaluation=False)()
    obs, _ = env.reset(seed=seed)
    rows = [np.append(obs, 0.0)]
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(action)
        rows.append(np.append(obs, reward))
        if terminated or truncated:
            break
    env.close()
    return np.array(rows, dtype=np.float64)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.parametrize("env_id, actions", [
    ("cartpole-mt", CARTPOLE_ACTIONS),
    ("cartpole-conflict", CARTPOLE_ACTIONS),
    ("lunarlander-mt", LUNAR_ACTIONS),
])
def test_every_toy_variant_changes_the_dynamics(env_id, actions):
    suite = make_suite(env_id)
    assert suite.num_tasks >= 2
    reference = trajectory(suite, 0, seed=7, actions=actions)
    # Same task, same seed, same actions: the same trajectory, step for step.
    assert same(reference, trajectory(suite, 0, seed=7, actions=actions))
    for task in range(1, suite.num_tasks):
        other = trajectory(suite, task, seed=7, actions=actions)
        if env_id.startswith("cartpole"):
            # CartPole's initial state depends only on the seed: the variants start alike, then part.
            np.testing.assert_array_equal(other[0], reference[0])
        assert not same(other, reference), f"{env_id} task '{suite.task_names[task]}' behaves like task 0"


def test_every_cartpole_variant_differs_from_every_other():
    suite = make_suite("cartpole-mt")
    runs = [trajectory(suite, t, seed=3, actions=CARTPOLE_ACTIONS) for t in range(suite.num_tasks)]
    for a in range(suite.num_tasks):
        for b in range(a + 1, suite.num_tasks):
            assert not same(runs[a], runs[b]), (suite.task_names[a], suite.task_names[b])


@pytest.mark.parametrize("inverted, plain", [("standard-inverted", "standard"), ("long-pole-inverted", "long-pole")])
def test_conflict_inverted_task_is_its_plain_task_with_flipped_actions(inverted, plain):
    suite = make_suite("cartpole-conflict")
    i, p = suite.task_names.index(inverted), suite.task_names.index(plain)
    flipped = [1 - a for a in CARTPOLE_ACTIONS]
    np.testing.assert_array_equal(trajectory(suite, i, 5, CARTPOLE_ACTIONS), trajectory(suite, p, 5, flipped))
    assert not same(trajectory(suite, i, 5, CARTPOLE_ACTIONS), trajectory(suite, p, 5, CARTPOLE_ACTIONS))


def cartpole_row(table: dict, name: str) -> dict:
    return {**CARTPOLE_DEFAULTS, **{key: table[name][key] for key in CARTPOLE_DEFAULTS if key in table[name]}}


@pytest.mark.parametrize("env_id, table", [("cartpole-mt", CARTPOLE_MT), ("cartpole-conflict", CARTPOLE_CONFLICT)])
def test_vector_env_is_task_major_and_columns_keep_their_task_across_autoresets(env_id, table):
    suite = make_suite(env_id)
    T, k = suite.num_tasks, 3
    envs, task_ids = make_vector_env(suite, k, seed=11)
    np.testing.assert_array_equal(task_ids, np.repeat(np.arange(T), k))
    assert envs.num_envs == T * k

    def check_columns():
        for i in range(T * k):
            name = suite.task_names[i // k]
            physics = envs.envs[i].unwrapped
            row = cartpole_row(table, name)
            for key, value in row.items():
                assert getattr(physics, key) == pytest.approx(value), (i, name, key)
            # the derived constants CartPoleEnv caches must follow the variant too
            assert physics.total_mass == pytest.approx(row["masscart"] + row["masspole"])
            assert physics.polemass_length == pytest.approx(row["masspole"] * row["length"])
            inverted = any(isinstance(w, InvertActions) for w in wrapper_chain(envs.envs[i]))
            assert inverted == bool(table[name].get("invert_actions", False)), (i, name)

    check_columns()
    envs.reset(seed=env_seed(11, False))
    rng = np.random.default_rng(0)
    resets = np.zeros(T * k, int)
    for _ in range(150):
        _, _, terminated, truncated, _ = envs.step(rng.integers(0, 2, T * k))
        resets += terminated | truncated
    assert resets.min() >= 2, f"every column should have autoreset a few times, got {resets}"
    check_columns()

    # A column's next transition is its own task's dynamics: same state and action, same result
    # as a fresh env of task i // k.
    for i in range(T * k):
        column = envs.envs[i]
        reference = make_task_env_fn(suite, i // k, 0, 0, False)()
        reference.reset(seed=0)
        state = np.array(column.unwrapped.state, dtype=np.float64)
        reference.unwrapped.state = state.copy()
        column.unwrapped.state = state.copy()
        obs_col, *_ = column.step(1)
        obs_ref, *_ = reference.step(1)
        np.testing.assert_array_equal(obs_col, obs_ref)
    envs.close()


def wrapper_chain(env):
    while True:
        yield env
        if not hasattr(env, "env"):
            return
        env = env.env


def test_step_success_reads_final_info_on_the_autoreset_step():
    """A hand-made info dict as gymnasium's SyncVectorEnv (SAME_STEP) builds it for 4 envs:
    envs 0 and 2 ended this step (their top-level info is the next episode's reset info), env 1
    runs on and succeeds now, env 3 runs on without success."""
    ended = np.array([True, False, True, False])
    info = {
        # env 2's reset info claims success: it belongs to the new episode and must be ignored
        "success": np.array([0.0, 1.0, 1.0, 0.0]),
        "_success": np.array([False, True, True, True]),
        "final_obs": np.array([np.zeros(39), None, np.zeros(39), None], dtype=object),
        "_final_obs": ended.copy(),
        "final_info": {
            "success": np.array([1.0, 0.0, 0.0, 0.0]),
            "_success": np.array([True, False, True, False]),
        },
        "_final_info": ended.copy(),
    }
    np.testing.assert_array_equal(step_success(info, ended), [True, True, False, False])
    # No env ended: the top-level flags are this step's.
    plain = {"success": np.array([0.0, 1.0, 0.0, 1.0]), "_success": np.ones(4, bool)}
    np.testing.assert_array_equal(step_success(plain, np.zeros(4, bool)), [False, True, False, True])


def test_metaworld_mt3_builds_task_major_and_reports_success():
    suite = make_suite("mt3")
    assert suite.task_names == ("reach-v3", "push-v3", "pick-place-v3")
    envs, task_ids = make_vector_env(suite, 1, seed=1)
    np.testing.assert_array_equal(task_ids, [0, 1, 2])
    classes = [type(env.unwrapped).__name__ for env in envs.envs]
    assert classes == ["SawyerReachEnvV3", "SawyerPushEnvV3", "SawyerPickPlaceEnvV3"]
    obs, _ = envs.reset(seed=env_seed(1, False))
    assert obs.shape == (3, 39)
    for _ in range(3):
        obs, reward, terminated, truncated, info = envs.step(np.zeros((3, 4), np.float32))
    assert obs.shape == (3, 39) and reward.shape == (3,)
    assert "success" in info and info["success"].shape == (3,)
    assert not (terminated | truncated).any()
    assert not step_success(info, terminated | truncated).any()  # standing still solves nothing
    envs.close()


def first_rollout(env_id: str, k: int, seed: int, actions: np.ndarray) -> np.ndarray:
    envs, _ = make_vector_env(make_suite(env_id), k, seed=seed)
    obs, _ = envs.reset(seed=env_seed(seed, False))
    out = [obs]
    for action in actions:
        obs, *_ = envs.step(action)
        out.append(obs)
    envs.close()
    return np.array(out)


def test_same_seed_same_first_rollout_cartpole_mt():
    actions = np.random.default_rng(1).integers(0, 2, (20, 5 * 2))
    a = first_rollout("cartpole-mt", 2, 3, actions)
    np.testing.assert_array_equal(a, first_rollout("cartpole-mt", 2, 3, actions))
    b = first_rollout("cartpole-mt", 2, 4, actions)
    assert not np.array_equal(a[0], b[0]), "a different seed should start from different states"


def test_same_seed_same_first_rollout_metaworld():
    """Meta-World ignores reset(seed=...): the suite seeds each env's goal RNG at construction."""
    actions = np.random.default_rng(1).uniform(-1, 1, (20, 2, 4)).astype(np.float32)
    a = first_rollout("reach-v3", 2, 1, actions)
    np.testing.assert_array_equal(a, first_rollout("reach-v3", 2, 1, actions))
    assert not np.array_equal(a[0, 0], a[0, 1]), "the two envs of a task should get different goals"
    b = first_rollout("reach-v3", 1, 2, actions[:, :1])
    assert not np.array_equal(a[0, 0], b[0, 0]), "a different seed should give different goals"


def test_metaworld_evaluation_visits_each_of_the_50_goals_once_per_50_episodes():
    """The final evaluation runs 50 episodes per task: each of the task's 50 goals exactly once,
    and they are the same 50 goals that training draws from."""
    suite = make_suite("reach-v3")
    evaluation = make_task_env_fn(suite, 0, 7, 0, evaluation=True)()
    goals = [tuple(np.round(evaluation.reset()[0][-3:], 6)) for _ in range(100)]
    assert len(set(goals[:50])) == 50, "50 evaluation episodes should visit 50 different goals"
    assert set(goals[50:]) == set(goals[:50]), "the next 50 episodes should cycle through the same goals"
    training = make_task_env_fn(suite, 0, 7, 0, evaluation=False)()
    train_goals = {tuple(np.round(training.reset()[0][-3:], 6)) for _ in range(60)}
    assert train_goals <= set(goals[:50]), "training should draw from the evaluation's 50 goals"
    assert len(train_goals) > 10
