"""Throughput of every method against the environment's own rate, from one run.

    .venv/bin/python benchmarks/throughput.py --env-id mt10 [--iterations 2] [--methods ppo_mtl_embed ...]
        [--async-envs] [--torch-threads N] [--raw-seconds 5] [-- SCRIPT FLAGS]

1. Raw stepping: the vector env that the scripts build (shared.suites.make_vector_env, the suite's
   envs per task, sync or ``--async-envs``) stepped with uniform random actions for whole rollouts'
   worth of steps, at least ``--raw-seconds`` (5 s), before the methods and again after them (the
   machine's load may drift).
2. Every method (algos/<method>.py, imported and run in this process) trains for ``--iterations``
   PPO iterations at the suite's defaults; its rollout and update times come from the script's own
   timings (``perf`` in summary.json, the first iteration skipped as warm-up when there are two or more).

The table gives, per method: rollout env steps/s (env + policy + bookkeeping), update seconds per
iteration, end-to-end env steps/s (rollout + update, evaluations excluded), that rate over the raw
rate (the mean of the two raw measurements), the update's share of an iteration, and the wall time
that the suite's default budget (``total_timesteps``) would take at that rate. Flags after ``--``
go to every script (for example ``-- --num-envs-per-task 4``), and the raw stepping uses the envs
per task that they resolve to. The scripts' own output goes to stderr; the table goes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import platform
import sys
import tempfile
import time
import traceback

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from shared.scripts import load_script  # noqa: E402
from shared.suites import (  # noqa: E402
    SUITE_DEFAULTS,
    apply_suite_defaults,
    env_seed,
    make_suite,
    make_vector_env,
    select_tasks,
)

REFERENCE = "ppo_mtl_embed"
WARMUP_STEPS = 20  # vector steps before the raw timing: first resets and MuJoCo's first calls


def script_args(name: str, env_id: str, opts, passthrough: list[str], runs_dir: str):
    """The script's Args as its command line would build them (pass-through flags included), then
    the benchmark's own settings: a budget of ``--iterations`` rollouts, evaluations kept minimal."""
    module = load_script(name, prefix="throughput")
    args = tyro.cli(module.Args, args=passthrough)
    args.env_id, args.runs_dir = env_id, runs_dir
    args.async_envs = args.async_envs or opts.async_envs
    if opts.torch_threads is not None:
        args.torch_threads = opts.torch_threads
    suite = select_tasks(make_suite(env_id), args.tasks, args.holdout_task)
    apply_suite_defaults(args, suite)
    batch_size = suite.num_tasks * args.num_envs_per_task * args.num_steps
    args.total_timesteps = opts.iterations * batch_size
    # One evaluation at the last iteration and the final one cannot be switched off; one episode each.
    args.eval_every, args.eval_episodes, args.final_eval_episodes = 10**15, 1, 1
    return module, args, suite


def raw_steps_per_second(suite, args, min_seconds: float) -> float:
    """Env steps/s of the scripts' vector env under uniform random actions: whole rollouts' worth,
    at least one and at least ``min_seconds`` (a toy suite's rollout is too short to time alone)."""
    envs, _ = make_vector_env(suite, args.num_envs_per_task, args.seed, args.async_envs)
    try:
        envs.reset(seed=env_seed(args.seed, evaluation=False))
        for _ in range(WARMUP_STEPS):
            envs.step(envs.action_space.sample())
        start, steps = time.perf_counter(), 0
        while steps == 0 or time.perf_counter() - start < min_seconds:
            for _ in range(args.num_steps):
                envs.step(envs.action_space.sample())
            steps += args.num_steps
        return steps * envs.num_envs / (time.perf_counter() - start)
    finally:
        envs.close()


def machine_line(args) -> str:
    if args.cuda and torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    else:
        device = "cpu"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = platform.processor() or platform.machine()
    return (f"device {device}; {cores} cores usable of {os.cpu_count()} ({cpu}); "
            f"torch {torch.__version__}, torch threads {args.torch_threads} in the scripts; "
            f"{'async' if args.async_envs else 'sync'} vector env")


def duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def main() -> None:
    argv = sys.argv[1:]
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="flags after -- go to every script, e.g. -- --num-envs-per-task 4")
    parser.add_argument("--env-id", default="mt10", help="any suite or env id the scripts accept")
    parser.add_argument("--iterations", type=int, default=2,
                        help="PPO iterations per method (with 2 or more the first is skipped as warm-up)")
    parser.add_argument("--methods", nargs="*", help="script names in algos/ (default: all, ppo_mtl_embed first)")
    parser.add_argument("--async-envs", action="store_true", help="step the envs in subprocesses (raw and methods)")
    parser.add_argument("--torch-threads", type=int, help="torch threads in every script (default: the scripts' own)")
    parser.add_argument("--raw-seconds", type=float, default=5.0,
                        help="time the raw stepping for at least this long (whole rollouts), before and after")
    opts = parser.parse_args(own)
    if opts.iterations < 1:
        parser.error("--iterations must be at least 1")
    known = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "algos", "ppo_*.py")))
    methods = opts.methods or [REFERENCE] + [m for m in known if m != REFERENCE]
    for name in methods:
        if name not in known:
            parser.error(f"no script algos/{name}.py; choose from {', '.join(known)}")

    with tempfile.TemporaryDirectory() as runs_dir:
        _, reference_args, suite = script_args(REFERENCE, opts.env_id, opts, passthrough, runs_dir)
        budget = SUITE_DEFAULTS[suite.defaults]["total_timesteps"]
        print(f"{opts.env_id}: {suite.num_tasks} tasks x {reference_args.num_envs_per_task} envs per task, "
              f"{reference_args.num_steps} steps per rollout; {machine_line(reference_args)}", flush=True)
        raw_before = raw_steps_per_second(suite, reference_args, opts.raw_seconds)
        rows = []
        for name in methods:
            module, args, _ = script_args(name, opts.env_id, opts, passthrough, runs_dir)
            print(f"{name}: {opts.iterations} iteration(s) ...", file=sys.stderr, flush=True)
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    perf = module.main(args)["perf"]
            except Exception as err:  # one broken method should not cost the others' numbers
                traceback.print_exc()
                rows.append((name, None, err))
                continue
            rows.append((name, perf, None))
        raw_after = raw_steps_per_second(suite, reference_args, opts.raw_seconds)
    raw = (raw_before + raw_after) / 2

    print(f"raw random-action stepping: {raw_before:,.0f} env steps/s before the methods, {raw_after:,.0f} after; "
          f"{opts.iterations} iteration(s) per method; projected wall time at the suite's default budget of "
          f"{budget:,} env steps, evaluations excluded\n")
    print("| method | rollout env steps/s | update s/iteration | end-to-end env steps/s | end-to-end / raw "
          "| update share | projected wall time |")
    print("|---|---|---|---|---|---|---|")
    print(f"| raw random-action stepping | {raw:,.0f} | - | {raw:,.0f} | 1.00 | - | {duration(budget / raw)} |")
    for name, perf, err in rows:
        if perf is None:
            print(f"| {name} | failed: {type(err).__name__}: {err} | | | | | |")
            continue
        end_to_end = perf["steps"] / (perf["rollout_time"] + perf["update_time"])
        print(f"| {name} | {perf['rollout_sps']:,.0f} | {perf['update_time']:.2f} | {end_to_end:,.0f} | "
              f"{end_to_end / raw:.2f} | {perf['update_share']:.2f} | {duration(budget / end_to_end)} |")


if __name__ == "__main__":
    main()
