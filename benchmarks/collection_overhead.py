"""Collection overhead: rollout-phase env-steps/s of a training script divided by env-steps/s of
the same vector env stepped with random actions, measured in one process, one after the other.

    # reach-v3 (ppo_single), mt3 (ppo_mtl_embed, ppo_varshare)
    .venv/bin/python benchmarks/collection_overhead.py

The rollout phase is env + policy + bookkeeping (normalisers, buffers, episode statistics),
timed inside the training loop (``perf`` in summary.json, first iteration skipped as warm-up).
Also prints the update phase's share of the iteration time. Absolute numbers vary with the
machine's load; the ratio is what to compare.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from shared.scripts import load_script  # noqa: E402
from shared.suites import SUITE_DEFAULTS, env_seed, make_suite, make_vector_env  # noqa: E402


def load(name: str):
    return load_script(name, prefix="bench")


def random_sps(env_id: str, iterations: int) -> float:
    suite = make_suite(env_id)
    table = SUITE_DEFAULTS[suite.defaults]
    k, S = table["num_envs_per_task"], table["num_steps"]
    envs, _ = make_vector_env(suite, k, seed=1)
    envs.reset(seed=env_seed(1, False))
    for _ in range(S):  # warm-up: one rollout's worth
        envs.step(envs.action_space.sample())
    start = time.perf_counter()
    for _ in range(iterations * S):
        envs.step(envs.action_space.sample())
    elapsed = time.perf_counter() - start
    envs.close()
    return iterations * S * envs.num_envs / elapsed


def training_perf(script: str, env_id: str, iterations: int) -> dict:
    module = load(script)
    suite = make_suite(env_id)
    table = SUITE_DEFAULTS[suite.defaults]
    batch = suite.num_tasks * table["num_envs_per_task"] * table["num_steps"]
    with tempfile.TemporaryDirectory() as runs_dir:
        args = module.Args(env_id=env_id, total_timesteps=(iterations + 1) * batch, eval_every=10**12,
                           eval_episodes=1, final_eval_episodes=1, runs_dir=runs_dir)
        return module.main(args)["perf"]


def main() -> None:
    torch.set_num_threads(1)
    iterations = int(os.environ.get("ITERATIONS", "3"))
    rows = []
    for env_id, scripts in (("reach-v3", ["ppo_single"]), ("mt3", ["ppo_mtl_embed", "ppo_varshare"])):
        for script in scripts:
            baseline = random_sps(env_id, iterations)
            perf = training_perf(script, env_id, iterations)
            rows.append((env_id, script, baseline, perf["rollout_sps"], perf["rollout_sps"] / baseline,
                         perf["update_share"], perf["inference_time"] / perf["rollout_time"],
                         perf["env_time"] / perf["rollout_time"]))
    print("| suite | script | random-action env steps/s | rollout env steps/s | ratio | update share of iteration "
          "| policy share of rollout | env.step share of rollout |")
    print("|---|---|---|---|---|---|---|---|")
    for env_id, script, base, roll, ratio, share, pol, env in rows:
        print(f"| {env_id} | {script} | {base:.0f} | {roll:.0f} | {ratio:.3f} | {share:.3f} | {pol:.3f} | {env:.3f} |")


if __name__ == "__main__":
    main()
