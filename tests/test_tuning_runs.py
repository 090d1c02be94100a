"""benchmarks/mt3_tune.sh: every listed tuning run names a script and flags that parse, once per
group/name, so that the README's tuning table can be redone from it; a name it does not list is
refused."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import tyro

from tests.conftest import REPO, load_script


def listed_runs() -> list[tuple[str, str, str, list[str]]]:
    text = (REPO / "benchmarks" / "mt3_tune.sh").read_text()
    block = re.search(r"<<'EOF'\n(.*?)\nEOF", text, re.S).group(1)
    runs = []
    for line in block.splitlines():
        name, group, seed, command = line.split("|")
        script, *flags = shlex.split(command)
        runs.append((f"{group}/{name}", seed, script, flags))
    return runs


def test_every_tuning_run_parses_and_is_listed_once():
    runs = listed_runs()
    keys = [key for key, *_ in runs]
    assert len(runs) >= 30 and len(keys) == len(set(keys))
    for key, seed, script, flags in runs:
        assert script.endswith(".py") and seed.isdigit(), key
        module = load_script(script.removesuffix(".py"))
        args = tyro.cli(module.Args, args=["--env-id", "mt3-tune", "--seed", seed, *flags])
        assert args.env_id == "mt3-tune", key


def test_an_unknown_run_is_refused_with_the_list_named():
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "mt3_tune.sh"), "tune-ppo/nope"], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2 and "no run 'tune-ppo/nope'" in proc.stderr
    listing = subprocess.run(["bash", str(REPO / "benchmarks" / "mt3_tune.sh")], capture_output=True, text=True,
                             cwd=REPO, timeout=60)
    assert listing.returncode == 0 and "tune-varshare/g0.12-b3" in listing.stdout


def test_tuning_table_reports_the_metrics_of_each_run(tmp_path):
    """One finished run and one unfinished: the table shows the differing flag, final and mean
    success, and the training return per task over the last fifth of the logged steps only."""
    from torch.utils.tensorboard import SummaryWriter

    for name, lr, finished, extra in (("a", 3e-4, True, {}), ("b", 1e-3, False, {"init_logstd": 0.0})):
        run = tmp_path / name
        run.mkdir()
        args = {"env_id": "mt3-tune", "algo": "ppo_mtl_embed", "seed": 1, "learning_rate": lr, **extra,
                "total_timesteps": 1000, "run_name_suffix": name}
        (run / "args.json").write_text(json.dumps(args))
        evals = [{"global_step": 500, "success_rate": 0.2, "final": False},
                 {"global_step": 1000, "success_rate": 0.4, "final": False}]
        (run / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
        if finished:
            summary = {"final_success_rate": 0.5, "global_step": 1000, "wall_time_s": 120,
                       "per_task": {"push-wall-v3": {"success_rate": 0.5}}}
            (run / "summary.json").write_text(json.dumps(summary))
        writer = SummaryWriter(str(run))
        for step in range(100, 1001, 100):  # the last fifth is steps 900 and 1000
            writer.add_scalar("charts/push-wall-v3/episodic_return", step / 10, step)
        writer.close()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tuning_table.py"),
                           str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    row_a, row_b = (line for line in proc.stdout.splitlines() if "| ppo_mtl_embed |" in line)
    assert "learning_rate=0.0003" in row_a and "| 0.500 | 0.300 |" in row_a and "push-wall-v3=95 " in row_a
    assert "| 2 |" in row_a and "init_logstd=absent" in row_a  # wall time in minutes; a flag the run predates
    assert "unfinished (last evaluation 0.400)" in row_b and "push-wall-v3=95 " in row_b


def test_an_entrys_own_flags_come_last_so_it_can_set_its_budget(tmp_path):
    """The fixed budget (1M) comes first on the command line and an entry's flags after it, so the
    tune-2m entries really run 2M steps (the last value of a repeated flag wins)."""
    argv_file = tmp_path / "argv"
    fake_python = tmp_path / "python"
    fake_python.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> {argv_file}\necho END >> {argv_file}\n')
    fake_python.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake_python), "RUNS_ROOT": str(tmp_path / "runs")}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "mt3_tune.sh"), "tune-2m/mtl-defaults",
                           "tune-ppo/defaults"], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = argv_file.read_text().split("END\n")[:2]
    budgets = []
    for call in calls:
        script, *flags = call.split()
        args = tyro.cli(load_script(script.removeprefix("algos/").removesuffix(".py")).Args, args=flags)
        assert args.env_id == "mt3-tune" and args.runs_dir.startswith(str(tmp_path / "runs"))
        budgets.append(args.total_timesteps)
    assert budgets == [2_000_000, 1_000_000]
