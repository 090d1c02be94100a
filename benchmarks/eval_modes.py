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
from benchmarks.finished_run import load_run  # noqa: E402
from shared.evaluate import evaluate  # noqa: E402
from shared.suites import env_seed, make_vector_env  # noqa: E402


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
    torch.set_num_threads(1)
    run = load_run(opts.run_dir, "eval_modes.py", "the sampled/mean split is for Gaussian heads")
    args, suite, agent, obs_normalizer, act_dim = run.args, run.suite, run.agent, run.obs_normalizer, run.act_dim
    T = suite.num_tasks
    torch.manual_seed(args.seed)
    std = agent.actor_logstd.detach().exp()
    std = std.reshape(-1, act_dim) if std.numel() > act_dim else std.reshape(1, act_dim).expand(T, act_dim)
    print(f"{opts.run_dir}: {run.algo}, step {run.global_step:,}")
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
