"""--resume: a run killed with SIGKILL continues from its last checkpoint in the same directory,
ends with the budget's step count and the evaluation schedule once, with the flags it started
with; bad resume targets get one sentence and exit code 2."""

from __future__ import annotations

import fcntl
import json
import shutil
import signal
import subprocess
import time

import pytest
import torch

from shared.cli import UsageError
from tests.conftest import ALGOS, PYTHON, REPO, load_script, run_script, subprocess_env

ITERATION = 5 * 4 * 128  # cartpole-mt: 5 tasks x 4 envs x 128 steps
FLAGS = ["--env-id", "cartpole-mt", "--total-timesteps", str(10 * ITERATION), "--eval-every", str(3 * ITERATION),
         "--eval-episodes", "2", "--final-eval-episodes", "2", "--hidden-sizes", "16", "--update-epochs", "2",
         "--checkpoint-every", "0.001"]


def checkpoint_step(run_dir) -> int:
    try:
        return int(torch.load(run_dir / "checkpoint.pt", weights_only=False)["global_step"])
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


def eval_lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


def test_sigkill_then_resume_finishes_the_budget_with_each_evaluation_once(tmp_path):
    runs = tmp_path / "runs"
    proc = subprocess.Popen([PYTHON, str(ALGOS / "ppo_mtl_embed.py"), *FLAGS, "--runs-dir", str(runs)],
                            cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        run_dir = None
        # Kill between the first evaluation (step 3 x ITERATION) and the second, with a checkpoint
        # written after the evaluation: the resumed run must neither lose nor repeat an eval line.
        while time.time() < deadline and proc.poll() is None:
            found = list(runs.glob("*")) if runs.exists() else []
            if found and checkpoint_step(found[0]) >= 4 * ITERATION:
                run_dir = found[0]
                break
            time.sleep(0.02)
        assert run_dir is not None, f"no checkpoint past step {4 * ITERATION}: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed_at = checkpoint_step(run_dir)
    assert 4 * ITERATION <= killed_at < 10 * ITERATION, "the kill should land mid-run"
    assert not (run_dir / "summary.json").exists()
    args_before = (run_dir / "args.json").read_text()

    resumed = run_script("ppo_mtl_embed", ["--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run_dir} at step {killed_at}" in resumed.stdout
    assert [p.name for p in runs.iterdir()] == [run_dir.name], "resume must not start a second run directory"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 10 * ITERATION
    for label in ("", "sampled"):  # each evaluation once, and its sampled pass once
        lines = [line for line in eval_lines(run_dir) if line["label"] == label]
        periodic = [line["global_step"] for line in lines if not line["final"]]
        assert periodic == [3 * ITERATION, 6 * ITERATION, 9 * ITERATION, 10 * ITERATION], label
        assert [line["global_step"] for line in lines if line["final"]] == [10 * ITERATION], label
    assert (run_dir / "args.json").read_text() == args_before, "the run keeps the flags it started with"
    assert checkpoint_step(run_dir) == 10 * ITERATION


def finished_tiny_run(tmp_path, script="ppo_mtl_embed"):
    module = load_script(script)
    module.main(module.Args(env_id="cartpole-mt", total_timesteps=ITERATION, eval_every=ITERATION, eval_episodes=1,
                            final_eval_episodes=1, hidden_sizes=(8,), update_epochs=1, runs_dir=str(tmp_path)))
    return next(tmp_path.iterdir())


def refused(script, match, **flags):
    module = load_script(script)
    with pytest.raises(UsageError, match=match):
        module.main(module.Args(**flags))


def test_corrupt_foreign_or_missing_checkpoints_and_extra_flags_are_refused(tmp_path):
    run_dir = finished_tiny_run(tmp_path / "mtl")
    other = tmp_path / "copy"
    shutil.copytree(run_dir, other)
    refused("ppo_varshare", "that run is ppo_mtl_embed, not ppo_varshare", resume=str(other))
    refused("ppo_mtl_embed", "drop --seed", resume=str(other), seed=3)
    with open(other / "args.json") as held:  # another process still runs it
        fcntl.flock(held, fcntl.LOCK_EX)
        refused("ppo_mtl_embed", "being run by another process", resume=str(other))
    (other / "checkpoint.pt").unlink()
    refused("ppo_mtl_embed", "no checkpoint.pt yet", resume=str(other))
    refused("ppo_mtl_embed", "no args.json", resume=str(tmp_path / "nowhere"))
    # a checkpoint of another network (VarShare's) under a ppo_mtl_embed run's args
    varshare_dir = finished_tiny_run(tmp_path / "vs", "ppo_varshare")
    shutil.copy(varshare_dir / "checkpoint.pt", other / "checkpoint.pt")
    refused("ppo_mtl_embed", "written by ppo_varshare, not by ppo_mtl_embed", resume=str(other))
    # through the command line: one sentence on stderr, exit code 2, no traceback
    (other / "checkpoint.pt").write_bytes(b"not a checkpoint")
    result = run_script("ppo_mtl_embed", ["--resume", str(other)])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --resume {other}: checkpoint.pt cannot be read")


def test_unwritable_runs_dir_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    refused("ppo_mtl_embed", "cannot be created", runs_dir=str(blocker / "runs"), total_timesteps=ITERATION)


def test_resume_keeps_only_periodic_evaluations_up_to_the_checkpoint(tmp_path):
    """A run killed after its final evaluation (before summary.json) redoes that evaluation; lines
    after the checkpoint's step and a line cut short by the kill are dropped too."""
    import types

    from shared.runlog import RunLogger

    lines = [{"global_step": 100, "final": False}, {"global_step": 200, "final": False},
             {"global_step": 200, "final": True}, {"global_step": 300, "final": False}]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"global_step": 4'
    (tmp_path / "eval.jsonl").write_text(text)
    RunLogger._keep_evaluations_up_to(types.SimpleNamespace(dir=str(tmp_path)), 200)
    kept = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert kept == lines[:2]


@pytest.mark.parametrize("every,expected", [(1e-6, [1, 2, 3, 4]), (1e9, [2, 4])])
def test_checkpoints_at_evaluations_and_every_checkpoint_every_seconds(tmp_path, monkeypatch, every, expected):
    module = load_script("ppo_mtl_embed")
    saved = []
    real = module.save_checkpoint
    monkeypatch.setattr(module, "save_checkpoint", lambda path, *a, **k: (saved.append(a[4]), real(path, *a, **k)))
    module.main(module.Args(env_id="cartpole-mt", total_timesteps=4 * ITERATION, eval_every=2 * ITERATION,
                            eval_episodes=1, final_eval_episodes=1, hidden_sizes=(8,), update_epochs=1,
                            checkpoint_every=every, runs_dir=str(tmp_path)))
    assert saved == [i * ITERATION for i in expected]


def test_a_varshare_run_whose_recorded_prior_no_longer_matches_its_flags_is_not_resumed(tmp_path):
    # A run recorded under an older default prior (here: args.json's per-layer values edited to
    # another gain) must not continue under today's default without a word.
    module = load_script("ppo_varshare")
    runs = tmp_path / "runs"
    args = module.Args(env_id="cartpole-mt", total_timesteps=2 * ITERATION, eval_every=2 * ITERATION,
                       eval_episodes=1, final_eval_episodes=1, hidden_sizes=(16,), update_epochs=1,
                       runs_dir=str(runs), cuda=False)
    module.main(args)
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir()]
    module.main(module.Args(resume=str(run_dir)))  # its own prior: resumes (nothing left to do but the final line)
    recorded = json.loads((run_dir / "args.json").read_text())
    recorded["sigma_prior_per_layer"] = {name: 2 * value for name, value in recorded["sigma_prior_per_layer"].items()}
    (run_dir / "args.json").write_text(json.dumps(recorded))
    with pytest.raises(UsageError, match="the run recorded sigma_prior_per_layer"):
        module.main(module.Args(resume=str(run_dir)))
