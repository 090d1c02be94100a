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
    lines = [json.loads(line) for line in open(os.path.join(interrupted, "eval.jsonl"))]
    for label in ("", "sampled"):  # each evaluation once, then the final one; its sampled pass likewise
        steps = [line["global_step"] for line in lines if line["label"] == label]
        assert steps == [ITERATION, 2 * ITERATION, 3 * ITERATION, 3 * ITERATION], label

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


# ----------------------------------------------------------------------------------------------
# VarShare's ablation rows and leave-one-out transfer
# ----------------------------------------------------------------------------------------------
LOO_SUITE, HELD_OUT = "cartpole-conflict", "standard-inverted"
# cartpole-conflict: 4 envs x 128 steps per task; a 4096-step base run on the other four tasks is two
# iterations, a 1024-step run on the held-out task alone two as well
LOO_FLAGS = ["--hidden-sizes", "16", "--update-epochs", "1", "--eval-episodes", "1", "--final-eval-episodes", "1"]


def test_ablation_rows_are_varshare_with_one_flag_and_not_in_the_default_set(tmp_path):
    assert matrix.parse_methods(["all"]) == list(matrix.ROW_NAMES)  # the quick matrix does not grow
    assert matrix.parse_methods(["all"], ablations=True) == [
        "ppo_single", "ppo_mtl_embed", "wide", "ppo_varshare", "l2soft", "l2soft-tuned", "beta0", "reparam",
        "episode", "ppo_paco", "ppo_softmod", "ppo_pcgrad"]
    assert matrix.parse_methods(["varshare"], ablations=True) == ["ppo_varshare", "l2soft", "l2soft-tuned", "beta0",
                                                                  "reparam", "episode"]
    proc = run_matrix("--suites", "cartpole-mt", "--methods", "beta0", "reparam", "episode", "--seeds", "1",
                      "--budget", "5000", "--runs-dir", str(tmp_path), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f".venv/bin/python algos/ppo_varshare.py --env-id cartpole-mt --seed 1 --total-timesteps 5000 {flags} "
        f"--run-name-suffix {name} --runs-dir {tmp_path}/cartpole-mt/{name}/seed1"
        for name, flags in (("beta0", "--beta 0"), ("reparam", "--estimator reparam"),
                            ("episode", "--rollout-weights episode"))]


def test_one_hot_input_row_is_varshare_with_its_flag_by_name_only(tmp_path):
    assert "onehot" not in matrix.parse_methods(["all"], ablations=True)
    assert matrix.parse_methods(["onehot", "varshare"]) == ["ppo_varshare", "onehot"]
    proc = run_matrix("--suites", "mt3", "--methods", "onehot", "--seeds", "2", "--budget", "5000",
                      "--runs-dir", str(tmp_path), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f".venv/bin/python algos/ppo_varshare.py --env-id mt3 --seed 2 --total-timesteps 5000 --task-input onehot "
        f"--run-name-suffix onehot --runs-dir {tmp_path}/mt3/onehot/seed2"]


def test_tuned_l2soft_row_carries_the_meta_world_lambda_and_is_left_out_on_toy_suites(tmp_path):
    proc = run_matrix("--suites", "mt3", "cartpole-mt", "--methods", "l2soft", "l2soft-tuned", "--seeds", "1",
                      "--budget", "5000", "--runs-dir", str(tmp_path), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    flags = {line.split("--run-name-suffix ")[1].split()[0] + "@" + line.split("--env-id ")[1].split()[0]:
             line.split("--total-timesteps 5000 ")[1].split(" --run-name-suffix")[0]
             for line in proc.stdout.splitlines()}
    assert flags == {"l2soft@mt3": "--residual l2", "l2soft@cartpole-mt": "--residual l2",
                     "l2soft-tuned@mt3": "--residual l2 --sigma-prior-gain 0.12 --beta 3 --prior-step gradient"}
    assert "cartpole-mt is a gym suite, which has no tuned L2Soft lambda" in proc.stderr


def test_loo_plans_a_base_and_three_regimes_per_task_method_and_seed(tmp_path):
    jobs = matrix.plan([LOO_SUITE], ["ppo_single", "wide", "ppo_varshare"], [1, 2], 5000, (), str(tmp_path),
                       loo=[HELD_OUT])
    loo = [job for job in jobs if job.holdout]
    assert len(jobs) - len(loo) == 3 * 2  # the suite's own rows, as without --loo
    # ppo_single shares nothing: scratch only; the wide row has no leave-one-out jobs
    assert [(j.row.name, j.regime, j.seed, j.budget) for j in loo] == [
        ("ppo_single", "scratch", 1, 1000), ("ppo_single", "scratch", 2, 1000),
        ("ppo_varshare", "base", 1, 5000), ("ppo_varshare", "base", 2, 5000),
        ("ppo_varshare", "scratch", 1, 1000), ("ppo_varshare", "scratch", 2, 1000),  # budget / 5 tasks
        ("ppo_varshare", "finetune", 1, 1000), ("ppo_varshare", "finetune", 2, 1000),
        ("ppo_varshare", "task-params", 1, 1000), ("ppo_varshare", "task-params", 2, 1000)]
    by_name = {job.name: job for job in loo}
    folder = tmp_path / LOO_SUITE / f"loo-{HELD_OUT}" / "ppo_varshare"
    base = by_name[f"{LOO_SUITE}/loo-{HELD_OUT}/ppo_varshare/base/seed2"]
    finetune = by_name[f"{LOO_SUITE}/loo-{HELD_OUT}/ppo_varshare/finetune/seed2"]
    assert base.dir == str(folder / "base" / "seed2") and finetune.dir == str(folder / "finetune" / "seed2")
    assert finetune.base == base.dir and not base.base
    assert not by_name[f"{LOO_SUITE}/loo-{HELD_OUT}/ppo_varshare/scratch/seed2"].base
    assert base.argv()[-2:] == ["--holdout-task", HELD_OUT]
    assert finetune.argv()[-4:] == ["--init-from", base.dir, "--transfer", "finetune"]
    assert finetune.launch_argv() is None  # no finished base run yet
    run_dir = fake_run(base, "a", checkpoint=True, summary=json.dumps({"per_task": {"standard": {}}}))
    assert finetune.launch_argv()[-4:] == ["--init-from", run_dir, "--transfer", "finetune"]
    assert matrix.Job.from_json(json.loads(json.dumps(finetune.to_json()))) == finetune  # the Slurm plan keeps it
    # --loo all: every task of every suite; a named task applies to the suites that have it
    assert len(matrix.plan([LOO_SUITE, "cartpole-mt"], ["ppo_mtl_embed"], [1], 5000, (), str(tmp_path),
                           loo=["all"])) == 2 + 2 * 5 * 4
    both = matrix.plan([LOO_SUITE, "cartpole-mt"], ["ppo_mtl_embed"], [1], 5000, (), str(tmp_path),
                       loo=[HELD_OUT, "long-pole"], loo_budget=777)
    assert sorted({(j.suite, j.holdout, j.budget) for j in both if j.regime == "scratch"}) == [
        ("cartpole-conflict", "long-pole", 777), ("cartpole-conflict", HELD_OUT, 777),
        ("cartpole-mt", "long-pole", 777)]


def test_loo_dry_run_shows_each_command_and_what_it_waits_for(tmp_path):
    proc = run_matrix("--suites", LOO_SUITE, "--methods", "varshare", "--seeds", "1", "--budget", "4096",
                      "--loo-budget", "1024", "--loo", HELD_OUT, "--runs-dir", str(tmp_path), "--dry-run",
                      "--", *LOO_FLAGS)
    assert proc.returncode == 0, proc.stderr
    loo = f"{tmp_path}/{LOO_SUITE}/loo-{HELD_OUT}/ppo_varshare"
    start = f".venv/bin/python algos/ppo_varshare.py --env-id {LOO_SUITE} --seed 1 --total-timesteps"
    assert proc.stdout.splitlines() == [
        f"{start} 4096 {' '.join(LOO_FLAGS)} --runs-dir {tmp_path}/{LOO_SUITE}/ppo_varshare/seed1",
        f"{start} 4096 {' '.join(LOO_FLAGS)} --holdout-task {HELD_OUT} --runs-dir {loo}/base/seed1",
        f"{start} 1024 {' '.join(LOO_FLAGS)} --tasks {HELD_OUT} --runs-dir {loo}/scratch/seed1",
        *[f"{start} 1024 {' '.join(LOO_FLAGS)} --init-from {loo}/base/seed1 --transfer {regime} --runs-dir "
          f"{loo}/{regime}/seed1  # after {LOO_SUITE}/loo-{HELD_OUT}/ppo_varshare/base/seed1: --init-from is its run "
          f"directory" for regime in ("finetune", "task-params")]]
    only = run_matrix("--suites", LOO_SUITE, "--methods", "varshare", "--seeds", "1", "--budget", "4096",
                      "--loo-budget", "1024", "--loo", HELD_OUT, "--loo-only", "--runs-dir", str(tmp_path),
                      "--dry-run", "--", *LOO_FLAGS)
    assert only.returncode == 0, only.stderr
    assert only.stdout.splitlines() == proc.stdout.splitlines()[1:]  # the suite's own row left out
    with_wide = run_matrix("--suites", LOO_SUITE, "--methods", "varshare", "wide", "--seeds", "1", "--budget", "4096",
                           "--loo", HELD_OUT, "--loo-only", "--runs-dir", str(tmp_path), "--dry-run")
    assert with_wide.returncode == 0, with_wide.stderr
    assert "--loo-only: wide has no leave-one-out jobs and is left out" in with_wide.stderr
    assert not any("--run-name-suffix wide" in line for line in with_wide.stdout.splitlines())
    alone = run_matrix("--suites", LOO_SUITE, "--loo-only", "--runs-dir", str(tmp_path), "--dry-run")
    assert alone.returncode == 2 and "--loo-only runs the leave-one-out jobs alone; give --loo" in alone.stderr


def test_loo_bad_input_gets_one_sentence(capsys):
    assert "--loo task 'inverted' is in none of the suites" in usage_error(
        capsys, "--suites", LOO_SUITE, "--loo", "inverted", "--dry-run")
    assert "--loo-budget sets the leave-one-out runs' budget; give --loo" in usage_error(
        capsys, "--suites", LOO_SUITE, "--loo-budget", "1000", "--dry-run")
    assert "--loo needs one of ppo_single, ppo_mtl_embed" in usage_error(
        capsys, "--suites", LOO_SUITE, "--methods", "wide", "l2soft", "--loo", "all", "--dry-run")
    assert "--tasks after -- is set by the matrix for each job; use --loo" in usage_error(
        capsys, "--suites", LOO_SUITE, "--loo", "all", "--dry-run", "--", "--tasks", "standard")
    assert "--init-from after -- is set by the matrix" in usage_error(capsys, "--dry-run", "--", "--init-from", "x")
    assert "--loo-budget 'x' is not a number of env steps" in usage_error(
        capsys, "--suites", LOO_SUITE, "--loo", "all", "--loo-budget", "x", "--dry-run")


def test_local_loo_runs_transfer_jobs_after_their_base_and_a_rerun_does_nothing(tmp_path):
    runs = tmp_path / "runs"
    args = ["--suites", LOO_SUITE, "--methods", "varshare", "--seeds", "1", "--budget", "4096", "--loo-budget", "1024",
            "--loo", HELD_OUT, "--runs-dir", str(runs), "--report-dir", str(tmp_path / "report"), "--jobs", "2",
            "--", *LOO_FLAGS]
    first = run_matrix(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "0 finished, 0 running elsewhere, 0 to resume, 5 to start" in first.stdout
    lines = first.stdout.splitlines()
    loo = f"{LOO_SUITE}/loo-{HELD_OUT}/ppo_varshare"

    def line_of(prefix: str) -> int:
        return next(i for i, line in enumerate(lines) if line.lstrip().startswith(prefix))

    # two workers, yet the transfer jobs start only once the base is done
    assert line_of(f"[1/5] start {loo}/base/seed1") == 1  # bases go first
    for regime in ("finetune", "task-params"):
        assert line_of(f"done {loo}/base/seed1") < next(i for i, line in enumerate(lines)
                                                        if f"start {loo}/{regime}/seed1" in line)
    jobs = {job.regime: job for job in matrix.plan([LOO_SUITE], ["ppo_varshare"], [1], 4096, tuple(LOO_FLAGS),
                                                   str(runs), loo=[HELD_OUT], loo_budget=1024) if job.regime}
    base_run = matrix.finished_run(jobs["base"].dir)
    base_args = json.loads(open(os.path.join(base_run, "args.json")).read())
    assert base_args["holdout_task"] == HELD_OUT and HELD_OUT not in base_args["task_names"]
    base_ended = json.loads(open(os.path.join(jobs["base"].dir, "job.json")).read())["attempts"][0]["ended"]
    for regime in ("finetune", "task-params"):
        attempt, = json.loads(open(os.path.join(jobs[regime].dir, "job.json")).read())["attempts"]
        assert attempt["init_from"] == base_run and attempt["started"] >= base_ended
        run_dir = matrix.finished_run(jobs[regime].dir)
        run_args = json.loads(open(os.path.join(run_dir, "args.json")).read())
        assert (run_args["init_from"], run_args["transfer"], run_args["task_names"]) == (base_run, regime, [HELD_OUT])
        zero_shot = json.loads(open(os.path.join(run_dir, "eval.jsonl")).readline())
        assert (zero_shot["label"], zero_shot["global_step"]) == ("zero-shot", 0)
    scratch_args = json.loads(open(os.path.join(matrix.finished_run(jobs["scratch"].dir), "args.json")).read())
    assert scratch_args["task_names"] == [HELD_OUT] and scratch_args["init_from"] is None

    again = run_matrix(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "5 finished, 0 running elsewhere, 0 to resume, 0 to start" in again.stdout
    assert not any("] start " in line for line in again.stdout.splitlines())
    for job in jobs.values():
        assert len(json.loads(open(os.path.join(job.dir, "job.json")).read())["attempts"]) == 1


def test_a_failed_base_leaves_its_transfer_jobs_not_run(tmp_path, capsys):
    jobs = [job for job in matrix.plan([LOO_SUITE], ["ppo_varshare"], [1], 4096, tuple(LOO_FLAGS), str(tmp_path),
                                       loo=[HELD_OUT], loo_budget=1024) if job.regime in ("base", "finetune",
                                                                                          "task-params")]
    base = jobs[0]
    fake_run(base, "a", checkpoint=True)  # an empty checkpoint: the resume fails at once
    failed = matrix.run_local(jobs, 2, PYTHON)
    assert failed == jobs
    out = capsys.readouterr().out
    assert f"FAILED {base.name}" in out
    for job in jobs[1:]:
        assert f"NOT RUN {job.name} (" in out and f"its base {base.name} failed; a rerun runs it" in out
        assert not os.path.exists(os.path.join(job.dir, "job.json"))


FAKE_SLURM = '''#!{python}
"""A stand-in for sbatch and squeue: sbatch records its arguments and the array size and answers the
next job id; squeue lists every task of the arrays still in the state file as pending."""
import json, os, re, sys
state_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "state.json")
state = json.load(open(state_path)) if os.path.exists(state_path) else {{"calls": [], "arrays": {{}}}}
if os.path.basename(sys.argv[0]) == "sbatch":
    script = open(sys.argv[-1]).read()
    size = int(re.search(r"--array=0-(\\d+)", script)[1]) + 1
    array_job = str(100 + len(state["calls"]))
    state["calls"].append(sys.argv[1:])
    state["arrays"][array_job] = [size, any(a.startswith("--dependency") for a in sys.argv)]
    json.dump(state, open(state_path, "w"))
    print(array_job)
else:
    array_job = sys.argv[sys.argv.index("--jobs") + 1]
    size, after = state["arrays"].get(array_job, [0, False])
    for task in range(size):
        print(f"{{array_job}}_{{task}}|PENDING|{{'Dependency' if after else 'Priority'}}")
'''


def test_slurm_loo_submits_the_transfer_array_after_the_bases_array(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "squeue"):
        (bin_dir / tool).write_text(FAKE_SLURM.format(python=PYTHON))
        (bin_dir / tool).chmod(0o755)
    env = subprocess_env(PATH=str(bin_dir))
    runs = tmp_path / "runs"
    launch = ["--suites", LOO_SUITE, "--methods", "varshare", "--seeds", "1", "--budget", "4096", "--loo-budget",
              "1024", "--loo", HELD_OUT, "--runs-dir", str(runs), "--launcher", "slurm"]
    proc = run_matrix(*launch, "--", *LOO_FLAGS, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state = json.loads((bin_dir / "state.json").read_text())
    plain, bases, transfers = matrix.submissions(str(runs))
    loo = f"{LOO_SUITE}/loo-{HELD_OUT}/ppo_varshare"
    assert plain["jobs"] == [f"{LOO_SUITE}/ppo_varshare/seed1", f"{loo}/scratch/seed1"] and plain["after"] == []
    assert bases["jobs"] == [f"{loo}/base/seed1"] and bases["after"] == []
    assert transfers["jobs"] == [f"{loo}/finetune/seed1", f"{loo}/task-params/seed1"]
    assert transfers["after"] == [bases["array_job"]] == ["101"]
    assert state["calls"] == [["--parsable", plain["script"]], ["--parsable", bases["script"]],
                              ["--parsable", "--dependency=afterok:101", "--kill-on-invalid-dep=yes",
                               transfers["script"]]]
    assert "#SBATCH --job-name=mtrl-matrix-transfers" in open(transfers["script"]).read().splitlines()
    # each array task runs its job from its own plan
    assert [job["dir"] for job in json.loads(open(transfers["plan"]).read())["jobs"]] == [
        str(runs / loo / regime / "seed1") for regime in ("finetune", "task-params")]

    split = ["--", *LOO_FLAGS]
    status = run_matrix(*launch, "--status", *split, env=env)
    assert status.returncode == 0, status.stderr
    assert f"{loo}/finetune/seed1" in status.stdout and "Slurm task 102_0: PENDING (Dependency)" in status.stdout
    assert "Slurm task 101_0: PENDING (Priority)" in status.stdout
    assert status.stdout.strip().splitlines()[-1] == "5 jobs: 5 pending"
    again = run_matrix(*launch, *split, env=env)  # all queued: nothing to submit
    assert again.returncode == 0 and len(matrix.submissions(str(runs))) == 3, again.stdout + again.stderr
    assert f"skipped {loo}/task-params/seed1: queued in Slurm as 102_1" in again.stdout

    del state["arrays"]["102"]  # the transfer array left the queue (cancelled), its base is still queued
    (bin_dir / "state.json").write_text(json.dumps(state))
    resubmitted = run_matrix(*launch, *split, env=env)
    assert resubmitted.returncode == 0, resubmitted.stdout + resubmitted.stderr
    latest = matrix.submissions(str(runs))[-1]
    assert len(matrix.submissions(str(runs))) == 4 and latest["after"] == ["101"]
    assert json.loads((bin_dir / "state.json").read_text())["calls"][-1][:3] == [
        "--parsable", "--dependency=afterok:101", "--kill-on-invalid-dep=yes"]


def test_slurm_dry_run_shows_both_arrays_and_the_dependency(tmp_path):
    proc = run_matrix("--suites", LOO_SUITE, "--methods", "varshare", "--seeds", "1", "--budget", "4096", "--loo",
                      HELD_OUT, "--runs-dir", str(tmp_path), "--launcher", "slurm", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    submitted = [line for line in proc.stdout.splitlines() if line.startswith("# submitted with: ")]
    assert len(submitted) == 3 and submitted[0].startswith("# submitted with: sbatch --parsable ")
    assert submitted[2].startswith("# submitted with: sbatch --parsable --dependency=afterok:<the bases' array job> "
                                   "--kill-on-invalid-dep=yes ") and submitted[2].endswith(".transfers.sbatch")
    assert "# | #SBATCH --job-name=mtrl-matrix-bases" in proc.stdout
    assert not (tmp_path / "slurm").exists()
