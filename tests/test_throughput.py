"""benchmarks/throughput.py: one short run prints the machine, the raw rate and one row per method."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import PYTHON, REPO, subprocess_env

TINY = ["--", "--num-steps", "16", "--num-minibatches", "2", "--update-epochs", "1"]


def run_throughput(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(REPO / "benchmarks" / "throughput.py"), *argv], capture_output=True, text=True,
                          timeout=300, env=subprocess_env(), cwd=REPO)


def test_table_has_the_raw_rate_and_one_row_per_method_with_the_machine_named():
    proc = run_throughput("--env-id", "cartpole-mt", "--iterations", "1", "--raw-seconds", "0",
                          "--methods", "ppo_mtl_embed", "ppo_pcgrad", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "5 tasks x 4 envs per task, 16 steps per rollout" in out  # the pass-through flag reached the scripts
    assert re.search(r"device cpu; \d+ cores usable of \d+", out) and "torch threads 1" in out
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ") and not line.startswith("| method")}
    assert list(rows) == ["raw random-action stepping", "ppo_mtl_embed", "ppo_pcgrad"]
    for name in ("ppo_mtl_embed", "ppo_pcgrad"):
        rollout, update, end_to_end, ratio, share, _ = rows[name]
        assert float(rollout.replace(",", "")) > float(end_to_end.replace(",", "")) > 0
        assert float(update) > 0 and 0 < float(share) < 1 and float(ratio) > 0


def test_unknown_method_is_refused_with_the_known_ones():
    proc = run_throughput("--methods", "ppo_nope")
    assert proc.returncode == 2
    assert "no script algos/ppo_nope.py" in proc.stderr and "ppo_mtl_embed" in proc.stderr
