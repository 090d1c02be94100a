"""Capacity table: the three parameter counts of every method at a suite's default widths, and
the shared-MTL width that matches VarShare's total stored count.

    .venv/bin/python -m shared.capacity [--suites cartpole-mt mt10]

Agents are built by each script's own ``make_agent`` at the suite table's defaults (no env is
stepped); counts come from ``shared.params.count_parameters``.
"""

from __future__ import annotations

import argparse
import glob
import os

import torch

from shared.params import count_parameters, solve_width
from shared.scripts import load_script
from shared.suites import apply_suite_defaults, make_suite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Observation size, action size, discrete: what the suite's envs report (fixed by the envs).
SUITE_SPACES = {"cartpole-mt": (4, 2, True), "cartpole-conflict": (4, 2, True), "cartpole-identical": (4, 2, True),
                "lunarlander-mt": (8, 4, True), "mt3-tune": (39, 4, False), "mt3": (39, 4, False),
                "mt10": (39, 4, False)}


def build_agent(module, env_id: str, **overrides):
    suite = make_suite(env_id)
    args = module.Args(env_id=env_id, **overrides)
    apply_suite_defaults(args, suite)
    suite = module.select_run_tasks(args, suite)  # as the core does: some scripts derive sizes here
    obs_dim, act_dim, discrete = SUITE_SPACES[env_id]
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return module.make_agent(args, suite, obs_dim, act_dim, discrete)


def matched_mtl_width(env_id: str, target_total: int, **overrides) -> tuple[int, int]:
    """Hidden width w of ppo_mtl_embed (same depth as the suite default, or as ``hidden_sizes`` in
    ``overrides``, its other flags) whose total parameter count is closest to ``target_total``;
    returns (w, its total)."""
    mtl = load_script("ppo_mtl_embed")
    depth = len(overrides.pop("hidden_sizes", None) or make_suite_defaults(env_id)["hidden_sizes"])

    def total(width: int) -> int:
        return count_parameters(build_agent(mtl, env_id, **overrides, hidden_sizes=(width,) * depth))["total"]

    width = solve_width(total, target_total, high=1 << 14)
    return width, total(width)


def make_suite_defaults(env_id: str) -> dict:
    from shared.suites import SUITE_DEFAULTS

    return SUITE_DEFAULTS[make_suite(env_id).defaults]


def capacity_table(env_ids: list[str]) -> str:
    scripts = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "algos", "ppo_*.py")))
    lines = ["| suite | method | total | active at inference | trained per task |", "|---|---|---|---|---|"]
    for env_id in env_ids:
        varshare_total = None
        for script in scripts:
            counts = count_parameters(build_agent(load_script(script), env_id))
            if script == "ppo_varshare":
                varshare_total = counts["total"]
            lines.append(f"| {env_id} | {script} | {counts['total']:,} | {counts['active']:,} "
                         f"| {counts['trained_per_task']:,} |")
        if varshare_total is not None:
            width, total = matched_mtl_width(env_id, varshare_total)
            depth = len(make_suite_defaults(env_id)["hidden_sizes"])
            counts = count_parameters(build_agent(load_script("ppo_mtl_embed"), env_id, hidden_sizes=(width,) * depth))
            lines.append(f"| {env_id} | ppo_mtl_embed at width {width} (VarShare's total) | {counts['total']:,} "
                         f"| {counts['active']:,} | {counts['trained_per_task']:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suites", nargs="+", default=["cartpole-mt", "mt10"], choices=sorted(SUITE_SPACES))
    print(capacity_table(parser.parse_args().suites))


if __name__ == "__main__":
    main()
