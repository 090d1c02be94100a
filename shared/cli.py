"""Command-line entry point shared by the scripts: tyro parsing and one-sentence errors."""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Callable, TypeVar

A = TypeVar("A")


class UsageError(Exception):
    """Bad input from the user: printed as one sentence, exit code 2, no traceback."""


class TrainingDiverged(Exception):
    """A non-finite loss or parameter: the run stops, its last good checkpoint stays on disk."""


def run_cli(main: Callable[[A], object], args_cls: type[A]) -> None:
    import tyro

    args = tyro.cli(args_cls)
    try:
        check_finite(args)
        main(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as err:
        print(f"error: training diverged: {err}", file=sys.stderr)
        sys.exit(3)


def check_budget(total_timesteps: int, batch_size: int) -> int:
    """Number of PPO iterations; refuses a budget smaller than one rollout."""
    if total_timesteps < batch_size:
        raise UsageError(
            f"--total-timesteps {total_timesteps} is smaller than one rollout ({batch_size} steps = "
            f"num_tasks x num_envs_per_task x num_steps); raise it or shorten --num-steps"
        )
    return total_timesteps // batch_size


def check_positive(**values: int | float) -> None:
    # Written as "not (finite and > 0)": a NaN compares false with everything, so "value <= 0" let it through.
    for name, value in values.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a positive finite number, got {value}")


def check_finite(args) -> None:
    """Refuse a NaN or infinite value in any float flag of a script's Args (tyro parses "nan" and
    "inf" as floats): one check for every script and every float flag, including the ones whose
    range no other check constrains (entropy and value coefficients, target KL, method weights)."""
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        values = value if isinstance(value, (tuple, list)) else (value,)
        for item in values:
            if isinstance(item, float) and not math.isfinite(item):
                raise UsageError(f"--{field.name.replace('_', '-')} is {value}; give a finite number")


def check_writable(runs_dir: str) -> None:
    """Create ``--runs-dir`` if needed; refuse one that cannot be created or written."""
    import os

    try:
        os.makedirs(runs_dir, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--runs-dir {runs_dir} cannot be created ({err.strerror}); choose a writable "
                         f"folder") from None
    if not os.access(runs_dir, os.W_OK):
        raise UsageError(f"--runs-dir {runs_dir} is not writable; choose a writable folder")
