"""Checkpoints: agent, optimiser, normalisers, RNG states and global step, written atomically.

The file is replaced only by a complete newer one (write to a temporary name, then rename), so a
crash or a diverged update never destroys the last good checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
import random

import numpy as np
import torch

from shared.cli import UsageError


def save_checkpoint(path: str, agent, optimizer, obs_normalizer, reward_scaler, global_step: int,
                    extra: dict | None = None) -> None:
    state = {
        "agent": agent.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "obs_normalizer": obs_normalizer.state_dict(),
        "reward_scaler": reward_scaler.state_dict() if reward_scaler is not None else None,
        "global_step": int(global_step),
        "rng": {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
        "extra": extra or {},
    }
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, agent, optimizer=None, obs_normalizer=None, reward_scaler=None,
                    restore_rng: bool = True) -> dict:
    """Load into the given objects (those passed as None are skipped); returns the raw state."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    agent.load_state_dict(state["agent"])
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if obs_normalizer is not None:
        obs_normalizer.load_state_dict(state["obs_normalizer"])
    if reward_scaler is not None and state["reward_scaler"] is not None:
        reward_scaler.load_state_dict(state["reward_scaler"])
    if restore_rng:
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


def resume_args(args, algo: str):
    """The arguments of the interrupted run in ``args.resume``: its own args.json, checked.

    ``--resume RUN_DIR`` continues a run with the flags it started with; any other flag given
    with it would be silently ignored, so it is refused. A directory of another method, or one
    without a readable args.json, gets one sentence (exit code 2)."""
    run_dir, args_cls = args.resume, type(args)
    defaults = args_cls()
    given = {f.name for f in dataclasses.fields(args_cls)
             if f.name != "resume" and getattr(args, f.name) != getattr(defaults, f.name)}
    if given:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in sorted(given))
        raise UsageError(f"--resume continues a run with its own flags (its args.json); drop {flags}")
    path = os.path.join(run_dir, "args.json")
    if not os.path.isfile(path):
        raise UsageError(f"--resume {run_dir}: no args.json there, so it is not a run directory")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        raise UsageError(f"--resume {run_dir}: its args.json cannot be read ({err})") from None
    if saved.get("algo") != algo:
        raise UsageError(f"--resume {run_dir}: that run is {saved.get('algo')}, not {algo}; "
                         f"resume it with algos/{saved.get('algo')}.py")
    values = {}
    for field in dataclasses.fields(args_cls):
        if field.name in saved:
            value = saved[field.name]
            # JSON has no tuples: hidden sizes come back as lists
            values[field.name] = tuple(value) if isinstance(value, list) and "tuple" in str(field.type) else value
    values["resume"] = run_dir
    return args_cls(**values)


def resume_checkpoint(run_dir: str, algo: str, agent, optimizer, obs_normalizer, reward_scaler) -> dict:
    """Load the run's last checkpoint into the fresh objects (RNG states included) and return it;
    a missing, corrupt or foreign checkpoint gets one sentence (exit code 2)."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        raise UsageError(f"--resume {run_dir}: no checkpoint.pt yet (the run stopped before its first "
                         f"checkpoint); start it afresh")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        extra = state["extra"]
    except Exception as err:  # a truncated or foreign file: torch, pickle and zip errors alike
        raise UsageError(f"--resume {run_dir}: checkpoint.pt cannot be read ({type(err).__name__}); "
                         f"it is corrupt, so start the run afresh") from None
    if extra.get("algo") != algo or "iteration" not in extra:
        raise UsageError(f"--resume {run_dir}: checkpoint.pt was written by {extra.get('algo')}, not by {algo}'s "
                         f"training loop; start the run afresh")
    try:
        load_checkpoint(path, agent, optimizer, obs_normalizer, reward_scaler)
    except (RuntimeError, KeyError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--resume {run_dir}: checkpoint.pt does not fit this run's agent ({first_line})") from None
    return state
