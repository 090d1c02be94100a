"""How far VarShare's update cost is from the least its estimator needs, from one run.

    .venv/bin/python benchmarks/varshare_cost_floor.py [--reps 15] [--device cuda]

At each shape of benchmarks/update_cost.py this times, in interleaved rounds:
- ppo_mtl_embed's whole minibatch update (the reference, 1.00);
- VarShare's whole minibatch update, with Flipout and with --estimator reparam;
- three parts that no implementation of the estimator can skip, each run on its own with
  VarShare's shapes: the batched matmuls of forward and backward (Flipout: six per layer, four
  for the input layer, whose input needs no gradient; reparam: three and two), one standard
  normal draw per residual entry, and the fused Adam step over theta, mu and rho;
- for scale, the matmuls of ppo_mtl_embed's own update (three per linear layer, two for the
  input layers), which shows how much of the reference update is matmul.
The sum of the three parts is a floor on this machine: an update cannot cost less than its
matmuls, its noise and its optimiser step. Everything above the floor is elementwise work
(softplus, sigmoid, sign vectors, theta + mu, gradient clipping) and per-op overhead.

    .venv/bin/python benchmarks/varshare_cost_floor.py --profile 10

profiles that many Flipout updates at the MT10 shape instead (torch.profiler, self time of every
op) and prints where the time goes: the floor's three parts, softplus and sigmoid of rho, the
other elementwise work over [T, d_in, d_out] tensors, the sign draws, and the rest (activations,
loss, small tensors, Python and autograd bookkeeping).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from update_cost import SHAPES, load, setup  # noqa: E402


def matmul_work(agent, n: int, estimator: str):
    """The forward and backward matmuls of every VarShare layer, on random data of the real shapes."""
    copies = 2 if estimator == "flipout" else 1  # Flipout: a mean path and a noise path
    items = []
    for layer in agent.layers():
        T, d_in, d_out = layer.mu.shape
        first = layer in (agent.critic.layers[0], agent.actor.layers[0])
        items.append((torch.randn(T, n, d_in), torch.randn(T, n, d_out), torch.randn(T, d_in, d_out), first))

    def run() -> None:
        for x, grad_y, weight, first in items:
            for _ in range(copies):
                torch.bmm(x, weight)
                torch.bmm(x.transpose(1, 2), grad_y)
                if not first:
                    torch.bmm(grad_y, weight.transpose(1, 2))
    return run


def shared_matmul_work(agent, rows: int):
    """The forward and backward matmuls of every nn.Linear of the shared-MTL agent."""
    items = []
    for net in (agent.critic, agent.actor):
        linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
        for i, linear in enumerate(linears):
            items.append((torch.randn(rows, linear.in_features), torch.randn(rows, linear.out_features),
                          linear.weight.detach().clone(), i == 0))

    def run() -> None:
        for x, grad_y, weight, first in items:
            torch.mm(x, weight.t())
            torch.mm(grad_y.t(), x)
            if not first:
                torch.mm(grad_y, weight)
    return run


def noise_draws(agent):
    def run() -> None:
        for layer in agent.layers():
            torch.randn_like(layer.mu)
    return run


def adam_step(agent, optimizer):
    for p in agent.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return optimizer.step


MATMULS = {"aten::bmm", "aten::baddbmm", "aten::mm", "aten::addmm"}


def op_category(name: str, shapes, residual_shapes: set) -> str:
    """Which part of the update an op's self time belongs to, from its name and input shapes."""
    if name in MATMULS:
        return "batched matmuls (floor)"
    if name == "aten::normal_":
        return "normal draws (floor)"
    if name == "aten::_fused_adam_":
        return "fused Adam step (floor)"
    if name in ("aten::random_", "aten::index_select"):  # only the sign draws use them in the update
        return "Flipout's sign draws"
    residual_sized = any(tuple(shape) in residual_shapes for shape in shapes or [] if shape)
    if residual_sized and name in ("aten::softplus", "aten::sigmoid"):
        return "softplus and sigmoid of rho"
    if residual_sized:
        return "other elementwise work over [T, d_in, d_out]"
    if name.startswith("aten::"):
        return "activations, loss and small tensors"
    return "Python, autograd and optimiser bookkeeping"


def profile_update(module, overrides: dict, reps: int) -> tuple[dict, int]:
    """Self time (ms per update) of every op over ``reps`` updates at the MT10 shape, by category."""
    from torch.profiler import ProfilerActivity, profile

    step, _, n, agent, _ = setup(module, "mt10", SHAPES["mt10"], overrides)
    for i in range(3):
        step(i + 1)
    residual_shapes = {tuple(layer.mu.shape) for layer in agent.layers()} if hasattr(agent, "layers") else set()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(reps):
            step(i + 1)
    totals = collections.defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        totals[op_category(event.key, event.input_shapes, residual_shapes)] += event.self_cpu_time_total / 1e3 / reps
    return totals, n


def print_profile(mtl, varshare, reps: int) -> None:
    flipout, n = profile_update(varshare, {}, reps)
    reference, _ = profile_update(mtl, {}, reps)
    total = sum(flipout.values())
    print(f"\nmt10: where the update's time goes ({n} transitions per task per minibatch, {reps} updates "
          f"profiled, one thread; profiled updates run slower than unprofiled ones)")
    print("| part | VarShare Flipout, ms per update | share | ppo_mtl_embed, ms per update |")
    print("|---|---|---|---|")
    for name, ms in sorted(flipout.items(), key=lambda item: -item[1]):
        print(f"| {name} | {ms:.1f} | {ms / total:.0%} | {reference.get(name, 0.0):.1f} |")
    print(f"| total | {total:.1f} | 100% | {sum(reference.values()):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--profile", type=int, default=0, help="profile this many MT10 Flipout updates instead")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the agents, data and timings are")
    opts = parser.parse_args()
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if opts.profile > 0 and opts.device != "cpu":
        parser.error("--profile reads CPU self times; run it with --device cpu")
    torch.set_num_threads(1)
    torch.set_default_device(opts.device)  # agents, minibatches and random work tensors alike
    sync = torch.cuda.synchronize if opts.device.startswith("cuda") else (lambda: None)
    mtl, varshare = load("ppo_mtl_embed"), load("ppo_varshare")
    if opts.profile > 0:
        print_profile(mtl, varshare, opts.profile)
        return
    for env_id, shape in SHAPES.items():
        reference = setup(mtl, env_id, shape, {})
        flipout = setup(varshare, env_id, shape, {})
        reparam = setup(varshare, env_id, shape, {"estimator": "reparam"})
        n = flipout[2]
        work = {"ppo_mtl_embed update": reference[0],
                "VarShare update, Flipout": flipout[0],
                "VarShare update, reparam": reparam[0]}
        parts = {"matmuls, ppo_mtl_embed": shared_matmul_work(reference[3], n * flipout[3].num_tasks),
                 "matmuls, Flipout": matmul_work(flipout[3], n, "flipout"),
                 "matmuls, reparam": matmul_work(flipout[3], n, "reparam"),
                 "normal draws": noise_draws(flipout[3]),
                 "fused Adam step": adam_step(*setup(varshare, env_id, shape, {})[3:])}
        work.update({name: (lambda i, f=f: f()) for name, f in parts.items()})
        timings = {name: [] for name in work}
        for i in range(3):
            for f in work.values():
                f(i + 1)
        for rep in range(opts.reps):
            for name, f in work.items():
                sync()
                tic = time.perf_counter()
                f(rep + 1)
                sync()  # a GPU runs asynchronously: time until the work is done
                timings[name].append(time.perf_counter() - tic)
        med = {name: float(np.median(t)) for name, t in timings.items()}
        base = med["ppo_mtl_embed update"]
        where = "one thread" if opts.device == "cpu" else f"{opts.device} ({torch.cuda.get_device_name(0)})"
        print(f"\n{env_id}: {n} transitions per task per minibatch, {opts.reps} interleaved rounds, {where}")
        print("| work | median ms | ratio to ppo_mtl_embed's update |")
        print("|---|---|---|")
        for name, t in med.items():
            print(f"| {name} | {t * 1e3:.2f} | {t / base:.2f} |")
        for estimator in ("Flipout", "reparam"):
            floor = med[f"matmuls, {estimator}"] + med["normal draws"] + med["fused Adam step"]
            print(f"| floor, {estimator} (matmuls + normal draws + Adam) | {floor * 1e3:.2f} | {floor / base:.2f} |")


if __name__ == "__main__":
    main()
