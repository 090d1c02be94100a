"""A progress line on stdout at least every ``interval`` seconds of wall time.

The training loop calls ``tick`` once per env step and once per minibatch update: a clock read
and a comparison, so a line appears on time even inside a long update. The line says how far the
run is, how fast it goes, when it will end, where the time goes, and how the last iteration's
training episodes scored:

    [mt10 ppo_varshare seed 1] 120,000/20,000,000 steps (0.6%) | 410 steps/s | ETA 13h28m |
    rollout 38% / update 62% | last iteration: success 0.05, return 312.4 | updating
"""

from __future__ import annotations

import time


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
    def __init__(self, label: str, total_steps: int, interval: float = 30.0, clock=time.monotonic,
                 start_step: int = 0):
        """``start_step``: where a resumed run starts (its rate counts the steps done since)."""
        self.label, self.total_steps, self.interval, self.clock = label, total_steps, interval, clock
        self.start_step = start_step
        self.start = self.last_print = clock()
        self.rollout_time = self.update_time = 0.0
        self.last_episodes = ""

    def phase_times(self, rollout_time: float, update_time: float) -> None:
        """Add one iteration's phase times (for the rollout / update split)."""
        self.rollout_time += rollout_time
        self.update_time += update_time

    def episodes(self, returns: list[float], successes: list[float] | None) -> None:
        """The last iteration's finished training episodes (successes None: the suite has none)."""
        if not returns:
            return
        parts = [] if successes is None else [f"success {sum(successes) / len(successes):.2f}"]
        parts.append(f"return {sum(returns) / len(returns):.1f}")
        self.last_episodes = "last iteration: " + ", ".join(parts)

    def tick(self, global_step: int, phase: str) -> str | None:
        """Print (and return) a line when ``interval`` seconds passed since the last one."""
        now = self.clock()
        if now - self.last_print < self.interval:
            return None
        self.last_print = now
        elapsed = now - self.start
        rate = (global_step - self.start_step) / elapsed if elapsed > 0 else 0.0
        eta = format_duration((self.total_steps - global_step) / rate) if rate > 0 else "?"
        parts = [f"[{self.label}] {global_step:,}/{self.total_steps:,} steps "
                 f"({100 * global_step / self.total_steps:.1f}%)", f"{rate:,.0f} steps/s", f"ETA {eta}"]
        measured = self.rollout_time + self.update_time
        if measured > 0:
            parts.append(f"rollout {100 * self.rollout_time / measured:.0f}% / "
                         f"update {100 * self.update_time / measured:.0f}%")
        if self.last_episodes:
            parts.append(self.last_episodes)
        parts.append(phase)
        line = " | ".join(parts)
        print(line, flush=True)
        return line
