"""A finished run's final policy evaluated three ways, to split a gap between training and evaluation.

The training loop logs success of the stochastic policy (actions sampled from the Gaussian head)
on the training envs; the evaluation (shared/evaluate.py) acts with the mean action on envs that
end an episode at success and visit the goals in a shuffled cycle. When a task succeeds in
training and not in evaluation, these rows say which of the two differences is responsible:

- ``mean``: the run's own evaluation (mean action, evaluation envs);
- ``sample``: actions sampled from the policy's Gaussian, evaluation envs;
- ``sample-train-env``: sampled actions on training-style envs (random goal per reset, no end at
  success), the way training success is counted.

Each row: per task, success rate and mean return over ``--episodes`` episodes; the policy's
action std per task is printed first. Weights are the run's last checkpoint (the final policy
when the run finished); VarShare acts with its mean weights throughout.

    .venv/bin/python benchmarks/eval_modes.py runs/prox-mt3/<run dir> --episodes 50
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from shared.checkpoint import load_checkpoint, resume_args  # noqa: E402
from shared.cli import UsageError  # noqa: E402
from shared.evaluate import evaluate  # noqa: E402
from shared.normalize import ObsNormalizer  # noqa: E402
from shared.scripts import load_script  # noqa: E402
from shared.suites import apply_suite_defaults, env_seed, make_suite, make_vector_env, space_dims  # noqa: E402
from shared.transfer import base_run_args  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--episodes", type=int, default=50, help="episodes per task and mode")
    parser.add_argument("--modes", default="mean,sample,sample-train-env")
    opts = parser.parse_args()
    modes = opts.modes.split(",")
    unknown = sorted(set(modes) - {"mean", "sample", "sample-train-env"})
    if unknown:
        raise SystemExit(f"eval_modes.py: unknown mode(s) {', '.join(unknown)}; "
                         f"choose from mean, sample, sample-train-env")
    try:
        algo = base_run_args(opts.run_dir)["algo"]
    except UsageError as err:  # not a run directory, or its args.json unreadable
        raise SystemExit(f"eval_modes.py: {str(err).replace('--init-from ', '')}") from None
    if not os.path.isfile(os.path.join(opts.run_dir, "checkpoint.pt")):
        raise SystemExit(f"eval_modes.py: {opts.run_dir} has no checkpoint.pt (the run stopped before its first)")
    script = load_script(algo)
    args = resume_args(script.Args(resume=opts.run_dir), algo)
    torch.set_num_threads(1)
    suite = make_suite(args.env_id)
    apply_suite_defaults(args, suite)
    suite = script.select_run_tasks(args, suite)
    T = suite.num_tasks
    probe, _ = make_vector_env(suite, 1, args.seed, evaluation=True)
    obs_dim, act_dim, discrete = space_dims(probe)
    probe.close()
    if discrete:
        raise SystemExit("eval_modes.py: the run's actions are discrete; the sampled/mean split is for Gaussian heads")
    agent = script.make_agent(args, suite, obs_dim, act_dim, discrete)
    obs_normalizer = ObsNormalizer(T, obs_dim, per_task=script.OBS_NORM_PER_TASK)
    state = load_checkpoint(os.path.join(opts.run_dir, "checkpoint.pt"), agent, obs_normalizer=obs_normalizer,
                            restore_rng=False)
    agent.eval()
    torch.manual_seed(args.seed)
    std = agent.actor_logstd.detach().exp()
    std = std.reshape(-1, act_dim) if std.numel() > act_dim else std.reshape(1, act_dim).expand(T, act_dim)
    print(f"{opts.run_dir}: {algo}, step {state['global_step']:,}")
    for name, s in zip(suite.task_names, std, strict=True):
        print(f"  action std {name:22s} " + " ".join(f"{v:.3f}" for v in s.tolist()))

    def policy(sample: bool):
        def act(obs_np: np.ndarray) -> np.ndarray:
            obs = torch.as_tensor(obs_np, dtype=torch.float32)
            task_ids = torch.arange(T)[:, None].expand(T, obs.shape[1])
            with torch.inference_mode():
                if sample:
                    actions = agent.get_action_and_value(obs, task_ids)[0]
                else:
                    actions = agent.act_deterministic(obs, task_ids)
            return actions.reshape(-1, act_dim).numpy()
        return act

    header = f"  {'mode':18s}" + "".join(f"{n:>26s}" for n in suite.task_names)
    print(header)
    for mode in modes:
        evaluation = mode != "sample-train-env"
        envs, _ = make_vector_env(suite, 1, args.seed, evaluation=evaluation)
        try:
            result = evaluate(policy(mode != "mean"), envs, T, obs_normalizer, opts.episodes,
                              suite.success_return, env_seed(args.seed, evaluation=True))
        finally:
            envs.close()
        cells = "".join(f"{s:>14.2f} {r:>10.1f}" for s, r in zip(result["success"], result["return"], strict=True))
        print(f"  {mode:18s}{cells}   (success, return)", flush=True)


if __name__ == "__main__":
    main()
