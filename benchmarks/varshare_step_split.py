"""How VarShare's optimiser steps split between the shared theta and the task residuals mu.

Runs ``algos/ppo_varshare.py`` with the flags given after ``--`` and wraps its ``method_update``
(nothing else changes) to measure, per layer, every optimiser step of mu_t against theta's:

- step: mean ||d mu_t|| / ||d theta|| over the steps (how much of each change of the acting
  weights W_t = theta + mu_t is the residual's);
- net/path: ||x_end - x_start|| / sum_k ||d x_k|| over one update phase (epochs x minibatches
  steps) and over ``--horizon`` whole iterations: 1 when every step goes the same way, about
  1 / sqrt(steps) for a random walk, near 0 when a pull undoes the steps.

A prior that undoes mu's steps shows as a mu net/path over many iterations far below theta's:
the residual's share of each step is spent and then taken back.

    .venv/bin/python benchmarks/varshare_step_split.py --windows 4 -- --env-id mt3-tune \\
        --total-timesteps 300000 --runs-dir /tmp/split
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from shared.scripts import load_script  # noqa: E402


class StepSplit:
    """Per-step and per-iteration norms of theta's and each task's mu's changes, per layer."""

    def __init__(self, horizon: int):
        self.horizon = horizon
        self.records: list[dict] = []  # one per iteration
        self.anchors: list[dict] = []  # parameters at the start of each iteration
        self.steps_per_iteration = None
        self.calls = 0

    def params(self, agent) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: (layer.theta.detach().clone(), layer.mu.detach().clone())
                for name, layer in zip(agent.layer_names(), agent.layers(), strict=True)}

    def wrap(self, update):
        def method_update(args, agent, optimizer, task_losses, info):
            if self.steps_per_iteration is None:
                if args.target_kl is not None:
                    raise SystemExit("varshare_step_split.py: --target-kl ends update phases early; "
                                     "leave it unset so each phase has epochs x minibatches steps")
                self.steps_per_iteration = args.update_epochs * args.num_minibatches
            if self.calls % self.steps_per_iteration == 0:
                self.anchors.append(self.params(agent))
                self.path = {name: [0.0, torch.zeros(agent.num_tasks)] for name in self.anchors[-1]}
                self.ratio = {name: torch.zeros(agent.num_tasks) for name in self.anchors[-1]}
            before = self.params(agent)
            stats = update(args, agent, optimizer, task_losses, info)
            after = self.params(agent)
            for name, (theta0, mu0) in before.items():
                d_theta = (after[name][0] - theta0).norm().item()
                d_mu = (after[name][1] - mu0).flatten(1).norm(dim=1)  # [T]
                self.path[name][0] += d_theta
                self.path[name][1] += d_mu
                self.ratio[name] += d_mu / max(d_theta, 1e-12)
            self.calls += 1
            if self.calls % self.steps_per_iteration == 0:
                self.close_iteration(after)
            return stats
        return method_update

    def close_iteration(self, now: dict) -> None:
        start = self.anchors[-1]
        record = {}
        for name, (theta, mu) in now.items():
            path_theta, path_mu = self.path[name]
            record[name] = {
                "step": (self.ratio[name] / self.steps_per_iteration).tolist(),
                "path_theta": path_theta, "path_mu": path_mu.tolist(),
                "net_theta": (theta - start[name][0]).norm().item(),
                "net_mu": (mu - start[name][1]).flatten(1).norm(dim=1).tolist(),
            }
        self.records.append(record)
        if len(self.anchors) >= self.horizon:  # the last horizon iterations: net over them, path summed
            first = self.anchors[-self.horizon]
            window = self.records[-self.horizon:]
            for name, (theta, mu) in now.items():
                record[name]["long_net_theta"] = (theta - first[name][0]).norm().item()
                record[name]["long_net_mu"] = (mu - first[name][1]).flatten(1).norm(dim=1).tolist()
                record[name]["long_path_theta"] = sum(r[name]["path_theta"] for r in window)
                record[name]["long_path_mu"] = [sum(r[name]["path_mu"][t] for r in window)
                                                for t in range(len(mu))]
            self.anchors[-self.horizon] = None  # each anchor starts one window: drop it once read


def ratio(net, path) -> float:
    """net / path, averaged over tasks when given per task."""
    if isinstance(net, list):
        return sum(n / max(p, 1e-12) for n, p in zip(net, path, strict=True)) / len(net)
    return net / max(path, 1e-12)


def layer_row(chunk: list[dict], name: str) -> list[float]:
    """One layer's five columns, each a mean over the chunk's iterations (long ones over those that have it)."""
    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else float("nan")
    rows = [r[name] for r in chunk]
    long_rows = [r for r in rows if "long_net_theta" in r]
    return [mean(sum(r["step"]) / len(r["step"]) for r in rows),
            mean(ratio(r["net_theta"], r["path_theta"]) for r in rows),
            mean(ratio(r["net_mu"], r["path_mu"]) for r in rows),
            mean(ratio(r["long_net_theta"], r["long_path_theta"]) for r in long_rows),
            mean(ratio(r["long_net_mu"], r["long_path_mu"]) for r in long_rows)]


def summarise(records: list[dict], windows: int, horizon: int) -> list[str]:
    lines = [f"per layer, mean over tasks; windows of the run's iterations; long = over {horizon} iterations",
             f"{'iterations':>12} {'layer':>8} {'step mu/theta':>14} {'net/path theta':>15} {'net/path mu':>12} "
             f"{'long theta':>11} {'long mu':>8}"]
    n = len(records)
    bounds = [round(i * n / windows) for i in range(windows + 1)]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        chunk = records[a:b]
        for name in (chunk[0] if chunk else {}):
            step, net_theta, net_mu, long_theta, long_mu = layer_row(chunk, name)
            lines.append(f"{f'{a + 1}-{b}':>12} {name:>8} {step:14.3f} {net_theta:15.3f} {net_mu:12.3f} "
                         f"{long_theta:11.3f} {long_mu:8.3f}")
    return lines


def main() -> None:
    if "--" not in sys.argv:
        raise SystemExit("usage: varshare_step_split.py [--windows N] [--horizon K] [--out FILE] "
                         "-- <ppo_varshare.py flags>")
    split = sys.argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=4, help="rows per layer in the printed table")
    parser.add_argument("--horizon", type=int, default=10, help="iterations in the long net/path window")
    parser.add_argument("--out", default=None, help="write the per-iteration records here (JSON)")
    opts = parser.parse_args(sys.argv[1:split])
    if opts.windows < 1 or opts.horizon < 1:
        raise SystemExit("varshare_step_split.py: --windows and --horizon must be at least 1")
    module = load_script("ppo_varshare")
    recorder = StepSplit(opts.horizon)
    module.method_update = recorder.wrap(module.method_update)
    sys.argv = [os.path.join(ROOT, "algos", "ppo_varshare.py"), *sys.argv[split + 1:]]
    module.run_cli(module.main, module.Args)
    if not recorder.records:
        raise SystemExit("varshare_step_split.py: the run made no full update phase; "
                         "give it a larger --total-timesteps")
    print("\n".join(summarise(recorder.records, opts.windows, opts.horizon)))
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(recorder.records, f)


if __name__ == "__main__":
    main()
