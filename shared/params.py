"""Parameter counting (PROTOCOL section 5) and a width solver.

Three counts per agent:
- ``total``: every stored parameter;
- ``active``: parameters of the network that computes one task's forward pass at inference, after
  everything fixed by the task is folded into plain weights (VarShare: theta + mu_m is one matrix;
  PaCo: sum_k w_tk V_k is one matrix; shared MTL: the one-hot column or embedding row folds into
  the first layers' biases);
- ``trained_per_task``: parameters that receive gradient from one task's data.

Convention: a parameter whose first axis indexes tasks is marked with ``per_task(p)``; only its
slice for one task is active / trained for that task. Agents with other structure (folded
residuals, K copies) say so through ``active_parameter_count`` / ``trained_parameter_count``.
"""

from __future__ import annotations

from typing import Callable

import torch


def per_task(p: torch.nn.Parameter) -> torch.nn.Parameter:
    p.per_task = True
    return p


def is_per_task(p: torch.Tensor) -> bool:
    return getattr(p, "per_task", False)


def default_counts(module: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in module.parameters())
    one_task = sum(p.numel() // p.shape[0] if is_per_task(p) else p.numel() for p in module.parameters())
    return {"total": total, "active": one_task, "trained_per_task": one_task}


def count_parameters(agent: torch.nn.Module) -> dict[str, int]:
    counts = default_counts(agent)
    if hasattr(agent, "active_parameter_count"):
        counts["active"] = agent.active_parameter_count()
    if hasattr(agent, "trained_parameter_count"):
        counts["trained_per_task"] = agent.trained_parameter_count()
    return counts


def mlp_count(sizes: list[int]) -> int:
    """Weights and biases of a plain MLP with layer sizes [in, h1, ..., out]."""
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def solve_width(count_at_width: Callable[[int], int], target: int, low: int = 1, high: int = 1 << 16) -> int:
    """The width whose count is closest to ``target``; ``count_at_width`` must increase with width."""
    while high - low > 1:
        mid = (low + high) // 2
        if count_at_width(mid) <= target:
            low = mid
        else:
            high = mid
    return min((low, high), key=lambda w: abs(count_at_width(w) - target))
