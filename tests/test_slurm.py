"""The matrix's Slurm launcher against a real single-node Slurm (Debian's slurm-wlm and munge).

The test installs the packages when they are missing, starts munged, slurmctld and slurmd with a
private configuration (free ports, state under a fresh folder in /tmp, its own munge socket, as in
../shared/notes/slurm-single-node.md), submits a small toy matrix through ``shared.matrix``,
requeues one array task mid-run as a preemption would, waits, checks that every run finished and
that the requeued one resumed; then a leave-one-out matrix whose transfer array waits for its bases'
array (afterok); and stops the daemons it started. It needs root on Debian (apt-get,
daemons that run jobs as any user); elsewhere it is skipped.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from shared import matrix
from tests.conftest import PYTHON, REPO, subprocess_env

PACKAGES = ["slurm-wlm", "munge"]
ITERATION = 5 * 32  # cartpole-mt, one env per task, 32-step rollouts
BUDGET = 160 * ITERATION
FLAGS = ["--num-envs-per-task", "1", "--num-steps", "32", "--num-minibatches", "2", "--update-epochs", "2",
         "--hidden-sizes", "16", "--eval-every", str(40 * ITERATION), "--eval-episodes", "1",
         "--final-eval-episodes", "1", "--checkpoint-every", "0.001"]  # a checkpoint after every iteration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def run(*command: str, env=None, check=True, timeout=120) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    return proc


def install_slurm() -> None:
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if run("apt-get", "install", "-y", "-q", *PACKAGES, env=env, check=False, timeout=600).returncode != 0:
        run("apt-get", "update", "-q", env=env, timeout=600)  # a fresh machine may have no package lists yet
        run("apt-get", "install", "-y", "-q", *PACKAGES, env=env, timeout=600)


def stop(pid_file: Path) -> None:
    """Stop the daemon whose pid this file holds (only daemons this test started write there)."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def slurm():
    """A running single-node Slurm; yields the environment its commands need (SLURM_CONF)."""
    if os.geteuid() != 0 or not os.path.exists("/etc/debian_version"):
        pytest.skip("needs root on Debian: it installs slurm-wlm and munge with apt-get and starts their daemons")
    install_slurm()
    base = Path(tempfile.mkdtemp(prefix="slurm-test-", dir="/tmp"))
    base.chmod(0o755)  # munged runs as the munge user and must reach its socket folder
    munge_dir = base / "munge"
    munge_dir.mkdir()
    munge = pwd.getpwnam("munge")
    os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
    socket_path = munge_dir / "munge.socket"
    host = socket.gethostname()
    for name in ("state", "spool", "log"):
        (base / name).mkdir()
    conf = base / "slurm.conf"
    conf.write_text(f"""\
ClusterName=test
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={socket_path}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd.log
SlurmUser=root
NodeName={host} CPUs={os.cpu_count()} RealMemory=2000 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    env = {**subprocess_env(), "SLURM_CONF": str(conf)}
    try:
        run("su", "-s", "/bin/sh", "munge", "-c",
            f"/usr/sbin/munged --socket={socket_path} --pid-file={munge_dir}/munged.pid "
            f"--log-file={munge_dir}/munged.log --seed-file={munge_dir}/munged.seed")
        run("slurmctld", "-f", str(conf), env=env)
        run("slurmd", "-f", str(conf), env=env)
        deadline = time.time() + 60
        while time.time() < deadline:
            state = run("sinfo", "--noheader", "--format", "%T", env=env, check=False).stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the Slurm node did not come up (sinfo: {state!r}); see {base}/log")
        yield env, base
    finally:
        stop(base / "slurmd.pid")
        stop(base / "slurmctld.pid")
        stop(munge_dir / "munged.pid")
        shutil.rmtree(base, ignore_errors=True)


def checkpoint_step(job: matrix.Job) -> int:
    for run_dir in matrix.run_directories(job):
        try:
            return int(torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["global_step"])
        except (FileNotFoundError, RuntimeError, EOFError, KeyError):
            pass
    return -1


def queue(env, array_job: str) -> dict[str, str]:
    out = run("squeue", "--noheader", "--array", "--jobs", array_job, "--format", "%i %T", env=env,
              check=False).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def debug(base: Path, runs: Path) -> str:
    texts = []
    for path in [*sorted((runs / "slurm").glob("*.log")), *sorted(runs.rglob("job.log")), base / "log/slurmctld.log"]:
        texts.append(f"--- {path}\n{path.read_text(errors='replace')[-1500:]}")
    return "\n".join(texts)


def test_a_toy_matrix_runs_through_slurm_and_a_requeued_task_resumes(slurm, tmp_path):
    env, base = slurm
    runs = tmp_path / "runs"
    launch = ["--suites", "cartpole-mt", "--methods", "ppo_mtl_embed", "ppo_varshare", "--seeds", "1-2",
              "--budget", str(BUDGET), "--runs-dir", str(runs), "--launcher", "slurm", "--cpus-per-task", "1",
              "--mem", "400M", "--time", "10:00", "--", *FLAGS]
    submitted = subprocess.run([PYTHON, "-m", "shared.matrix", *launch], cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    submission, = matrix.submissions(str(runs))
    array_job = submission["array_job"]
    jobs = [matrix.Job.from_json(j) for j in json.loads(Path(submission["plan"]).read_text())["jobs"]]
    assert [job.name for job in jobs] == submission["jobs"] and len(jobs) == 4
    script = Path(submission["script"]).read_text()
    for line in ("#SBATCH --array=0-3", "#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --mem=400M",
                 "#SBATCH --cpus-per-task=1", "#SBATCH --signal=B:USR1@300"):
        assert line in script.splitlines()

    # Requeue the task of one job once its run is a third of the way through, as preemption would.
    target_index = 1
    target, task = jobs[target_index], f"{array_job}_{target_index}"
    deadline = time.time() + 150
    while time.time() < deadline and checkpoint_step(target) < BUDGET // 3:
        time.sleep(0.1)
    step = checkpoint_step(target)
    assert BUDGET // 3 <= step < BUDGET, f"no checkpoint mid-run (step {step}):\n{debug(base, runs)}"
    run_dir, = matrix.run_directories(target)
    args_before = Path(run_dir, "args.json").read_text()
    run("scontrol", "requeue", task, env=env)
    # A requeued job waits about 2 minutes before it may start again (the notes); once it is back in
    # the queue (no longer completing), StartTime=now lets it start at the next scheduling pass.
    deadline = time.time() + 60
    while time.time() < deadline and queue(env, array_job).get(task) != "RUNNING":
        if queue(env, array_job).get(task) == "PENDING":
            run("scontrol", "update", f"JobId={task}", "StartTime=now", env=env, check=False)
        time.sleep(0.5)

    deadline = time.time() + 180
    while time.time() < deadline and queue(env, array_job):
        time.sleep(0.5)
    assert not queue(env, array_job), f"tasks still queued: {queue(env, array_job)}\n{debug(base, runs)}"

    for job in jobs:
        dirs = matrix.run_directories(job)
        assert len(dirs) == 1 and matrix.is_finished(dirs[0]), f"{job.name} did not finish:\n{debug(base, runs)}"
        summary = json.loads(Path(dirs[0], "summary.json").read_text())
        assert summary["global_step"] == BUDGET
    # The requeued run resumed in its own directory: its flags unchanged, each evaluation once.
    assert matrix.run_directories(target) == [run_dir]
    assert Path(run_dir, "args.json").read_text() == args_before
    lines = [json.loads(line) for line in Path(run_dir, "eval.jsonl").read_text().splitlines()]
    for label in ("", "sampled"):  # each evaluation (and its sampled pass) once
        steps = [line["global_step"] for line in lines if line["label"] == label]
        assert steps == [40 * ITERATION, 80 * ITERATION, 120 * ITERATION, BUDGET, BUDGET], (label, steps)
    attempts = json.loads(Path(target.dir, "job.json").read_text())["attempts"]
    assert [(a["action"], a["slurm_task"], a["restart_count"]) for a in attempts] == [
        ("start", task, 0), ("resume", task, 1)], attempts
    assert "exit_code" not in attempts[0] and attempts[1]["exit_code"] == 0  # the first was killed by the requeue
    slurm_log = (runs / "slurm" / f"{task}.log").read_text()
    assert "restart 0" in slurm_log and "restart 1" in slurm_log, slurm_log  # appended: both attempts
    assert f"resuming {run_dir} at step" in Path(target.dir, "job.log").read_text()
    for job in jobs[:target_index] + jobs[target_index + 1:]:
        assert len(json.loads(Path(job.dir, "job.json").read_text())["attempts"]) == 1

    status = subprocess.run([PYTHON, "-m", "shared.matrix", *launch[:launch.index("--")], "--status", "--", *FLAGS],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert status.stdout.strip().splitlines()[-1] == "4 jobs: 4 finished", status.stdout + status.stderr
    again = subprocess.run([PYTHON, "-m", "shared.matrix", *launch], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stdout + again.stderr
    assert len(matrix.submissions(str(runs))) == 1


def test_leave_one_out_transfer_tasks_start_after_their_base_array(slurm, tmp_path):
    """--loo on Slurm: the bases' array, then the transfer array submitted with afterok on it; the
    transfer runs start from the base run once it finished."""
    env, base = slurm
    runs = tmp_path / "runs"
    held_out = "standard-inverted"
    launch = ["--suites", "cartpole-conflict", "--methods", "ppo_varshare", "--seeds", "1", "--budget", "4096",
              "--loo-budget", "1024", "--loo", held_out, "--runs-dir", str(runs), "--launcher", "slurm",
              "--cpus-per-task", "1", "--mem", "400M", "--time", "10:00", "--", "--hidden-sizes", "16",
              "--update-epochs", "1", "--eval-episodes", "1", "--final-eval-episodes", "1"]
    submitted = subprocess.run([PYTHON, "-m", "shared.matrix", *launch], cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    plain, bases, transfers = matrix.submissions(str(runs))
    assert transfers["after"] == [bases["array_job"]]
    deadline = time.time() + 240
    while time.time() < deadline and any(queue(env, s["array_job"]) for s in (plain, bases, transfers)):
        time.sleep(0.5)
    jobs = {job.name: job for s in (plain, bases, transfers)
            for job in (matrix.Job.from_json(j) for j in json.loads(Path(s["plan"]).read_text())["jobs"])}
    for job in jobs.values():
        assert matrix.finished_run(job.dir), f"{job.name} did not finish:\n{debug(base, runs)}"
    loo = f"cartpole-conflict/loo-{held_out}/ppo_varshare"
    base_run = matrix.finished_run(jobs[f"{loo}/base/seed1"].dir)
    base_ended = json.loads(Path(jobs[f"{loo}/base/seed1"].dir, "job.json").read_text())["attempts"][-1]["ended"]
    for regime in ("finetune", "task-params"):
        attempt, = json.loads(Path(jobs[f"{loo}/{regime}/seed1"].dir, "job.json").read_text())["attempts"]
        assert attempt["init_from"] == base_run and attempt["started"] >= base_ended
        assert attempt["slurm_task"].split("_")[0] == transfers["array_job"]
