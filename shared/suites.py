"""Suites (``--env-id``), their tasks as data, per-suite PPO defaults, and the task-major vector env.

Every suite is a tuple of tasks. Toy variants are rows of parameter tables below; Meta-World
tasks come from the ``metaworld`` package's own registration (``Meta-World/MT1``, one env per
column, reward v2, 500-step episodes, the package's 50 fixed goals per task). For a seed ``s``
each task gets the 50 goals that the package's own vector envs would give it: on ``mt10`` those
of ``gym.make_vec("Meta-World/MT10", seed=s)`` (one ``metaworld.MT10(seed=s)`` draw for all ten
tasks), on the other suites those of ``gym.make_vec("Meta-World/custom-mt-envs",
envs_list=<the suite's tasks>, seed=s)`` (task ``i`` of the suite: ``MT1(task, seed=s + i)``),
and on a single task those of ``gym.make("Meta-World/MT1", env_name=task, seed=s)``. A task
keeps its goals under ``--tasks`` and ``--holdout-task`` (``i`` is its index in the full suite).

Layout: with ``T`` tasks and ``k`` envs per task, env column ``i`` always runs task ``i // k``.
The vector env is built that way and never reassigns a column, so the task of every transition
is known from its column.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import gymnasium as gym
import numpy as np

from shared.cli import UsageError

# ----------------------------------------------------------------------------------------------
# Toy suites as data: one row per task. Values not given keep gymnasium's defaults.
# CartPole defaults: gravity 9.8, masscart 1.0, masspole 0.1, length 0.5 (half-length), force_mag 10.
# ----------------------------------------------------------------------------------------------
CARTPOLE_SUCCESS_RETURN = 475.0  # gymnasium's own "solved" threshold for CartPole-v1
LUNARLANDER_SUCCESS_RETURN = 200.0  # gymnasium's own "solved" threshold for LunarLander

CARTPOLE_MT = {
    "standard": dict(),
    "long-pole": dict(length=1.0),
    "heavy-pole": dict(masspole=0.5),
    "heavy-cart": dict(masscart=3.0, force_mag=15.0),
    "low-gravity-weak-push": dict(gravity=4.0, force_mag=6.0),
}
CARTPOLE_IDENTICAL = {f"standard-{i}": dict() for i in range(5)}
# Two of five tasks swap the meaning of the two actions: one shared policy cannot serve both.
CARTPOLE_CONFLICT = {
    "standard": dict(),
    "long-pole": dict(length=1.0),
    "heavy-cart": dict(masscart=3.0, force_mag=15.0),
    "standard-inverted": dict(invert_actions=True),
    "long-pole-inverted": dict(length=1.0, invert_actions=True),
}
# gymnasium's documented ranges: gravity in (-12, 0), wind_power in [0, 20], turbulence in [0, 2].
LUNARLANDER_MT = {
    "standard": dict(gravity=-10.0),
    "low-gravity": dict(gravity=-6.0),
    "windy": dict(gravity=-10.0, enable_wind=True, wind_power=10.0, turbulence_power=1.0),
    "heavy-gusty": dict(gravity=-11.5, enable_wind=True, wind_power=15.0, turbulence_power=1.5),
}

MT3_TASKS = ("reach-v3", "push-v3", "pick-place-v3")
# The tuning suite: MT3's difficulty mix (reach, push, pick-place) on tasks outside MT10. Every
# Meta-World value (PPO defaults, each method's own knobs) is chosen here, never on MT3 or MT10.
MT3_TUNE_TASKS = ("reach-wall-v3", "push-wall-v3", "pick-place-wall-v3")
# Meta-World MT10 in the package's official order.
MT10_TASKS = (
    "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3",
    "drawer-close-v3", "button-press-topdown-v3", "peg-insert-side-v3",
    "window-open-v3", "window-close-v3",
)
METAWORLD_EPISODE_STEPS = 500


@dataclass(frozen=True)
class Suite:
    """What ``--env-id`` resolves to: the tasks, how to build one task's env, how success is read."""

    env_id: str
    task_names: tuple[str, ...]
    kind: str  # "gym" (a gymnasium id or a toy variant table) or "metaworld"
    task_params: tuple[dict, ...]  # construction parameters per task
    success_return: float | None  # toy success = return >= this; None: the env's `success` flag
    defaults: str  # row of SUITE_DEFAULTS

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def is_multitask(self) -> bool:
        return self.env_id in MULTITASK_SUITES

    def subset(self, names: list[str]) -> "Suite":
        idx = [self.task_names.index(n) for n in names]
        return dataclasses.replace(
            self,
            task_names=tuple(self.task_names[i] for i in idx),
            task_params=tuple(self.task_params[i] for i in idx),
        )


def _toy(env_id: str, base: str, table: dict, threshold: float, defaults: str) -> Suite:
    return Suite(env_id, tuple(table), "gym", tuple(dict(base=base, **p) for p in table.values()),
                 threshold, defaults)


def _metaworld(env_id: str, tasks: tuple[str, ...], goals: str, defaults: str) -> Suite:
    # goals "MT10": the MT10 benchmark's draw; "custom": the custom-mt-envs rule, MT1 at seed + index.
    params = tuple(dict(goals=goals, goal_seed_offset=0 if goals == "MT10" else i) for i in range(len(tasks)))
    return Suite(env_id, tasks, "metaworld", params, None, defaults)


MULTITASK_SUITES: dict[str, Callable[[], Suite]] = {
    "cartpole-mt": lambda: _toy("cartpole-mt", "CartPole-v1", CARTPOLE_MT, CARTPOLE_SUCCESS_RETURN,
                                "cartpole-mt"),
    "cartpole-identical": lambda: _toy("cartpole-identical", "CartPole-v1", CARTPOLE_IDENTICAL,
                                       CARTPOLE_SUCCESS_RETURN, "cartpole-mt"),
    "cartpole-conflict": lambda: _toy("cartpole-conflict", "CartPole-v1", CARTPOLE_CONFLICT,
                                      CARTPOLE_SUCCESS_RETURN, "cartpole-mt"),
    "lunarlander-mt": lambda: _toy("lunarlander-mt", "LunarLander-v3", LUNARLANDER_MT,
                                   LUNARLANDER_SUCCESS_RETURN, "lunarlander-mt"),
    "mt3-tune": lambda: _metaworld("mt3-tune", MT3_TUNE_TASKS, "custom", "mt3"),
    "mt3": lambda: _metaworld("mt3", MT3_TASKS, "custom", "mt3"),
    "mt10": lambda: _metaworld("mt10", MT10_TASKS, "MT10", "mt10"),
}

# Return thresholds for single gymnasium ids (their documented "solved" scores).
SINGLE_GYM_THRESHOLDS = {"CartPole-v1": CARTPOLE_SUCCESS_RETURN, "LunarLander-v3": LUNARLANDER_SUCCESS_RETURN}

# ----------------------------------------------------------------------------------------------
# PPO defaults per suite: every script reads these, so every method gets the same rollout length,
# envs per task, epochs, minibatches, learning-rate schedule and evaluation schedule on a suite.
# ----------------------------------------------------------------------------------------------
SUITE_DEFAULTS: dict[str, dict[str, Any]] = {
    "CartPole-v1": dict(
        total_timesteps=200_000, num_envs_per_task=8, num_steps=128, num_minibatches=4,
        update_epochs=10, learning_rate=1e-3, anneal_lr=True, gamma=0.99, gae_lambda=0.95,
        clip_coef=0.2, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5, hidden_sizes=(64, 64),
        eval_every=50_000, eval_episodes=10, final_eval_episodes=20,
    ),
    "cartpole-mt": dict(
        total_timesteps=1_000_000, num_envs_per_task=4, num_steps=128, num_minibatches=4,
        update_epochs=10, learning_rate=1e-3, anneal_lr=True, gamma=0.99, gae_lambda=0.95,
        clip_coef=0.2, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5, hidden_sizes=(64, 64),
        eval_every=100_000, eval_episodes=10, final_eval_episodes=20,
    ),
    # LunarLander needs many small minibatches (64 transitions): with 8 minibatches per epoch
    # PPO reached only 124 at 1M steps (seed 1); with 64 it clears 200 (README, results).
    "LunarLander-v3": dict(
        total_timesteps=1_000_000, num_envs_per_task=16, num_steps=256, num_minibatches=64,
        update_epochs=4, learning_rate=5e-4, anneal_lr=True, gamma=0.999, gae_lambda=0.98,
        clip_coef=0.2, ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.5, hidden_sizes=(64, 64),
        eval_every=100_000, eval_episodes=10, final_eval_episodes=20,
    ),
    "lunarlander-mt": dict(
        total_timesteps=4_000_000, num_envs_per_task=8, num_steps=256, num_minibatches=32,
        update_epochs=4, learning_rate=5e-4, anneal_lr=True, gamma=0.999, gae_lambda=0.98,
        clip_coef=0.2, ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.5, hidden_sizes=(64, 64),
        eval_every=200_000, eval_episodes=10, final_eval_episodes=20,
    ),
    "metaworld-single": dict(
        total_timesteps=1_000_000, num_envs_per_task=10, num_steps=500, num_minibatches=10,
        update_epochs=10, learning_rate=3e-4, anneal_lr=True, gamma=0.99, gae_lambda=0.95,
        clip_coef=0.2, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5, hidden_sizes=(256, 256),
        eval_every=100_000, eval_episodes=10, final_eval_episodes=50,
    ),
    "mt3": dict(
        total_timesteps=3_000_000, num_envs_per_task=4, num_steps=500, num_minibatches=10,
        update_epochs=10, learning_rate=3e-4, anneal_lr=True, gamma=0.99, gae_lambda=0.95,
        clip_coef=0.2, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5, hidden_sizes=(256, 256),
        eval_every=300_000, eval_episodes=10, final_eval_episodes=50,
    ),
    "mt10": dict(
        total_timesteps=20_000_000, num_envs_per_task=2, num_steps=500, num_minibatches=10,
        update_epochs=10, learning_rate=3e-4, anneal_lr=True, gamma=0.99, gae_lambda=0.95,
        clip_coef=0.2, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5, hidden_sizes=(400, 400, 400),
        eval_every=1_000_000, eval_episodes=10, final_eval_episodes=50,
    ),
}
DEFAULTED_FIELDS = tuple(SUITE_DEFAULTS["mt10"])


def _metaworld_task_names() -> list[str]:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS  # slow import (MuJoCo): only when needed

    return sorted(ALL_V3_ENVIRONMENTS)


def known_env_ids() -> str:
    return ", ".join([*MULTITASK_SUITES, "any gymnasium id (e.g. CartPole-v1)",
                      "any Meta-World v3 task (e.g. reach-v3)"])


def make_suite(env_id: str) -> Suite:
    """Resolve ``--env-id`` to a Suite, or raise a UsageError that lists what is valid."""
    if env_id in MULTITASK_SUITES:
        return MULTITASK_SUITES[env_id]()
    if env_id.endswith("-v3") and env_id not in gym.registry:
        names = _metaworld_task_names()
        if env_id not in names:
            raise UsageError(f"unknown Meta-World task '{env_id}'; valid tasks: {', '.join(names)}")
        return Suite(env_id, (env_id,), "metaworld", (dict(goals="MT1", goal_seed_offset=0),), None,
                     "metaworld-single")
    if env_id in gym.registry:
        defaults = env_id if env_id in SUITE_DEFAULTS else "CartPole-v1"
        # No documented "solved" return: success is reported as NaN rather than a misleading 0.
        threshold = SINGLE_GYM_THRESHOLDS.get(env_id, float("nan"))
        return Suite(env_id, (env_id,), "gym", (dict(base=env_id),), threshold, defaults)
    raise UsageError(f"unknown --env-id '{env_id}'; use one of: {known_env_ids()}")


def select_tasks(suite: Suite, tasks: list[str] | None, holdout_task: str | None) -> Suite:
    """Apply ``--tasks`` (keep these) and ``--holdout-task`` (drop this one) to a multi-task suite."""
    if tasks is None and holdout_task is None:
        return suite
    if not suite.is_multitask:
        raise UsageError(f"--tasks/--holdout-task/--task apply to multi-task suites only, not '{suite.env_id}'")
    valid = ", ".join(suite.task_names)
    for name in (tasks or []) + ([holdout_task] if holdout_task else []):
        if name not in suite.task_names:
            raise UsageError(f"unknown task '{name}' in suite '{suite.env_id}'; valid tasks: {valid}")
    if tasks is not None and len(set(tasks)) != len(tasks):
        raise UsageError(f"--tasks names a task twice ({' '.join(tasks)}); list each task once")
    if tasks is not None and holdout_task is not None and holdout_task not in tasks:
        raise UsageError(f"--holdout-task '{holdout_task}' is not among --tasks, so it would hold nothing out")
    names = list(tasks) if tasks is not None else list(suite.task_names)
    if holdout_task is not None:
        names = [n for n in names if n != holdout_task]
    if not names:
        raise UsageError("--tasks/--holdout-task leave no task to train on")
    return suite.subset(names)


# ----------------------------------------------------------------------------------------------
# Environment construction
# ----------------------------------------------------------------------------------------------
class InvertActions(gym.ActionWrapper):
    """Swap the two discrete actions (push left <-> push right)."""

    def action(self, action):
        return 1 - action


def _make_cartpole(params: dict) -> gym.Env:
    env = gym.make("CartPole-v1")
    physics = env.unwrapped
    for name in ("gravity", "masscart", "masspole", "length", "force_mag"):
        if name in params:
            setattr(physics, name, float(params[name]))
    # CartPoleEnv caches these two in __init__; recompute them or the variant is silently ignored.
    physics.total_mass = physics.masspole + physics.masscart
    physics.polemass_length = physics.masspole * physics.length
    if params.get("invert_actions"):
        env = InvertActions(env)
    return env


def _make_gym_task(params: dict) -> gym.Env:
    base = params["base"]
    extra = {k: v for k, v in params.items() if k != "base"}
    if base == "CartPole-v1" and extra:
        env = _make_cartpole(extra)
    else:
        env = gym.make(base, **extra)
    return gym.wrappers.RecordEpisodeStatistics(env)


@functools.lru_cache(maxsize=None)
def _mt10_draw(seed: int) -> tuple:
    import metaworld

    return tuple(metaworld.MT10(seed=seed).train_tasks)


@functools.lru_cache(maxsize=None)
def _task_goals(task_name: str, goals: str, seed: int) -> tuple:
    """The task's 50 goals: from ``metaworld.MT10(seed)`` (one draw for all ten tasks) or from
    ``metaworld.MT1(task, seed)``, exactly as the package's vector envs build them. Cached per
    process: drawing goals builds the env and resets it 50 times, and every column of a task
    (training, evaluation, the final evaluation) needs the same list."""
    import metaworld

    if goals == "MT10":
        return tuple(task for task in _mt10_draw(seed) if task.env_name == task_name)
    return tuple(metaworld.MT1(task_name, seed=seed).train_tasks)


def _make_metaworld_task(task_name: str, params: dict, seed: int, rng_seed: int, evaluation: bool) -> gym.Env:
    import metaworld
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    # The package's own per-env builder (what gym.make("Meta-World/MT1") runs after drawing the
    # goals), given the cached goals: the same wrappers (time limit, success termination, episode
    # statistics, goal selection) without building the env a second time to draw them again.
    goals = list(_task_goals(task_name, params["goals"], seed + params["goal_seed_offset"]))  # a list per env:
    # the evaluation's goal selection shuffles it in place
    env = metaworld._init_each_env(
        env_cls=ALL_V3_ENVIRONMENTS[task_name],
        tasks=goals,
        seed=rng_seed,  # Meta-World ignores reset(seed=...): this seeds the env's goal-picking RNG
        max_episode_steps=METAWORLD_EPISODE_STEPS,
        terminate_on_success=evaluation,  # official protocol: an eval episode ends at success
        task_select="pseudorandom" if evaluation else "random",  # training: a random goal per reset
        reward_function_version="v2",
    )
    if evaluation:
        # cycle through the 50 goals in a shuffled order: 50 eval episodes visit each goal once
        env.get_wrapper_attr("toggle_sample_tasks_on_reset")(True)
    return env


def metaworld_goal_set(env: gym.Env) -> set[bytes]:
    """The goals a Meta-World env draws from, as comparable bytes (tests and checks)."""
    return {task.data for task in env.get_wrapper_attr("tasks")}


def make_task_env_fn(suite: Suite, task: int, seed: int, env_index: int, evaluation: bool) -> Callable[[], gym.Env]:
    if suite.kind == "metaworld":
        # Meta-World ignores reset(seed=...) and treats seed 0 as "unseeded" in its custom sets:
        # derive strictly positive seeds that differ per env and between training and evaluation.
        rng_seed = 1 + seed * 100_003 + (50_000 if evaluation else 0) + env_index
        return partial(_make_metaworld_task, suite.task_names[task], suite.task_params[task], seed, rng_seed,
                       evaluation)
    return partial(_make_gym_task, suite.task_params[task])


def env_seed(seed: int, evaluation: bool) -> int:
    """Base seed passed to ``reset(seed=...)``: env i gets base + i. Evaluation envs are offset."""
    return seed + (1_000_000 if evaluation else 0)


def make_vector_env(suite: Suite, num_envs_per_task: int, seed: int, async_envs: bool = False,
                    evaluation: bool = False) -> tuple[gym.vector.VectorEnv, np.ndarray]:
    """The task-major vector env and the task id of each column: column i runs task i // k."""
    k = num_envs_per_task
    task_ids = np.repeat(np.arange(suite.num_tasks), k)  # [T * k]
    fns = [make_task_env_fn(suite, int(t), seed, i, evaluation) for i, t in enumerate(task_ids)]
    vector_cls = gym.vector.AsyncVectorEnv if async_envs else gym.vector.SyncVectorEnv
    envs = vector_cls(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    envs.action_space.seed(seed)
    return envs, task_ids


def space_dims(envs: gym.vector.VectorEnv) -> tuple[int, int, bool]:
    """(obs_dim, action_dim or number of discrete actions, is_discrete)."""
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    if len(obs_space.shape) != 1:
        raise UsageError(f"only flat observation vectors are supported, got shape {obs_space.shape}")
    if isinstance(act_space, gym.spaces.Discrete):
        return obs_space.shape[0], int(act_space.n), True
    if isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1:
        return obs_space.shape[0], act_space.shape[0], False
    raise UsageError(f"unsupported action space {act_space}: use Discrete or a 1-D Box")


def apply_suite_defaults(args, suite: Suite):
    """Fill every ``None`` field of ``args`` that the suite table defines; return the same args."""
    table = SUITE_DEFAULTS[suite.defaults]
    for name in DEFAULTED_FIELDS:
        if getattr(args, name, "missing") is None:
            setattr(args, name, table[name])
    return args
