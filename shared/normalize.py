"""Running observation normaliser and per-task return-based reward scaling (numpy, float64 stats)."""

from __future__ import annotations

import numpy as np


class RunningMeanStd:
    """Running mean and variance of values of shape ``shape``; batches are stacked on axis 0."""

    def __init__(self, shape: tuple[int, ...], epsilon: float = 1e-4):
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = epsilon

    def update(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch, dtype=np.float64)  # observations arrive as float32: keep the stats float64
        batch_mean, batch_var, n = batch.mean(axis=0), batch.var(axis=0), batch.shape[0]
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean = self.mean + delta * n / total
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.var = m2 / total
        self.count = total

    def state_dict(self) -> dict:
        return {"mean": self.mean.copy(), "var": self.var.copy(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"].copy(), state["var"].copy(), float(state["count"])


class ObsNormalizer:
    """(obs - mean) / std, clipped. Stats are shared over all tasks (``per_task=False``, every
    multi-task method) or kept per task (the independent single-task oracle). Updated from rollout
    observations only; ``normalize`` never updates, so evaluation sees frozen stats."""

    def __init__(self, num_tasks: int, obs_dim: int, per_task: bool, clip: float = 10.0):
        self.per_task = per_task
        self.rms = RunningMeanStd((num_tasks, obs_dim) if per_task else (obs_dim,))
        self.clip = clip

    def update(self, obs: np.ndarray) -> None:
        """obs: [T, k, obs_dim] task-major."""
        if self.per_task:
            self.rms.update(obs.transpose(1, 0, 2))  # batch axis k, stats per task
        else:
            self.rms.update(obs.reshape(-1, obs.shape[-1]))

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        """obs: [T, k, obs_dim] -> float32, same shape."""
        mean, var = self.rms.mean, self.rms.var
        if self.per_task:
            mean, var = mean[:, None], var[:, None]
        out = (obs - mean) / np.sqrt(var + 1e-8)
        return np.clip(out, -self.clip, self.clip).astype(np.float32)

    def state_dict(self) -> dict:
        return {"per_task": self.per_task, "clip": self.clip, "rms": self.rms.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["per_task"] != self.per_task:
            raise ValueError("observation normaliser: per-task setting differs from the checkpoint")
        self.clip = state["clip"]
        self.rms.load_state_dict(state["rms"])


class RewardScaler:
    """Divide each task's rewards by the running std of that task's discounted return.

    Tasks have different reward scales; a shared scale would let the loudest task dominate the
    loss. Each env keeps its discounted return; the std is pooled over the k envs of a task."""

    def __init__(self, num_tasks: int, num_envs_per_task: int, gamma: float, clip: float = 10.0):
        self.rms = RunningMeanStd((num_tasks,))
        self.returns = np.zeros((num_tasks, num_envs_per_task), np.float64)
        self.gamma = gamma
        self.clip = clip

    def scale(self, rewards: np.ndarray, ended: np.ndarray) -> np.ndarray:
        """rewards, ended: [T, k]. Updates the stats, returns scaled float32 rewards [T, k]."""
        self.returns = self.returns * self.gamma + rewards
        self.rms.update(self.returns.T)  # batch axis k, one std per task
        scaled = rewards / np.sqrt(self.rms.var[:, None] + 1e-8)
        self.returns[ended] = 0.0
        return np.clip(scaled, -self.clip, self.clip).astype(np.float32)

    def std(self) -> np.ndarray:
        return np.sqrt(self.rms.var + 1e-8)

    def state_dict(self) -> dict:
        return {"rms": self.rms.state_dict(), "returns": self.returns.copy(), "gamma": self.gamma}

    def load_state_dict(self, state: dict) -> None:
        self.rms.load_state_dict(state["rms"])
        self.returns = state["returns"].copy()
        self.gamma = state["gamma"]
