"""The experiment matrix (shared/matrix.py, run_all.sh): what it plans, what a rerun does with each
job folder, the errors it refuses with, and a tiny matrix run end to end on local workers."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time

import pytest

from shared import matrix
from shared.cli import UsageError
from tests.conftest import PYTHON, REPO, subprocess_env

# Tiny runs: cartpole-mt with one env per task and 32-step rollouts is 160 env steps per iteration.
ITERATION = 5 * 32
TINY = ["--num-envs-per-task", "1", "--num-steps", "32", "--num-minibatches", "2", "--update-epochs", "1",
        "--hidden-sizes", "8", "--eval-episodes", "1", "--final-eval-episodes", "1"]


def run_matrix(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "shared.matrix", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env or subprocess_env())


def usage_error(capsys, *args: str) -> str:
    """Run the matrix in this process and return its one-line error (exit code 2)."""
    assert matrix.main(list(args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# ----------------------------------------------------------------------------------------------
# Parsing and planning
# ----------------------------------------------------------------------------------------------
def test_seeds_budgets_and_method_names_parse():
    assert matrix.parse_seeds("1-5") == [1, 2, 3, 4, 5]
    assert matrix.parse_seeds("1,3") == [1, 3]
    assert matrix.parse_seeds("1-3,7,2") == [1, 2, 3, 7]
    for bad in ("5-1", "1-", "a", ""):
        with pytest.raises(UsageError, match="not a list of seeds"):
            matrix.parse_seeds(bad)
    assert [matrix.parse_budget(t) for t in ("60000", "60k", "20M", "1.5M")] == [60_000, 60_000, 20_000_000,
                                                                                 1_500_000]
    with pytest.raises(UsageError, match="whole, positive"):
        matrix.parse_budget("0.5")
    assert matrix.parse_methods(["all"]) == list(matrix.ROW_NAMES)
    # short names, commas, any order: the rows come in the table's order, once each
    assert matrix.parse_methods(["varshare,wide", "ppo_single", "varshare"]) == ["ppo_single", "wide", "ppo_varshare"]


def test_default_matrix_is_every_row_on_a_toy_suite_with_two_seeds(tmp_path):
    assert matrix.QUICK.runs_dir == "runs/quick"
    proc = subprocess.run(["bash", "run_all.sh", "--dry-run", "--runs-dir", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    commands = proc.stdout.strip().splitlines()
    assert len(commands) == 2 * 8 * 2, proc.stdout  # two suites x (6 scripts + wide + l2soft) x seeds 1 and 2
    for script, extra, folder in [("ppo_single", "", "ppo_single"), ("ppo_mtl_embed", "", "ppo_mtl_embed"),
                                  ("ppo_varshare", "", "ppo_varshare"), ("ppo_paco", "", "ppo_paco"),
                                  ("ppo_softmod", "", "ppo_softmod"), ("ppo_pcgrad", "", "ppo_pcgrad"),
                                  # the width shared.capacity gives on cartpole-mt (README's capacity table)
                                  ("ppo_mtl_embed", " --hidden-sizes 215 215 --run-name-suffix wide", "wide"),
                                  ("ppo_varshare", " --residual l2 --run-name-suffix l2soft", "l2soft")]:
        for suite, seed in itertools.product(("cartpole-mt", "cartpole-conflict"), (1, 2)):
            expected = (f".venv/bin/python algos/{script}.py --env-id {suite} --seed {seed} --total-timesteps "
                        f"{matrix.QUICK.budget} {' '.join(matrix.QUICK.flags)}{extra} "
                        f"--runs-dir {tmp_path}/{suite}/{folder}/seed{seed}")
            assert expected in commands, f"missing: {expected}"


def test_suites_run_at_their_own_budget_and_the_wide_row_follows_the_flags(tmp_path):
    jobs = matrix.plan(["cartpole-conflict", "mt10"], ["wide", "ppo_varshare"], [1], None, (), str(tmp_path))
    assert [(j.name, j.budget) for j in jobs] == [
        ("cartpole-conflict/wide/seed1", 1_000_000), ("cartpole-conflict/ppo_varshare/seed1", 1_000_000),
        ("mt10/wide/seed1", 20_000_000), ("mt10/ppo_varshare/seed1", 20_000_000)]
    assert jobs[2].row.flags == ("--hidden-sizes", "1867", "1867", "1867")  # README: 14,146,304 against 14,139,645
    assert jobs[0].dir == str(tmp_path / "cartpole-conflict" / "wide" / "seed1")
    # VarShare at --hidden-sizes 32 32 has fewer parameters: the matched width is computed at those flags
    narrow = matrix.plan(["cartpole-mt"], ["wide"], [1], 5000, ("--hidden-sizes", "32", "32"), str(tmp_path))
    from shared.capacity import build_agent, matched_mtl_width
    from shared.params import count_parameters
    from tests.conftest import load_script

    total = count_parameters(build_agent(load_script("ppo_varshare"), "cartpole-mt", hidden_sizes=(32, 32)))["total"]
    width = matched_mtl_width("cartpole-mt", total)[0]
    assert narrow[0].row.flags == ("--hidden-sizes", str(width), str(width)) and width < 215
    # the row's own flags come last, so that they define the row whatever the flags for every script say
    assert narrow[0].argv()[-4:] == ["--hidden-sizes", str(width), str(width), "--run-name-suffix", "wide"][-4:]


def test_unknown_suite_method_or_flags_get_one_sentence_and_exit_2(capsys, tmp_path):
    assert "unknown suite 'mt11'" in usage_error(capsys, "--suite", "mt11", "--dry-run")
    assert "unknown method 'varshar'" in usage_error(capsys, "--methods", "varshar", "--dry-run")
    assert "--seed after -- is set by the matrix" in usage_error(capsys, "--dry-run", "--", "--seed", "3")
    err = usage_error(capsys, "--methods", "varshare", "mtl_embed", "--dry-run", "--", "--beta", "2")
    assert "algos/ppo_mtl_embed.py refuses the flags after -- (Unrecognized options: --beta, 2)" in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert f"--runs-dir {blocker}/runs cannot be created" in usage_error(
        capsys, "--methods", "ppo_mtl_embed", "--runs-dir", str(blocker / "runs"))
    assert "--mem does nothing with --launcher local" in usage_error(capsys, "--mem", "4G", "--dry-run")
    assert "--jobs does nothing with --launcher slurm" in usage_error(capsys, "--launcher", "slurm", "--jobs", "2",
                                                                      "--dry-run")


def test_slurm_launcher_without_sbatch_on_the_path_is_refused(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # CI installs Slurm for its own test: hide it here
    err = usage_error(capsys, "--launcher", "slurm", "--methods", "ppo_mtl_embed", "--runs-dir", str(tmp_path))
    assert "--launcher slurm needs sbatch on the PATH" in err and "--launcher local" in err


# ----------------------------------------------------------------------------------------------
# What a rerun does with each job folder
# ----------------------------------------------------------------------------------------------
def fake_run(job: matrix.Job, name: str, *, checkpoint=False, summary=None) -> str:
    """A run directory as the script leaves it: args.json, perhaps checkpoint.pt and summary.json."""
    run_dir = os.path.join(job.dir, name)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump({"env_id": job.suite, "algo": job.row.script, "seed": job.seed}, f)
    if checkpoint:
        open(os.path.join(run_dir, "checkpoint.pt"), "wb").close()
    if summary is not None:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            f.write(summary)
    return run_dir


def test_a_rerun_skips_finished_resumes_checkpointed_and_restarts_the_rest(tmp_path):
    jobs = matrix.plan(["cartpole-mt"], ["ppo_mtl_embed"], [1, 2, 3, 4, 5], 2 * ITERATION, tuple(TINY), str(tmp_path))
    finished, checkpointed, cut_short, stale, missing = jobs
    fake_run(finished, "a", checkpoint=True, summary=json.dumps({"per_task": {"standard": {}}}))
    resumable = fake_run(checkpointed, "a", checkpoint=True)
    fake_run(cut_short, "a", checkpoint=True, summary='{"per_task": {"stand')  # killed while writing it
    fake_run(stale, "a")  # stopped before its first checkpoint
    assert matrix.next_action(finished)[0] == "finished"
    assert matrix.next_action(checkpointed) == ("resume", resumable)
    assert matrix.next_action(cut_short)[0] == "resume"
    assert matrix.next_action(stale) == ("start", None)
    assert matrix.next_action(missing) == ("start", None)

    proc = run_matrix("--suites", "cartpole-mt", "--methods", "ppo_mtl_embed", "--seeds", "1-5", "--budget",
                      str(2 * ITERATION), "--runs-dir", str(tmp_path), "--dry-run", "--", *TINY)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "# skip cartpole-mt/ppo_mtl_embed/seed1: finished"
    assert lines[1] == f".venv/bin/python algos/ppo_mtl_embed.py --resume {resumable}"  # outside the repository:
    # absolute paths
    assert "--resume" in lines[2] and "--runs-dir" in lines[3] and "--runs-dir" in lines[4]
    assert len(lines) == 5


def test_progress_of_a_running_job_comes_from_the_end_of_its_log(tmp_path):
    job, = matrix.plan(["cartpole-mt"], ["ppo_mtl_embed"], [1], ITERATION, (), str(tmp_path))
    assert matrix.last_progress(job) == ""
    os.makedirs(job.dir)
    log = os.path.join(job.dir, "job.log")
    with open(log, "w") as f:
        f.write("cartpole-mt ppo_mtl_embed seed 1: building 20 training and 5 evaluation envs\n")
    assert matrix.last_progress(job) == ""
    with open(log, "a") as f:
        f.write("[cartpole-mt ppo_mtl_embed seed 1] 2,560/40,960 steps (6.2%) | 512 steps/s | ETA 1m15s\n")
    assert matrix.last_progress(job) == "2,560/40,960 steps"
    with open(log, "a") as f:
        f.write("step 10240: eval success 0.200 return 252.4 standard=187.8\n")
    assert matrix.last_progress(job) == "step 10,240"


def test_a_job_held_by_another_process_is_never_started_twice(tmp_path):
    job, = matrix.plan(["cartpole-mt"], ["ppo_mtl_embed"], [1], ITERATION, tuple(TINY), str(tmp_path))
    holder = matrix.JobLock(job)
    assert holder.acquire() and matrix.is_running(job)
    try:
        assert matrix.Runner(PYTHON, "local").run(job, lock_wait=0.0) == ("busy", None)
        proc = run_matrix("--suites", "cartpole-mt", "--methods", "ppo_mtl_embed", "--seeds", "1", "--budget",
                          str(ITERATION), "--runs-dir", str(tmp_path), "--", *TINY)
        assert proc.returncode == 1, proc.stderr  # nothing finished: the job belongs to the holder
        assert "skipped cartpole-mt/ppo_mtl_embed/seed1: running in another process" in proc.stdout
        assert matrix.run_directories(job) == []
    finally:
        holder.release()
    assert not matrix.is_running(job)


def test_a_folder_of_another_configuration_is_refused(tmp_path, capsys):
    args = ["--suites", "cartpole-mt", "--methods", "ppo_mtl_embed", "--seeds", "1", "--runs-dir", str(tmp_path)]
    job, = matrix.plan(["cartpole-mt"], ["ppo_mtl_embed"], [1], ITERATION, (), str(tmp_path))
    os.makedirs(job.dir)
    matrix.write_record(job, lambda record: None)  # job.json of a run at ITERATION steps
    assert matrix.main([*args, "--budget", str(ITERATION), "--dry-run"]) == 0
    capsys.readouterr()
    err = usage_error(capsys, *args, "--budget", str(2 * ITERATION), "--dry-run")
    assert "holds a run of another configuration" in err and "use another --runs-dir" in err


# ----------------------------------------------------------------------------------------------
# End to end, on local workers
# ----------------------------------------------------------------------------------------------
def test_local_matrix_runs_reruns_and_resumes_then_writes_the_report(tmp_path):
    runs, report = tmp_path / "runs", tmp_path / "report"
    args = ["--suites", "cartpole-mt", "--methods", "ppo_mtl_embed", "--seeds", "1-2", "--budget",
            str(3 * ITERATION), "--runs-dir", str(runs), "--report-dir", str(report), "--jobs", "2",
            "--", *TINY, "--eval-every", str(ITERATION)]
    first = run_matrix(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "0 finished, 0 running elsewhere, 0 to resume, 2 to start" in first.stdout
    jobs = matrix.plan(["cartpole-mt"], ["ppo_mtl_embed"], [1, 2], 3 * ITERATION,
                       (*TINY, "--eval-every", str(ITERATION)), str(runs))
    run_dirs = [matrix.run_directories(job) for job in jobs]
    assert all(len(dirs) == 1 and matrix.is_finished(dirs[0]) for dirs in run_dirs)
    assert (report / "README.md").exists() and "| shared MTL | ppo_mtl_embed | 2 | 2 |" in (
        report / "README.md").read_text()

    again = run_matrix(*args)  # everything finished: nothing runs, the report is written again
    assert again.returncode == 0 and "2 finished, 0 running elsewhere, 0 to resume, 0 to start" in again.stdout

    interrupted = run_dirs[1][0]
    os.remove(os.path.join(interrupted, "summary.json"))  # as if killed after its last checkpoint
    resumed = run_matrix(*args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "1 finished, 0 running elsewhere, 1 to resume, 0 to start" in resumed.stdout
    assert matrix.run_directories(jobs[1]) == [interrupted] and matrix.is_finished(interrupted)
    record = json.loads(open(os.path.join(jobs[1].dir, "job.json")).read())
    assert [(a["action"], a["exit_code"]) for a in record["attempts"]] == [("start", 0), ("resume", 0)]
    assert record["attempts"][1]["run_dir"] == interrupted
    steps = [json.loads(line)["global_step"] for line in open(os.path.join(interrupted, "eval.jsonl"))]
    assert steps == [ITERATION, 2 * ITERATION, 3 * ITERATION, 3 * ITERATION]  # each once, then the final one

    split = args.index("--")
    status = run_matrix(*args[:split], "--status", *args[split:])
    assert status.returncode == 0 and status.stdout.strip().splitlines()[-1] == "2 jobs: 2 finished"


def test_slurm_time_limits_parse_and_a_lead_longer_than_the_limit_is_refused(capsys, monkeypatch, tmp_path):
    assert [matrix.slurm_seconds(t) for t in ("10", "10:30", "1:00:00", "2-0", "1-12:30", "1-00:00:05", "x")] == [
        600, 630, 3600, 172800, 131400, 86405, None]
    (tmp_path / "sbatch").write_text("#!/bin/sh\nexit 1\n")  # on the PATH, never reached
    (tmp_path / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    err = usage_error(capsys, "--launcher", "slurm", "--time", "4:00", "--methods", "ppo_mtl_embed")
    assert "--requeue-lead 300 s is not shorter than --time 4:00" in err


def test_slurm_task_requeues_itself_on_the_time_limit_signal(tmp_path):
    """USR1 (sbatch --signal, ahead of the time limit) makes the task call scontrol requeue on its own
    array task once its run wrote a checkpoint in this attempt; here scontrol is a stand-in that
    records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol-calls"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    job, = matrix.plan(["cartpole-mt"], ["ppo_mtl_embed"], [1], 40 * ITERATION, (*TINY, "--checkpoint-every", "0.001"),
                       str(tmp_path / "runs"))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"python": PYTHON, "max_requeues": 5, "jobs": [job.to_json()]}))
    env = subprocess_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="78", SLURM_ARRAY_JOB_ID="77",
                         SLURM_ARRAY_TASK_ID="0", SLURM_RESTART_COUNT="0")
    task = subprocess.Popen([PYTHON, "-m", "shared.matrix", "--run-task", str(plan), "0"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log = os.path.join(job.dir, "job.log")
        deadline = time.time() + 120
        while time.time() < deadline and not os.path.exists(log):  # the task has its handler from here on
            time.sleep(0.05)
        task.send_signal(signal.SIGUSR1)  # before the run's first checkpoint: a requeue would gain nothing
        while time.time() < deadline and not any(matrix.has_checkpoint(d) for d in matrix.run_directories(job)):
            time.sleep(0.05)
        assert not calls.exists()
        task.send_signal(signal.SIGUSR1)
        out, _ = task.communicate(timeout=240)
    finally:
        task.kill()
    assert task.returncode == 0, out
    assert "not requeued (no checkpoint written in this attempt)" in out
    assert calls.read_text().split() == ["requeue", "77_0"]
    assert "time limit near: requeueing 77_0" in out
    assert matrix.is_finished(matrix.run_directories(job)[0])  # the stand-in kills nothing: the run goes on
    attempt, = json.loads(open(os.path.join(job.dir, "job.json")).read())["attempts"]
    assert (attempt["launcher"], attempt["slurm_task"], attempt["restart_count"]) == ("slurm", "77_0", 0)
