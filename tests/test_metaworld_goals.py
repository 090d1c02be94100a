"""Each Meta-World task trains and evaluates on the 50 goals that the package's own vector envs
give it for the run's seed, so that numbers compare with papers that use the package."""

import gymnasium as gym
import metaworld  # noqa: F401  (registers the Meta-World/* ids)
import pytest

from shared.suites import make_suite, make_vector_env, metaworld_goal_set, select_tasks


def goal_sets(vector_env) -> list[set[bytes]]:
    return [metaworld_goal_set(env) for env in vector_env.envs]


def package_goal_sets(env_id: str, seed: int, task_names) -> list[set[bytes]]:
    if env_id == "mt10":
        reference = gym.make_vec("Meta-World/MT10", seed=seed, vector_strategy="sync")
    else:
        reference = gym.make_vec("Meta-World/custom-mt-envs", envs_list=list(task_names), seed=seed,
                                 vector_strategy="sync")
    try:
        return goal_sets(reference)
    finally:
        reference.close()


# Building a Meta-World env costs about a second: one vector env each (training envs with two
# columns per task on one suite, the evaluation env on the other) keeps this test short.
@pytest.mark.parametrize("env_id,seed,evaluation,k", [("mt10", 3, False, 1), ("mt3-tune", 2, True, 2)])
def test_training_and_evaluation_goals_are_the_packages_own_for_the_seed(env_id, seed, evaluation, k):
    suite = make_suite(env_id)
    expected = package_goal_sets(env_id, seed, suite.task_names)
    assert all(len(goals) == 50 for goals in expected)
    envs, _ = make_vector_env(suite, k, seed, evaluation=evaluation)
    try:
        ours = goal_sets(envs)
    finally:
        envs.close()
    for i, goals in enumerate(ours):
        assert goals == expected[i // k], f"{env_id} seed {seed}: column {i} ({suite.task_names[i // k]})"


def test_a_task_keeps_its_goals_when_others_are_held_out():
    full = make_suite("mt3")
    held_out = select_tasks(full, None, "reach-v3")  # push-v3 moves from index 1 to 0
    expected = package_goal_sets("mt3", 5, full.task_names)
    envs, _ = make_vector_env(held_out, 1, 5)
    try:
        assert goal_sets(envs) == expected[1:]
    finally:
        envs.close()


def test_a_single_task_gets_mt1s_goals_and_another_seed_other_goals():
    suite = make_suite("push-v3")
    reference = gym.make("Meta-World/MT1", env_name="push-v3", seed=4)
    envs, _ = make_vector_env(suite, 1, 4)
    other, _ = make_vector_env(suite, 1, 5)
    try:
        assert goal_sets(envs) == [metaworld_goal_set(reference)]
        assert goal_sets(other) != goal_sets(envs)
    finally:
        for env in (reference, envs, other):
            env.close()
