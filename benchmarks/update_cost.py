"""Update-phase cost of each method relative to ppo_mtl_embed at the same width, from one run.

    .venv/bin/python benchmarks/update_cost.py [--reps 30]

For each shape (cartpole-mt: 5 tasks, obs 4, 2 x 64, 128 transitions per task per minibatch;
MT10: 10 tasks, obs 39, 3 x 400, 100 per task per minibatch) every script builds its agent at
the suite defaults and runs the same synthetic task-stratified minibatch through
``ppo_task_losses`` + ``method_update`` (forward, backward, the method's gradient rule, Adam).
Methods are timed in interleaved rounds, so load changes hit all of them alike; the table gives
the median time per minibatch update and the ratio to ppo_mtl_embed, and the time per
iteration at the suite's epochs x minibatches.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import glob
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from shared.scripts import load_script  # noqa: E402
from shared.suites import make_suite  # noqa: E402

SHAPES = {"cartpole-mt": dict(obs_dim=4, act_dim=2, discrete=True),
          "mt10": dict(obs_dim=39, act_dim=4, discrete=False)}


def load(name: str):
    return load_script(name, prefix="bench")


def setup(module, env_id: str, shape: dict, overrides: dict):
    suite = make_suite(env_id)
    args = module.Args(env_id=env_id, **overrides)
    module.apply_suite_defaults(args, suite)
    suite = module.select_run_tasks(args, suite)  # as the core does: some scripts derive sizes here
    torch.manual_seed(0)
    agent = module.make_agent(args, suite, shape["obs_dim"], shape["act_dim"], shape["discrete"])
    optimizer = module.make_optimizer(args, agent)
    T = suite.num_tasks
    n = args.num_envs_per_task * args.num_steps // args.num_minibatches
    obs = torch.randn(T, n, shape["obs_dim"])
    task_ids = torch.arange(T)[:, None].expand(T, n)
    with torch.no_grad():
        actions, logprobs, _, values = agent.get_action_and_value(obs, task_ids)
    mb = {"obs": obs, "task_ids": task_ids, "actions": actions, "logprobs": logprobs,
          "advantages": torch.randn(T, n), "returns": values + torch.randn(T, n), "values": values}
    per_iteration = args.update_epochs * args.num_minibatches

    def step(i: int) -> None:
        task_losses, _ = module.ppo_task_losses(args, agent, mb)
        module.method_update(args, agent, optimizer, task_losses, {"epoch": 0, "start": i, "iteration": 1})

    return step, per_iteration, n, agent, optimizer


def parse_overrides(parser: argparse.ArgumentParser, module, spec: str) -> dict:
    """"field=value,field=value" -> {field: value}, each value read as a Python literal when it is
    one (0.5, 2, True) and as a string otherwise (reparam); unknown fields are refused."""
    fields = {f.name for f in dataclasses.fields(module.Args)}
    overrides = {}
    for item in filter(None, spec.split(",")):
        field, sep, text = item.partition("=")
        if not sep or field not in fields:
            parser.error(f"'{item}' is not field=value with a field of {module.ALGO}'s Args "
                         f"(e.g. ppo_varshare:estimator=reparam)")
        try:
            overrides[field] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[field] = text
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scripts", nargs="*", help="default: every multi-task script in algos/ and VarShare "
                        "with --estimator reparam; a variant is written name:field=value")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    scripts = opts.scripts or sorted(os.path.basename(p)[:-3]
                                     for p in glob.glob(os.path.join(ROOT, "algos", "ppo_*.py")))
    scripts = ["ppo_mtl_embed"] + [s for s in scripts if s not in ("ppo_single", "ppo_mtl_embed")]
    if not opts.scripts:
        scripts.append("ppo_varshare:estimator=reparam")
    for env_id, shape in SHAPES.items():
        steps, timings = {}, {}
        for script in scripts:  # "name" or "name:field=value,field=value" (an Args variant)
            name, _, spec = script.partition(":")
            if not os.path.exists(os.path.join(ROOT, "algos", f"{name}.py")):
                known = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "algos", "ppo_*.py")))
                parser.error(f"no script algos/{name}.py; choose from {', '.join(known)}")
            module = load(name)
            steps[script] = setup(module, env_id, shape, parse_overrides(parser, module, spec))
            for i in range(3):  # warm-up
                steps[script][0](i + 1)
            timings[script] = []
        for rep in range(opts.reps):
            for script in scripts:
                tic = time.perf_counter()
                steps[script][0](rep + 1)
                timings[script].append(time.perf_counter() - tic)
        base = np.median(timings["ppo_mtl_embed"])
        n = steps["ppo_mtl_embed"][2]
        print(f"\n{env_id}: {n} transitions per task per minibatch, "
              f"{steps['ppo_mtl_embed'][1]} minibatches per iteration, "
              f"torch threads {opts.threads}, {opts.reps} interleaved rounds")
        print("| script | median ms per minibatch update | ms per iteration | ratio to ppo_mtl_embed |")
        print("|---|---|---|---|")
        for script in scripts:
            med = np.median(timings[script])
            print(f"| {script} | {med * 1e3:.2f} | {med * 1e3 * steps[script][1]:.0f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
