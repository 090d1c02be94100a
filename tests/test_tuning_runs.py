"""benchmarks/mt3_tune.sh: every listed tuning run names a script and flags that parse, once per
group/name, so that the README's tuning table can be redone from it; a name it does not list is
refused."""

from __future__ import annotations

import re
import shlex
import subprocess

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
