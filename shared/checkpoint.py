"""Checkpoints: agent, optimiser, normalisers, RNG states and global step, written atomically.

The file is replaced only by a complete newer one (write to a temporary name, then rename), so a
crash or a diverged update never destroys the last good checkpoint."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


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
