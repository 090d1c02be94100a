"""Bad input gets one clear sentence on stderr, exit code 2, and no traceback.

The scripts run through subprocess, two at a time, started when the module's first test asks."""

from __future__ import annotations

import pytest

from tests.conftest import ScriptRuns, describe, selected_test_names

CASES = {
    "test_unknown_env_id_is_refused": (
        "ppo_mtl_embed", ["--env-id", "cartpole-multi"], ["unknown --env-id 'cartpole-multi'", "cartpole-mt", "mt10"]),
    "test_unknown_task_name_for_ppo_single_lists_the_valid_tasks": (
        "ppo_single", ["--env-id", "cartpole-mt", "--task", "long-pol"],
        ["unknown task 'long-pol'", "standard", "long-pole", "heavy-pole", "heavy-cart", "low-gravity-weak-push"]),
    "test_unknown_metaworld_task_is_refused": (
        "ppo_single", ["--env-id", "reech-v3"], ["unknown Meta-World task 'reech-v3'", "reach-v3", "pick-place-v3"]),
    "test_budget_smaller_than_one_rollout_is_refused": (
        "ppo_mtl_embed", ["--env-id", "cartpole-mt", "--num-envs-per-task", "2", "--num-steps", "16",
                          "--total-timesteps", "100"], ["--total-timesteps 100", "160"]),
    "test_task_flag_on_a_single_env_id_is_refused": (
        "ppo_single", ["--env-id", "CartPole-v1", "--task", "standard"], ["--task", "multi-task", "CartPole-v1"]),
    "test_nan_learning_rate_is_refused": (
        "ppo_pcgrad", ["--learning-rate", "nan"], ["--learning-rate is nan", "finite"]),
    "test_infinite_method_flag_is_refused": (
        "ppo_varshare", ["--beta", "inf"], ["--beta is inf", "finite"]),
}


@pytest.fixture(scope="module")
def runs(request):
    wanted = selected_test_names(request)
    jobs = {name: dict(script=script, argv=argv) for name, (script, argv, _) in CASES.items() if name in wanted}
    pool = ScriptRuns(jobs)
    yield pool
    pool.close()


def check_usage_error(runs, name: str) -> str:
    proc = runs.result(name)
    _, _, fragments = CASES[name]
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    message = proc.stderr.strip()
    assert message.startswith("error: "), describe(proc)
    assert len(message.splitlines()) == 1, f"expected one line, got:\n{message}"
    for fragment in fragments:
        assert fragment in message, f"'{fragment}' missing from: {message}"
    return message


def test_unknown_env_id_is_refused(runs):
    check_usage_error(runs, "test_unknown_env_id_is_refused")


def test_unknown_task_name_for_ppo_single_lists_the_valid_tasks(runs):
    check_usage_error(runs, "test_unknown_task_name_for_ppo_single_lists_the_valid_tasks")


def test_unknown_metaworld_task_is_refused(runs):
    check_usage_error(runs, "test_unknown_metaworld_task_is_refused")


def test_budget_smaller_than_one_rollout_is_refused(runs):
    check_usage_error(runs, "test_budget_smaller_than_one_rollout_is_refused")


def test_task_flag_on_a_single_env_id_is_refused(runs):
    check_usage_error(runs, "test_task_flag_on_a_single_env_id_is_refused")


def test_nan_learning_rate_is_refused(runs):
    check_usage_error(runs, "test_nan_learning_rate_is_refused")


def test_infinite_method_flag_is_refused(runs):
    check_usage_error(runs, "test_infinite_method_flag_is_refused")


SCRIPTS = ["ppo_single", "ppo_mtl_embed", "ppo_varshare", "ppo_paco", "ppo_softmod", "ppo_pcgrad"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_refuses_non_finite_float_flags(script):
    """The same two checks in every script: any float flag (check_finite, before main) and the
    positive ones inside the PPO core (check_positive), where NaN used to pass `value <= 0`."""
    import math

    from shared.cli import UsageError, check_finite
    from tests.conftest import load_script

    Args = load_script(script).Args
    for flags in (dict(learning_rate=math.nan), dict(gamma=math.inf), dict(ent_coef=-math.inf),
                  dict(target_kl=math.nan), dict(checkpoint_every=math.nan)):
        with pytest.raises(UsageError, match="give a finite number"):
            check_finite(Args(**flags))
    check_finite(Args(learning_rate=1e-3, target_kl=0.02))
    module = load_script(script)
    for flags in (dict(learning_rate=math.nan), dict(gamma=math.inf), dict(clip_coef=-1.0)):
        with pytest.raises(UsageError, match="must be a positive finite number"):
            module.main(Args(env_id="cartpole-mt", **flags))


def test_task_selection_refuses_duplicates_and_a_holdout_outside_the_list():
    from shared.cli import UsageError
    from shared.suites import make_suite, select_tasks

    suite = make_suite("cartpole-mt")
    with pytest.raises(UsageError, match="twice"):
        select_tasks(suite, ["standard", "standard"], None)
    with pytest.raises(UsageError, match="hold nothing out"):
        select_tasks(suite, ["standard", "long-pole"], "heavy-cart")
    assert select_tasks(suite, ["standard", "long-pole"], "long-pole").task_names == ("standard",)
