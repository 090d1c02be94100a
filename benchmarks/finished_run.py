"""A run's last checkpoint loaded for analysis: the tools that act with a trained policy
(eval_modes.py, task_routing.py) share this, so they build the agent exactly as the run did."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from shared.checkpoint import load_checkpoint, resume_args  # noqa: E402
from shared.cli import UsageError  # noqa: E402
from shared.normalize import ObsNormalizer  # noqa: E402
from shared.scripts import load_script  # noqa: E402
from shared.suites import apply_suite_defaults, make_suite, make_vector_env, space_dims  # noqa: E402
from shared.transfer import base_run_args  # noqa: E402


@dataclass
class FinishedRun:
    algo: str
    args: object  # the script's Args, as the run resolved them
    suite: object
    agent: torch.nn.Module  # in eval mode
    obs_normalizer: ObsNormalizer
    obs_dim: int
    act_dim: int
    global_step: int


def load_run(run_dir: str, tool: str, continuous_only: str) -> FinishedRun:
    """The run's agent and observation statistics from its last checkpoint. Anything that is not
    such a run (no args.json, no checkpoint yet, discrete actions) exits with one sentence naming
    ``tool``; ``continuous_only`` says why discrete actions are refused."""
    try:
        algo = base_run_args(run_dir)["algo"]
    except UsageError as err:  # not a run directory, or its args.json unreadable
        raise SystemExit(f"{tool}: {str(err).replace('--init-from ', '')}") from None
    if not os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
        raise SystemExit(f"{tool}: {run_dir} has no checkpoint.pt (the run stopped before its first)")
    script = load_script(algo)
    args = resume_args(script.Args(resume=run_dir), algo)
    suite = make_suite(args.env_id)
    apply_suite_defaults(args, suite)
    suite = script.select_run_tasks(args, suite)
    probe, _ = make_vector_env(suite, 1, args.seed, evaluation=True)
    obs_dim, act_dim, discrete = space_dims(probe)
    probe.close()
    if discrete:
        raise SystemExit(f"{tool}: the run's actions are discrete; {continuous_only}")
    agent = script.make_agent(args, suite, obs_dim, act_dim, discrete)
    obs_normalizer = ObsNormalizer(suite.num_tasks, obs_dim, per_task=script.OBS_NORM_PER_TASK)
    state = load_checkpoint(os.path.join(run_dir, "checkpoint.pt"), agent, obs_normalizer=obs_normalizer,
                            restore_rng=False)
    agent.eval()
    return FinishedRun(algo, args, suite, agent, obs_normalizer, obs_dim, act_dim, state["global_step"])
