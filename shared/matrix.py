"""The experiment matrix: suites x rows x seeds, run on this machine's cores or as one Slurm job
array, resumable, ending in the report. ``run_all.sh`` is its entry point:

    bash run_all.sh [OPTIONS] [-- FLAGS FOR EVERY SCRIPT]
    bash run_all.sh --suite mt10 --seeds 1-5 --launcher slurm      # the study on a cluster
    bash run_all.sh --suite mt10 --seeds 1-5 --launcher slurm --status

Rows: one per method script, plus the rows the study adds (PROTOCOL section 5):
- ``wide``: shared MTL (ppo_mtl_embed) widened until its total stored parameter count matches
  VarShare's on the suite (``shared.capacity``, with the flags after ``--`` applied to both);
  run-name suffix ``wide``, which the report pairs with shared MTL as the capacity-matched row;
- ``l2soft``: VarShare's deterministic ablation at the matched penalty (ppo_varshare
  ``--residual l2``), suffix ``l2soft``, which the report lists after VarShare.
VarShare's other ablation rows are not in ``--methods all`` (the quick matrix would grow by half);
``--ablations`` adds them together with ``l2soft``, and ``--methods`` takes them by name:
- ``l2soft-tuned``: L2Soft at the lambda tuned on ``mt3-tune`` (``L2SOFT_TUNED`` in
  ppo_varshare.py), on the suites of a kind that has one (Meta-World); a toy suite has no tuned
  lambda, so the row is left out there with a notice.
The others are ppo_varshare with one flag and a run-name suffix of the row's name:
- ``beta0``: ``--beta 0`` (no KL: the residuals are free);
- ``reparam``: ``--estimator reparam`` (one weight sample per task per minibatch instead of Flipout);
- ``episode``: ``--rollout-weights episode`` (acting with a weight sample per episode, not the mean).
One more VarShare row, by name only (neither ``all`` nor ``--ablations`` adds it):
- ``onehot``: ``--task-input onehot`` (theta also reads shared MTL's one-hot task input; the README's
  ``mt3`` at 3M says why the comparison exists).

Without ``--suite`` the matrix is the quick one (``QUICK``): every row on the toy suite with a
small budget and short evaluations, a few minutes on 2 cores, in runs/quick. With ``--suite``,
each suite runs at its own budget and evaluation schedule (``shared.suites.SUITE_DEFAULTS``) unless
``--budget`` or flags after ``--`` say otherwise, in runs/matrix.

A job is (suite, row, seed); it owns the folder RUNS/<suite>/<row>/seed<N>/, which the script gets as
``--runs-dir``, so the script's run directory (<env-id>__<algo>__<seed>__<time>[__suffix]) is found
there on every rerun. Beside it: ``job.json`` (the job's command and every attempt: when, how it
started, how it ended), ``job.log`` (the script's output, appended across attempts) and
``job.lock``, held by whichever process runs the job (a local matrix, a Slurm task), so that no
two processes ever run one configuration at once. What a rerun does with a job:

- finished (its run directory has a complete summary.json): skipped;
- running (job.lock held) or queued in a Slurm array submitted from this runs folder: skipped;
- interrupted with a checkpoint.pt: resumed (``--resume RUN_DIR``);
- anything else: started afresh; a run directory without a checkpoint (the run stopped before its
  first one and holds nothing to resume) is removed first, so the report does not list it.
A job folder that holds another command (another budget or other flags) is refused before anything
runs: one runs folder holds one matrix.

Leave-one-out transfer (PROTOCOL section 7): ``--loo TASK [TASK ...]`` or ``--loo all`` adds, for
each suite, held-out task K (a named task applies to the suites that have it), method row and seed,
four jobs in RUNS/<suite>/loo-<K>/<row>/<regime>/seed<N>/:
- ``base``: the script on the other T-1 tasks (``--holdout-task K``), at the matrix budget;
- ``scratch``: the script, fresh, on K alone (``--tasks K``);
- ``finetune`` and ``task-params``: the script on K, starting from the base run (``--init-from
  BASE_RUN --transfer finetune|task-params``); each waits for its base.
The three regimes run ``--loo-budget`` env steps, by default budget / T: the steps one task gets in
the multi-task run. Method rows: the multi-task scripts among ``--methods`` (ppo_mtl_embed,
ppo_varshare, ppo_paco, ppo_softmod, ppo_pcgrad) and ppo_single, which shares nothing and so has a
scratch job only; the wide and ablation rows have none. A transfer job's job.json records the base
job's folder as ``--init-from``; the base run's directory in that folder replaces it when the job
starts. Locally a transfer job starts once its base finished, and a base that fails leaves its
transfer jobs not run (one line each; a rerun runs them). A transfer job whose base runs in another
process is skipped until a rerun after it finished.

Slurm: one ``sbatch --array`` for the jobs that need running, one array task per job, each running
``python -m shared.matrix --run-task PLAN INDEX``, which starts or resumes its job exactly as a
local rerun would. ``--requeue --open-mode=append``: a preempted or failed-node task is queued again
and resumes from its checkpoint; before the time limit (``--signal B:USR1@lead``) the task requeues
itself with ``scontrol requeue``. Logs per task: RUNS/slurm/<array job>_<task>.log (Slurm's
messages) and the job's own job.log. ``--status`` says which jobs finished, failed, run or wait.
With ``--loo`` the base jobs get an array of their own and the transfer jobs whose base has not
finished a second one, submitted with ``--dependency=afterok:<the bases' array>`` (and the array of
any base still queued from an earlier submission) and ``--kill-on-invalid-dep=yes``: a failed base
cancels the transfer array instead of leaving it pending forever, and a rerun submits both again.
The bases are apart from the other jobs so that the transfer jobs wait for them only, and a failed
run of another row never holds them back. A transfer job finds its base run in the base job's
folder when it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from shared.cli import UsageError, check_writable
from shared.progress import format_duration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Row names in the order --methods lists them (--methods all); "wide" and "l2soft" are the study's extra rows.
ROW_NAMES = ("ppo_single", "ppo_mtl_embed", "wide", "ppo_varshare", "l2soft", "ppo_paco", "ppo_softmod",
             "ppo_pcgrad")
# VarShare's ablation rows outside --methods all: --ablations adds them (and l2soft), after l2soft.
ABLATIONS = {"beta0": ("--beta", "0"), "reparam": ("--estimator", "reparam"),
             "episode": ("--rollout-weights", "episode")}
# VarShare rows that only --methods names (one flag each, like ABLATIONS).
BY_NAME = {"onehot": ("--task-input", "onehot")}
VARSHARE_ONE_FLAG = {**ABLATIONS, **BY_NAME}
ALL_ROWS = (*ROW_NAMES[:ROW_NAMES.index("l2soft") + 1], "l2soft-tuned", *ABLATIONS, *BY_NAME,
            *ROW_NAMES[ROW_NAMES.index("l2soft") + 1:])
# Relative cost of a run per row (from the README's toy timings; the wide row's update is the
# largest). Local workers take the costliest jobs first, so that the last ones to start are short.
ROW_COST = {"wide": 3.0, "ppo_softmod": 2.0, "ppo_pcgrad": 1.6, "ppo_varshare": 1.3, "ppo_mtl_embed": 1.0,
            "l2soft": 0.9, "l2soft-tuned": 0.9, "ppo_single": 0.8, "ppo_paco": 0.7, "beta0": 1.3, "reparam": 0.9,
            "episode": 1.3, "onehot": 1.3}
# Leave-one-out: the scripts with a base run and transfer runs (they share parameters between
# tasks), and the regimes of each held-out task; ppo_single has the scratch regime only.
LOO_SCRIPTS = ("ppo_mtl_embed", "ppo_varshare", "ppo_paco", "ppo_softmod", "ppo_pcgrad")
REGIMES = ("base", "scratch", "finetune", "task-params")
# Flags the matrix sets itself: giving them after -- would make every job of a row the same run.
OWNED_FLAGS = {"--env-id": "--suites", "--seed": "--seeds", "--total-timesteps": "--budget",
               "--runs-dir": "--runs-dir", "--resume": "a rerun (it resumes by itself)",
               "--run-name-suffix": "the row (wide, l2soft, l2soft-tuned, beta0, reparam, episode, onehot)",
               "--init-from": "--loo", "--transfer": "--loo"}
# ... and these too when --loo is given (they define a leave-one-out job's tasks).
LOO_OWNED_FLAGS = {"--tasks": "--loo", "--holdout-task": "--loo"}


@dataclass(frozen=True)
class Preset:
    suites: tuple[str, ...]
    seeds: str
    budget: int
    flags: tuple[str, ...]
    runs_dir: str


# The default matrix: every row on the two toy suites that show sharing and conflict (cartpole-mt,
# cartpole-conflict), 2 seeds. 40,960 env steps is 16 iterations of 2,560 (5 tasks x 4 envs x 128
# steps); evaluations every 4 iterations give learning curves of 4 points, with 5 episodes per task
# (10 at the end) instead of 10 (20) to keep evaluation a small part of each run.
QUICK = Preset(suites=("cartpole-mt", "cartpole-conflict"), seeds="1-2", budget=40_960,
               flags=("--eval-every", "10240", "--eval-episodes", "5", "--final-eval-episodes", "10"),
               runs_dir=os.path.join("runs", "quick"))


# ----------------------------------------------------------------------------------------------
# Rows and jobs
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    name: str  # what --methods takes, and the row's folder under the suite
    script: str
    suffix: str = ""  # --run-name-suffix: the report's variant
    flags: tuple[str, ...] = ()  # after the flags given to every script, so that they define the row


@dataclass(frozen=True)
class Job:
    suite: str
    row: Row
    seed: int
    budget: int
    flags: tuple[str, ...]  # the flags after --, given to every script
    dir: str  # absolute: the job's folder, the script's --runs-dir
    holdout: str = ""  # leave-one-out: the held-out task ("" for the suite's own rows)
    regime: str = ""  # leave-one-out: base, scratch, finetune or task-params
    base: str = ""  # finetune and task-params: the base job's folder (absolute), which holds the run to start from

    @property
    def name(self) -> str:
        if self.holdout:
            return f"{self.suite}/loo-{self.holdout}/{self.row.name}/{self.regime}/seed{self.seed}"
        return f"{self.suite}/{self.row.name}/seed{self.seed}"

    def script_path(self) -> str:
        return os.path.join(REPO, "algos", f"{self.row.script}.py")

    def argv(self) -> list[str]:
        """The script's flags for a fresh start, without --runs-dir (recorded in job.json). A transfer
        job's --init-from is its base job's folder here; ``launch_argv`` puts the base run there."""
        suffix = ["--run-name-suffix", self.row.suffix] if self.row.suffix else []
        loo = {"": [], "base": ["--holdout-task", self.holdout], "scratch": ["--tasks", self.holdout]}.get(
            self.regime, ["--init-from", self.base, "--transfer", self.regime])
        return ["--env-id", self.suite, "--seed", str(self.seed), "--total-timesteps", str(self.budget),
                *self.flags, *self.row.flags, *suffix, *loo]

    def launch_argv(self) -> list[str] | None:
        """argv with --init-from pointing at the base job's finished run (None while it has none)."""
        argv = self.argv()
        if self.base:
            base_run = finished_run(self.base)
            if base_run is None:
                return None
            argv[argv.index("--init-from") + 1] = base_run
        return argv

    def to_json(self) -> dict:
        return {"suite": self.suite, "row": dataclasses.asdict(self.row), "seed": self.seed, "budget": self.budget,
                "flags": list(self.flags), "dir": self.dir, "holdout": self.holdout, "regime": self.regime,
                "base": self.base}

    @staticmethod
    def from_json(data: dict) -> "Job":
        row = data["row"]
        return Job(data["suite"], Row(row["name"], row["script"], row["suffix"], tuple(row["flags"])), data["seed"],
                   data["budget"], tuple(data["flags"]), data["dir"], data.get("holdout", ""),
                   data.get("regime", ""), data.get("base", ""))


def canonical_row(name: str) -> str:
    if name in ALL_ROWS:
        return name
    if f"ppo_{name}" in ALL_ROWS:  # "varshare" for "ppo_varshare"
        return f"ppo_{name}"
    raise UsageError(f"unknown method '{name}' in --methods; use any of: {', '.join(ALL_ROWS)} (or all)")


def parse_methods(names: list[str], ablations: bool = False) -> list[str]:
    """The rows, in ALL_ROWS order, once each; ``ablations`` adds l2soft, l2soft-tuned and the ABLATIONS rows."""
    if not names or names == ["all"]:
        wanted = set(ROW_NAMES)
    else:
        wanted = {canonical_row(n) for name in names for n in name.split(",") if n}
    if ablations:
        wanted |= {"l2soft", "l2soft-tuned", *ABLATIONS}
    return [name for name in ALL_ROWS if name in wanted]


def parse_seeds(text: str) -> list[int]:
    """'1-5' -> [1..5]; '1,3' -> [1, 3]; '1-3,7' -> [1, 2, 3, 7]."""
    seeds: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise UsageError(f"--seeds '{text}' is not a list of seeds; write e.g. 1-5, 1,3 or 1-3,7")
        last = int(match[2]) if match[2] is not None else int(match[1])
        seeds += [s for s in range(int(match[1]), last + 1) if s not in seeds]
    return seeds


def parse_budget(text: str, option: str = "--budget") -> int:
    """'60000', '60k', '20M' or '1.5M' env steps."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM]?)", text.strip())
    if not match:
        raise UsageError(f"{option} '{text}' is not a number of env steps; write e.g. 60000, 60k or 20M")
    value = float(match[1]) * {"": 1, "k": 1e3, "m": 1e6}[match[2].lower()]
    if value < 1 or value != int(value):
        raise UsageError(f"{option} '{text}' must be a whole, positive number of env steps")
    return int(value)


def check_suite(suite: str) -> None:
    from shared.suites import MULTITASK_SUITES

    if suite not in MULTITASK_SUITES:
        raise UsageError(f"unknown suite '{suite}' in --suites; use any of: {', '.join(MULTITASK_SUITES)}")


def suite_num_tasks(suite: str) -> int:
    from shared.suites import make_suite

    return make_suite(suite).num_tasks


def suite_budget(suite: str) -> int:
    from shared.suites import SUITE_DEFAULTS, make_suite

    return SUITE_DEFAULTS[make_suite(suite).defaults]["total_timesteps"]


def check_flags(flags: list[str], loo: bool = False) -> None:
    owned = {**OWNED_FLAGS, **(LOO_OWNED_FLAGS if loo else {})}
    for flag in flags:
        name = flag.split("=", 1)[0]
        if name in owned:
            raise UsageError(f"{name} after -- is set by the matrix for each job; use {owned[name]} instead")


def parse_script_args(script: str, suite: str, flags: tuple[str, ...]):
    """The script's Args for these flags, parsed by the script's own tyro parser: flags a script does
    not take are refused here, before any job starts, instead of failing every job of that row."""
    from shared.scripts import load_script

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            import tyro

            return tyro.cli(load_script(script).Args, args=["--env-id", suite, *flags])
    except SystemExit:
        # tyro draws a box (of dashes when not on a terminal): a title, then a first paragraph that
        # says which flag and why, then a rule
        lines = [line.strip(" │╭╮╰╯─-") for line in captured.getvalue().splitlines()[1:]]
        while lines and not lines[0]:
            lines.pop(0)
        paragraph = lines[:next((i for i, line in enumerate(lines) if not line or line.startswith("For full")),
                                len(lines))]
        reason = " ".join(paragraph) or "they do not parse"
        raise UsageError(f"algos/{script}.py refuses the flags after -- ({reason}); give flags every script "
                         f"takes, or narrow --methods to the scripts that take them") from None


def wide_row(suite: str, flags: tuple[str, ...]) -> Row:
    """Shared MTL at the width whose total stored parameter count is closest to VarShare's, both
    built with the flags given to every script (shapes only, on the meta device)."""
    from shared.capacity import build_agent, make_suite_defaults, matched_mtl_width
    from shared.params import count_parameters
    from shared.scripts import load_script

    def overrides(script: str) -> dict:
        args = parse_script_args(script, suite, flags)
        return {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.name != "env_id"}

    varshare = count_parameters(build_agent(load_script("ppo_varshare"), suite, **overrides("ppo_varshare")))
    mtl = overrides("ppo_mtl_embed")
    depth = len(mtl["hidden_sizes"] or make_suite_defaults(suite)["hidden_sizes"])
    width, _ = matched_mtl_width(suite, varshare["total"], **mtl)
    return Row("wide", "ppo_mtl_embed", "wide", ("--hidden-sizes", *[str(width)] * depth))


def suite_rows(suite: str, names: list[str], flags: tuple[str, ...]) -> list[Row]:
    rows = []
    for name in names:
        if name == "wide":
            rows.append(wide_row(suite, flags))
        elif name == "l2soft":
            rows.append(Row("l2soft", "ppo_varshare", "l2soft", ("--residual", "l2")))
        elif name == "l2soft-tuned":
            from shared.scripts import load_script
            from shared.suites import make_suite

            kind = make_suite(suite).kind
            tuned = load_script("ppo_varshare").L2SOFT_TUNED.get(kind)
            if tuned is None:
                print(f"l2soft-tuned: {suite} is a {kind} suite, which has no tuned L2Soft lambda (its L2Soft row "
                      f"is the matched one); the row is left out there", file=sys.stderr)
                continue
            rows.append(Row("l2soft-tuned", "ppo_varshare", "l2soft-tuned", ("--residual", "l2", *tuned)))
        elif name in VARSHARE_ONE_FLAG:
            rows.append(Row(name, "ppo_varshare", name, VARSHARE_ONE_FLAG[name]))
        else:
            rows.append(Row(name, name))
    return rows


def loo_tasks(suites: list[str], loo: list[str]) -> dict[str, list[str]]:
    """Held-out tasks per suite: every task for ``all``; otherwise the named tasks each suite has
    (a name no suite has is refused)."""
    from shared.suites import make_suite

    names = {suite: list(make_suite(suite).task_names) for suite in suites}
    if loo == ["all"]:
        return names
    wanted = list(dict.fromkeys(n for name in loo for n in name.split(",") if n))
    for task in wanted:
        if not any(task in tasks for tasks in names.values()):
            listed = "; ".join(f"{suite}: {', '.join(tasks)}" for suite, tasks in names.items())
            raise UsageError(f"--loo task '{task}' is in none of the suites ({listed}); name one of their tasks, "
                             f"or all")
    return {suite: [t for t in tasks if t in wanted] for suite, tasks in names.items()}


def loo_jobs(suite: str, tasks: list[str], names: list[str], seeds: list[int], budget: int, loo_budget: int,
             flags: tuple[str, ...], root: str) -> list[Job]:
    """Per held-out task, method row and seed: the base job, then scratch, finetune and task-params
    (ppo_single: scratch only), in RUNS/<suite>/loo-<task>/<row>/<regime>/seed<N>/."""
    jobs = []
    for task in tasks:
        for name in names:
            row = Row(name, name)
            regimes = REGIMES if name in LOO_SCRIPTS else ("scratch",)
            for regime in regimes:
                for seed in seeds:
                    folder = os.path.join(root, suite, f"loo-{task}", name, regime, f"seed{seed}")
                    base = os.path.join(root, suite, f"loo-{task}", name, "base", f"seed{seed}")
                    jobs.append(Job(suite, row, seed, budget if regime == "base" else loo_budget, flags, folder,
                                    holdout=task, regime=regime,
                                    base=base if regime in ("finetune", "task-params") else ""))
    return jobs


def plan(suites: list[str], names: list[str], seeds: list[int], budget: int | None, flags: tuple[str, ...],
         runs_dir: str, loo: list[str] | None = None, loo_budget: int | None = None,
         loo_only: bool = False) -> list[Job]:
    """The matrix's jobs: suites x rows x seeds, then with ``loo`` (task names, or ["all"]) the
    leave-one-out jobs of each suite (``loo_jobs``) at ``loo_budget`` (default: the budget / T);
    ``loo_only`` leaves out the suites' own rows (a transfer study at its own budget)."""
    for suite in suites:
        check_suite(suite)
    check_flags(list(flags), loo=bool(loo))
    loo_names = [name for name in names if name in (*LOO_SCRIPTS, "ppo_single")] if loo else []
    if loo and not loo_names:
        raise UsageError(f"--loo needs one of {', '.join(('ppo_single', *LOO_SCRIPTS))} in --methods (the wide and "
                         f"ablation rows have no leave-one-out jobs)")
    dropped = [name for name in names if name not in loo_names]
    if loo_only and dropped:  # said, not silent: these rows were asked for and get no job
        print(f"--loo-only: {', '.join(dropped)} {'has' if len(dropped) == 1 else 'have'} no leave-one-out jobs and "
              f"{'is' if len(dropped) == 1 else 'are'} left out", file=sys.stderr)
    held_out = loo_tasks(list(dict.fromkeys(suites)), loo) if loo else {}
    root = os.path.abspath(runs_dir)
    jobs = []
    for suite in dict.fromkeys(suites):
        rows = suite_rows(suite, names, flags)
        for script in sorted({row.script for row in rows} if flags else ()):
            parse_script_args(script, suite, flags)
        steps = budget if budget is not None else suite_budget(suite)
        for row in rows if not loo_only else ():
            for seed in seeds:
                folder = os.path.join(root, suite, row.name, f"seed{seed}")
                jobs.append(Job(suite, row, seed, steps, flags, folder))
        if held_out.get(suite):
            num_tasks = suite_num_tasks(suite)
            per_task = loo_budget if loo_budget is not None else steps // num_tasks
            if per_task < 1:
                raise UsageError(f"the budget {steps:,} leaves no env steps for one of {suite}'s {num_tasks} tasks; "
                                 f"give --loo-budget")
            jobs += loo_jobs(suite, held_out[suite], loo_names, seeds, steps, per_task, flags, root)
    return jobs



# ----------------------------------------------------------------------------------------------
# A job's state on disk
# ----------------------------------------------------------------------------------------------
def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_directories(job: Job) -> list[str]:
    """The script's run directories in the job folder, oldest first (their names end in a timestamp)."""
    return folder_runs(job.dir)


def folder_runs(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name, "args.json"))]


def finished_run(folder: str) -> str | None:
    """The newest finished run directory in a job folder (a transfer job's base run), or None."""
    return next((run_dir for run_dir in reversed(folder_runs(folder)) if is_finished(run_dir)), None)


def is_finished(run_dir: str) -> bool:
    summary = read_json(os.path.join(run_dir, "summary.json"))  # a summary cut short by a kill is not complete
    return isinstance(summary, dict) and isinstance(summary.get("per_task"), dict)


def has_checkpoint(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, "checkpoint.pt"))


def next_action(job: Job) -> tuple[str, str | None]:
    """("finished", dir), ("resume", dir) or ("start", None), from the job folder's run directories."""
    dirs = run_directories(job)
    for run_dir in reversed(dirs):
        if is_finished(run_dir):
            return "finished", run_dir
    for run_dir in reversed(dirs):
        if has_checkpoint(run_dir):
            return "resume", run_dir
    return "start", None


def job_record(job: Job) -> dict | None:
    return read_json(os.path.join(job.dir, "job.json"))


def check_same_command(job: Job) -> None:
    record = job_record(job)
    if record is not None and record.get("command") != job.argv():
        raise UsageError(f"{job.dir} holds a run of another configuration ({shlex.join(record.get('command') or [])}"
                         f" instead of {shlex.join(job.argv())}); use another --runs-dir for this matrix, or "
                         f"delete that folder")


def write_record(job: Job, update) -> None:
    """Change job.json (only the holder of job.lock writes it), atomically."""
    path = os.path.join(job.dir, "job.json")
    record = read_json(path) or {"job": job.name, "script": job.row.script, "command": job.argv(), "attempts": []}
    update(record)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)


class JobLock:
    """An flock on the job folder's job.lock, held while a process runs the job."""

    def __init__(self, job: Job):
        self.path = os.path.join(job.dir, "job.lock")
        self.file = None

    def acquire(self, wait: float = 0.0) -> bool:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.file = open(self.path, "a")
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self.file.close()
                    self.file = None
                    return False
                time.sleep(0.5)

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the file releases the lock
            self.file = None


def is_running(job: Job) -> bool:
    """Whether some process holds the job's lock (tested by taking it and letting go at once)."""
    if not os.path.exists(os.path.join(job.dir, "job.lock")):
        return False
    lock = JobLock(job)
    if lock.acquire():
        lock.release()
        return False
    return True


def last_progress(job: Job) -> str:
    """How far the job's run is, from the end of job.log: '23,040/60,000 steps' from the newest
    progress line, or 'step 20,480' from a newer evaluation line; '' before either."""
    try:
        with open(os.path.join(job.dir, "job.log"), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    found = list(re.finditer(r"\] ([\d,]+/[\d,]+ steps)|^step (\d+): eval", tail, re.MULTILINE))
    if not found:
        return ""
    return found[-1][1] or f"step {int(found[-1][2]):,}"


def final_result(run_dir: str) -> str:
    summary = read_json(os.path.join(run_dir, "summary.json")) or {}
    args = read_json(os.path.join(run_dir, "args.json")) or {}
    from shared.report import score_key

    key = score_key(args.get("env_id", ""))
    value = summary.get("final_return" if key == "return" else "final_success_rate")
    if value is None:
        return ""
    wall = summary.get("wall_time_s")
    text = f"final {key.replace('_', ' ')} {value:.3f}" if key != "return" else f"final return {value:.1f}"
    return text + (f", {format_duration(wall)} of training" if wall is not None else "")


# ----------------------------------------------------------------------------------------------
# Running one job (a local worker or a Slurm array task)
# ----------------------------------------------------------------------------------------------
def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def job_command(job: Job, action: str, run_dir: str | None, python: str) -> list[str]:
    """The script's command line; a transfer job whose base has not finished yet keeps the base
    job's folder as --init-from (what --dry-run shows)."""
    if action == "resume":
        return [python, job.script_path(), "--resume", run_dir]
    return [python, job.script_path(), *(job.launch_argv() or job.argv()), "--runs-dir", job.dir]


def remove_stale_runs(job: Job, log) -> None:
    for run_dir in run_directories(job):
        if not has_checkpoint(run_dir) and not is_finished(run_dir):
            log.write(f"[matrix] removing {run_dir}: it stopped before its first checkpoint\n")
            shutil.rmtree(run_dir, ignore_errors=True)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Parallel runs on shared cores: one BLAS/OpenMP thread each (the scripts set one torch thread).
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"  # job.log shows progress as it happens
    return env


class Runner:
    """Runs jobs as child processes and remembers them, so that an interrupted matrix can stop them."""

    def __init__(self, python: str, launcher: str):
        self.python, self.launcher = python, launcher
        self.children: dict[str, subprocess.Popen] = {}
        self.mutex = threading.Lock()
        self.stopping = False

    def run(self, job: Job, lock_wait: float = 5.0) -> tuple[str, int | None]:
        """Start or resume the job unless it is finished or running elsewhere. Returns (what happened:
        "finished", "busy", "start" or "resume"; the script's exit code, None when it did not run)."""
        lock = JobLock(job)
        if not lock.acquire(wait=lock_wait):
            return "busy", None
        try:
            check_same_command(job)
            action, run_dir = next_action(job)
            if action == "finished":
                return action, None
            if action == "start" and job.base and finished_run(job.base) is None:
                with open(os.path.join(job.dir, "job.log"), "a") as log:
                    log.write(f"[matrix] {now()} not started: its base run in {job.base} has not finished\n")
                return "no base", None
            attempt = {"started": now(), "action": action, "run_dir": run_dir, "launcher": self.launcher,
                       "host": socket.gethostname()}
            if os.environ.get("SLURM_JOB_ID"):
                attempt.update(slurm_task=slurm_task_id(), restart_count=int(os.environ.get("SLURM_RESTART_COUNT", 0)))
            if action == "start" and job.base:
                attempt["init_from"] = finished_run(job.base)  # the base run this attempt starts from
            with open(os.path.join(job.dir, "job.log"), "a") as log:
                if action == "start":
                    remove_stale_runs(job, log)
                command = job_command(job, action, run_dir, self.python)
                log.write(f"[matrix] {now()} {action} on {attempt['host']}"
                          + (f", Slurm task {attempt['slurm_task']} restart {attempt['restart_count']}"
                             if "slurm_task" in attempt else "") + f": {shlex.join(command)}\n")
                log.flush()
                write_record(job, lambda r: r["attempts"].append(attempt))
                with self.mutex:
                    if self.stopping:
                        return action, None
                    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=child_env())
                    self.children[job.name] = proc
                code = proc.wait()
                with self.mutex:
                    self.children.pop(job.name, None)
                log.write(f"[matrix] {now()} exit code {code}\n")

            def finish(record):
                record["attempts"][-1].update(ended=now(), exit_code=code)

            write_record(job, finish)
            return action, code
        finally:
            lock.release()

    def stop(self) -> None:
        with self.mutex:
            self.stopping = True
            for proc in self.children.values():
                if proc.poll() is None:
                    proc.terminate()


# ----------------------------------------------------------------------------------------------
# Status: what each job is doing
# ----------------------------------------------------------------------------------------------
def slurm_task_id() -> str:
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID", "")


def submissions(runs_dir: str) -> list[dict]:
    path = os.path.join(runs_dir, "slurm", "submissions.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def queued_tasks(runs_dir: str) -> dict[str, tuple[str, str]]:
    """Job name -> (Slurm task id, state and reason) for the tasks of this runs folder's submissions
    that Slurm still has in its queue (pending, running, requeued, completing). Empty without squeue."""
    latest: dict[str, str] = {}
    for submission in submissions(runs_dir):
        for index, name in enumerate(submission["jobs"]):
            latest[name] = f"{submission['array_job']}_{index}"
    if not latest or shutil.which("squeue") is None:
        return {}
    states: dict[str, str] = {}
    for array_job in sorted({task.split("_")[0] for task in latest.values()}):
        proc = subprocess.run(["squeue", "--noheader", "--array", "--jobs", array_job, "--format", "%i|%T|%r"],
                              capture_output=True, text=True)
        for line in proc.stdout.splitlines():  # an array Slurm no longer knows gives an error and no lines
            task, state, reason = (line.split("|") + ["", ""])[:3]
            states[task.strip()] = state.strip() + (f" ({reason.strip()})" if reason.strip() not in ("", "None")
                                                    else "")
    return {name: (task, states[task]) for name, task in latest.items() if task in states}


def job_status(job: Job, queued: dict[str, tuple[str, str]]) -> tuple[str, str]:
    """(state, detail): finished, running, pending, failed, interrupted or not started."""
    action, run_dir = next_action(job)
    if action == "finished":
        return "finished", final_result(run_dir)
    if is_running(job):
        where = f"Slurm task {queued[job.name][0]}, " if job.name in queued else ""
        return "running", where + (last_progress(job) or "starting")
    if job.name in queued:
        task, state = queued[job.name]
        return ("running" if state.startswith(("RUNNING", "COMPLETING")) else "pending"), f"Slurm task {task}: {state}"
    record = job_record(job) or {}
    attempts = record.get("attempts") or []
    log = display(os.path.join(job.dir, "job.log"))
    code = attempts[-1].get("exit_code") if attempts else None
    if code is not None and code > 0:
        return "failed", f"exit code {code} (attempt {len(attempts)}); see {log}"
    if code is not None and code < 0:  # stopped by a signal (Ctrl-C, kill): nothing wrong with the run itself
        return "interrupted", f"stopped by signal {-code}: a rerun {'resumes' if action == 'resume' else 'restarts'} it"
    if action == "resume":
        return "interrupted", f"{last_progress(job) or 'checkpoint'}: a rerun resumes it; see {log}"
    if attempts:
        return "interrupted", f"stopped before its first checkpoint: a rerun starts it again; see {log}"
    if job.base and finished_run(job.base) is None:
        return "not started", f"after its base in {display(job.base)}"
    return "not started", ""


STATES = ("finished", "running", "pending", "failed", "interrupted", "not started")


def print_status(jobs: list[Job], runs_dir: str) -> dict[str, int]:
    queued = queued_tasks(runs_dir)
    counts = dict.fromkeys(STATES, 0)
    width = max(len(job.name) for job in jobs)
    for job in jobs:
        state, detail = job_status(job, queued)
        counts[state] += 1
        print(f"{job.name:<{width}}  {state:<11}  {detail}".rstrip())
    print(f"{len(jobs)} jobs: " + ", ".join(f"{n} {state}" for state, n in counts.items() if n))
    return counts


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def display(path: str) -> str:
    """A path as a user would type it from the repository root."""
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else path


def display_command(command: list[str]) -> str:
    return shlex.join([display(part) if os.path.isabs(part) else part for part in command])


def local_order(job: Job) -> tuple:
    """Leave-one-out bases first (each holds back two transfer jobs), then the suite's rows, then the
    short leave-one-out runs; within each, the costliest row first, so that the last to start are short."""
    stage = 0 if job.regime == "base" else 1 if not job.regime else 2
    return stage, -ROW_COST.get(job.row.name, 1.0)


def run_local(jobs: list[Job], workers: int, python: str) -> list[Job]:
    """Run the jobs on ``workers`` parallel processes; returns the jobs that failed, or that were
    not run because their base failed. A transfer job starts once its base finished; while it waits,
    the workers take the next jobs that can start."""
    runner = Runner(python, "local")
    order = sorted(jobs, key=local_order)  # stable: suites and seeds keep their order
    in_run = {job.dir: job for job in jobs}
    ended: dict[str, bool] = {}  # job folder -> whether its run finished, for the jobs of this run that ended
    failed: list[Job] = []
    remaining = list(order)
    active: dict[str, tuple[Job, threading.Thread, float]] = {}
    results: dict[str, tuple[str, int | None]] = {}
    total, done, started = len(order), 0, time.monotonic()
    last_heartbeat = started

    def work(job: Job) -> None:
        results[job.name] = runner.run(job)

    def blocked(job: Job) -> str | None:
        """None when the job may start; "wait" while its base runs here; else why it cannot run."""
        if not job.base or finished_run(job.base) is not None:
            return None
        base = in_run.get(job.base)
        if base is not None and base.dir not in ended:
            return "wait"
        if base is not None and results.get(base.name, ("",))[0] == "busy":
            return f"its base {base.name} runs in another process; run the matrix again once it finished"
        if base is not None:
            return f"its base {base.name} failed"
        return f"its base run in {display(job.base)} has not finished"

    try:
        while remaining or active:
            for job in list(remaining):
                if len(active) >= workers:
                    break
                why = blocked(job)
                if why == "wait":
                    continue
                remaining.remove(job)
                if why is not None:
                    done += 1
                    failed.append(job)
                    ended[job.dir] = False
                    print(f"  NOT RUN {job.name} ({done}/{total}): {why}; a rerun runs it", flush=True)
                    continue
                thread = threading.Thread(target=work, args=(job,), daemon=True)
                active[job.name] = (job, thread, time.monotonic())
                thread.start()
                print(f"[{done + len(active):>{len(str(total))}}/{total}] start {job.name}: "
                      f"log {display(os.path.join(job.dir, 'job.log'))}", flush=True)
            time.sleep(0.2)
            for name, (job, thread, began) in list(active.items()):
                if thread.is_alive():
                    continue
                del active[name]
                done += 1
                action, code = results.get(name, ("error", None))
                ended[job.dir] = next_action(job)[0] == "finished"
                took = format_duration(time.monotonic() - began)
                if action == "busy":
                    print(f"  skipped {name}: another process runs it", flush=True)
                elif code == 0 or action == "finished":
                    run_dir = next_action(job)[1]
                    print(f"  done {name} in {took} ({done}/{total}): {final_result(run_dir) if run_dir else ''}",
                          flush=True)
                elif action == "no base":
                    failed.append(job)
                    print(f"  NOT RUN {name}: its base run in {display(job.base)} has not finished", flush=True)
                else:
                    failed.append(job)
                    print(f"  FAILED {name} after {took} (exit code {code}); last lines of "
                          f"{display(os.path.join(job.dir, 'job.log'))}:\n{log_tail(job)}", flush=True)
            if active and time.monotonic() - last_heartbeat >= 60:
                last_heartbeat = time.monotonic()
                running = ", ".join(f"{job.name} {last_progress(job) or 'starting'}" for job, _, _ in active.values())
                print(f"  [{format_duration(last_heartbeat - started)}] {done}/{total} done; running: {running}",
                      flush=True)
    except KeyboardInterrupt:
        runner.stop()
        for _, thread, _ in active.values():
            thread.join(timeout=30)
        raise
    return failed


def log_tail(job: Job, lines: int = 8) -> str:
    try:
        with open(os.path.join(job.dir, "job.log"), errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError:
        return "(no log)"


@dataclass
class SlurmOptions:
    cpus_per_task: int = 2
    mem: str = "8G"
    time: str = "24:00:00"
    partition: str | None = None
    gpus: str | None = None
    max_running: int | None = None
    requeue_lead: int = 300
    max_requeues: int = 20
    sbatch_options: tuple[str, ...] = ()
    job_name: str = "mtrl-matrix"


def sbatch_script(plan_path: str, count: int, logs: str, python: str, opts: SlurmOptions, note: str = "") -> str:
    """The batch script of one job array: one task per job of the plan."""
    throttle = f"%{opts.max_running}" if opts.max_running else ""
    lines = ["#!/bin/bash",
             "# One array task per run of the matrix (shared/matrix.py): it starts or resumes its run.",
             *([f"# {note}"] if note else []),
             f"#SBATCH --job-name={opts.job_name}",
             f"#SBATCH --array=0-{count - 1}{throttle}",
             f"#SBATCH --cpus-per-task={opts.cpus_per_task}",
             f"#SBATCH --mem={opts.mem}",
             f"#SBATCH --time={opts.time}"]
    lines += [f"#SBATCH --partition={opts.partition}"] if opts.partition else []
    lines += [f"#SBATCH --gpus={opts.gpus}"] if opts.gpus else []
    lines += ["# queued again after preemption or node failure; a requeued task resumes from its checkpoint",
              "#SBATCH --requeue",
              "#SBATCH --open-mode=append",
              f"# USR1 {opts.requeue_lead} s before the time limit: the task requeues itself (scontrol requeue)",
              f"#SBATCH --signal=B:USR1@{opts.requeue_lead}",
              f"#SBATCH --output={logs}/%A_%a.log"]
    lines += [f"#SBATCH {option}" for option in opts.sbatch_options]
    lines += [f"cd {shlex.quote(REPO)}",
              f"exec {shlex.quote(python)} -m shared.matrix --run-task {shlex.quote(plan_path)} "
              f"\"$SLURM_ARRAY_TASK_ID\""]
    return "\n".join(lines) + "\n"


# The arrays of one submission: (part of the file names and job name, note in the batch script).
ARRAYS = {"": ("", ""),
          "bases": (".bases", "Leave-one-out base runs: the transfer array waits for this one (afterok)."),
          "transfers": (".transfers", "Leave-one-out transfer runs, submitted with --dependency=afterok on the "
                                      "array of their base runs: each starts from its base job's finished run.")}


def submit_slurm(jobs: list[Job], runs_dir: str, python: str, opts: SlurmOptions, dry_run: bool, part: str = "",
                 after: list[str] | None = None, stamp: str | None = None) -> str | None:
    """Write the plan and the batch script under RUNS/slurm and submit one array; returns its job id.
    ``part`` names one of the ARRAYS; ``after``: array job ids that must all end well first
    (--dependency=afterok; on a dry run the placeholder text for the bases' array is allowed)."""
    slurm_dir = os.path.join(os.path.abspath(runs_dir), "slurm")
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    suffix, note = ARRAYS[part]
    plan_path = os.path.join(slurm_dir, f"{stamp}{suffix}.plan.json")
    script_path = os.path.join(slurm_dir, f"{stamp}{suffix}.sbatch")
    job_name = opts.job_name + (f"-{part}" if part else "")
    script = sbatch_script(plan_path, len(jobs), slurm_dir, python, dataclasses.replace(opts, job_name=job_name), note)
    dependency = ["--dependency=afterok:" + ":".join(after), "--kill-on-invalid-dep=yes"] if after else []
    command = ["sbatch", "--parsable", *dependency, script_path]
    if dry_run:
        print(f"# the batch script{f' of the {part}' if part else ''} (not submitted):")
        print("\n".join(f"# | {line}" for line in script.splitlines()))
        print(f"# submitted with: {' '.join(command[:-1])} {display(script_path)}")
        return None
    os.makedirs(slurm_dir, exist_ok=True)
    with open(plan_path, "w") as f:
        json.dump({"python": python, "max_requeues": opts.max_requeues, "jobs": [job.to_json() for job in jobs]},
                  f, indent=2)
    with open(script_path, "w") as f:
        f.write(script)
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UsageError(f"sbatch refused {display(script_path)} ({proc.stderr.strip() or proc.stdout.strip()}); fix "
                         f"the Slurm options (--partition, --time, --mem, --sbatch-option) and rerun")
    array_job = proc.stdout.strip().split(";")[0]
    with open(os.path.join(slurm_dir, "submissions.jsonl"), "a") as f:
        f.write(json.dumps({"array_job": array_job, "submitted": now(), "plan": plan_path, "script": script_path,
                            "jobs": [job.name for job in jobs], "after": after or []}) + "\n")
    return array_job


def submit_arrays(to_run: list[Job], by_dir: dict[str, Job], queued: dict[str, tuple[str, str]], runs_dir: str,
                  python: str, opts: SlurmOptions, dry_run: bool) -> list[tuple[str | None, str, list[Job]]]:
    """Submit the jobs that need running as up to three arrays: the jobs that wait for nothing, the
    leave-one-out bases, and the transfer jobs whose base has not finished, after the bases' array
    and any earlier array in which a base is still queued. Returns (array job id, part, jobs) each."""
    pending = {job.dir for job in to_run}
    bases = [job for job in to_run if job.regime == "base"]
    waiting = [job for job in to_run if job.base and finished_run(job.base) is None]
    free = [job for job in to_run if job not in bases and job not in waiting]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    submitted = []
    for part, jobs in (("", free), ("bases", bases)):
        if jobs:
            submitted.append((submit_slurm(jobs, runs_dir, python, opts, dry_run, part, stamp=stamp), part, jobs))
    if waiting:
        after = set()
        for job in waiting:
            base = by_dir[job.base]
            if base.dir in pending:
                after.add(submitted[-1][0] or "<the bases' array job>")
            else:  # queued from an earlier submission (run_matrix leaves out the other cases)
                after.add(queued[base.name][0].split("_")[0])
        submitted.append((submit_slurm(waiting, runs_dir, python, opts, dry_run, "transfers", sorted(after), stamp),
                          "transfers", waiting))
    return submitted


def run_task(plan_path: str, index: int) -> int:
    """One Slurm array task: start or resume job ``index`` of the plan. USR1 (sent ahead of the time
    limit, --signal) makes the task requeue itself, so that its next attempt resumes the run."""
    with open(plan_path) as f:
        plan_data = json.load(f)
    job = Job.from_json(plan_data["jobs"][index])
    task = slurm_task_id()
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    print(f"[matrix] {now()} {job.name}: Slurm task {task}, restart {restarts}, host {socket.gethostname()}",
          flush=True)

    began = time.time()

    def requeue(signum, frame):
        # Requeue only a run that has moved on: one that wrote no checkpoint in this attempt (a time
        # limit shorter than --checkpoint-every plus start-up) would start over from the same point forever.
        progressed = any(os.path.getmtime(os.path.join(d, "checkpoint.pt")) > began
                         for d in run_directories(job) if has_checkpoint(d))
        if restarts >= plan_data["max_requeues"] or not progressed:
            why = f"{restarts} restarts already" if progressed else "no checkpoint written in this attempt"
            print(f"[matrix] {now()} time limit near; not requeued ({why}): raise --time, or lower the scripts' "
                  f"--checkpoint-every", flush=True)
            return
        print(f"[matrix] {now()} time limit near: requeueing {task}; it resumes from its last checkpoint", flush=True)
        subprocess.run(["scontrol", "requeue", task], check=False)

    signal.signal(signal.SIGUSR1, requeue)
    # A requeued task can start while its previous attempt's processes are still being cleaned up:
    # wait for the job's lock rather than give up at once.
    try:
        action, code = Runner(plan_data["python"], "slurm").run(job, lock_wait=120.0)
    except UsageError as err:  # the job folder was given to another configuration after submission
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"[matrix] {now()} {job.name}: {action}" + (f", exit code {code}" if code is not None else ""), flush=True)
    if action == "busy":
        print(f"[matrix] another process holds {job.dir}/job.lock; this task leaves the job to it", flush=True)
        return 0
    if action == "no base":
        print(f"[matrix] its base run in {job.base} has not finished; run the matrix again once it has", flush=True)
        return 1
    return code or 0


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_all.sh", description="The experiment matrix: suites x methods x seeds, local or on Slurm, "
        "resumable, ending in the report. Flags after -- go to every script.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--suites", "--suite", nargs="+", default=None,
                        help=f"multi-task suites (default: the quick matrix, {', '.join(QUICK.suites)} at "
                             f"{QUICK.budget:,} steps)")
    parser.add_argument("--methods", "--method", nargs="+", default=["all"],
                        help=f"rows: {' '.join(ALL_ROWS)} (ppo_ may be left out), or all (every row but "
                             f"l2soft-tuned, {', '.join(VARSHARE_ONE_FLAG)})")
    parser.add_argument("--ablations", action="store_true",
                        help=f"add VarShare's ablation rows: l2soft, l2soft-tuned (Meta-World suites) and "
                             f"{', '.join(ABLATIONS)} (ppo_varshare with "
                             + ", ".join(f"{' '.join(flags)}" for flags in ABLATIONS.values()) + ")")
    parser.add_argument("--seeds", default=QUICK.seeds, help="seeds, e.g. 1-5, 1,3 or 1-3,7")
    parser.add_argument("--budget", default=None,
                        help="total env steps per run, e.g. 3M (default: the suite's own; the quick matrix's "
                             f"{QUICK.budget:,} without --suites)")
    parser.add_argument("--loo", nargs="+", default=None, metavar="TASK",
                        help="leave-one-out transfer: for each named task (or all), method and seed a base run on "
                             "the other tasks, then scratch, finetune and task-params runs on the task; in "
                             "RUNS/<suite>/loo-<task>/<method>/<regime>/seed<N>/")
    parser.add_argument("--loo-budget", default=None,
                        help="env steps of each scratch, finetune and task-params run (default: the budget / the "
                             "suite's number of tasks, one task's share of the multi-task run)")
    parser.add_argument("--loo-only", action="store_true",
                        help="with --loo: only the leave-one-out jobs (base and transfer runs), not the suites' own "
                             "rows, e.g. for a transfer study at a budget of its own")
    parser.add_argument("--runs-dir", default=None,
                        help=f"where the job folders go (default: {QUICK.runs_dir} for the quick matrix, "
                             f"{os.path.join('runs', 'matrix')} with --suites)")
    parser.add_argument("--report-dir", default=None, help="where the report goes (default: report/<runs folder name>)")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local")
    parser.add_argument("--jobs", type=int, default=None, help="local: runs at once (default: one per core)")
    parser.add_argument("--dry-run", action="store_true", help="print each job's command, one per line; run nothing")
    parser.add_argument("--status", action="store_true",
                        help="say which jobs finished, failed, run or wait (add it to the command that launched them)")
    slurm = parser.add_argument_group("Slurm (--launcher slurm)")
    slurm.add_argument("--cpus-per-task", type=int, default=SlurmOptions.cpus_per_task)
    slurm.add_argument("--mem", default=SlurmOptions.mem, help="memory per task")
    slurm.add_argument("--time", default=SlurmOptions.time, help="time limit per task (a task requeues itself "
                       "before it and resumes, so it need not cover a whole run)")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--gpus", default=None, help="GPUs per task, e.g. 1")
    slurm.add_argument("--max-running", type=int, default=None, help="at most this many tasks at once (--array %%N)")
    slurm.add_argument("--requeue-lead", type=int, default=SlurmOptions.requeue_lead,
                       help="seconds before the time limit at which a task requeues itself")
    slurm.add_argument("--max-requeues", type=int, default=SlurmOptions.max_requeues,
                       help="a task requeues itself at most this many times")
    slurm.add_argument("--sbatch-option", action="append", default=[], metavar="OPTION",
                       help="one more sbatch option, e.g. --sbatch-option=--account=abc (repeatable)")
    parser.add_argument("--run-task", nargs=2, metavar=("PLAN", "INDEX"), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a command line: "run_all.sh --dry-run | head" should end quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = list(sys.argv[1:] if argv is None else argv)
    flags: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, flags = argv[:split], argv[split + 1:]
    opts = build_parser().parse_args(argv)
    if opts.run_task:
        return run_task(opts.run_task[0], int(opts.run_task[1]))
    try:
        return run_matrix(opts, tuple(flags))
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def slurm_seconds(text: str) -> int | None:
    """sbatch --time in seconds: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
    days-hours:minutes or days-hours:minutes:seconds; None when it is none of them."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        return None
    days, first, second, third = (int(g) if g else 0 for g in match.groups())
    if match[1]:  # days-hours[:minutes[:seconds]]
        return ((days * 24 + first) * 60 + second) * 60 + third
    if match[4]:  # hours:minutes:seconds
        return (first * 60 + second) * 60 + third
    return first * 60 + second  # minutes[:seconds]


def run_matrix(opts, flags: tuple[str, ...]) -> int:
    quick = opts.suites is None
    if opts.launcher == "slurm" and not opts.dry_run and shutil.which("sbatch") is None:
        raise UsageError("--launcher slurm needs sbatch on the PATH; run this on the cluster's login node (after "
                         "loading its Slurm module), or use --launcher local")
    if opts.launcher == "slurm":
        limit = slurm_seconds(opts.time)
        if limit is not None and opts.requeue_lead >= limit:
            raise UsageError(f"--requeue-lead {opts.requeue_lead} s is not shorter than --time {opts.time}: every task "
                             f"would requeue itself at once; lower --requeue-lead or raise --time")
    if opts.jobs is not None and opts.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {opts.jobs}")
    parser = build_parser()  # options of the other launcher would silently do nothing
    ignored = (["jobs"] if opts.launcher == "slurm" else SLURM_FLAGS)
    given = [name for name in ignored if getattr(opts, name) != parser.get_default(name)]
    if given:
        raise UsageError(f"--{given[0].replace('_', '-')} does nothing with --launcher {opts.launcher}; drop it or "
                         f"use --launcher {'local' if opts.launcher == 'slurm' else 'slurm'}")
    suites = list(QUICK.suites if quick else opts.suites)
    runs_dir = opts.runs_dir or (QUICK.runs_dir if quick else os.path.join("runs", "matrix"))
    budget = parse_budget(opts.budget) if opts.budget is not None else (QUICK.budget if quick else None)
    if opts.loo_budget is not None and not opts.loo:
        raise UsageError("--loo-budget sets the leave-one-out runs' budget; give --loo TASK (or --loo all) with it")
    if opts.loo_only and not opts.loo:
        raise UsageError("--loo-only runs the leave-one-out jobs alone; give --loo TASK (or --loo all) with it")
    loo_budget = parse_budget(opts.loo_budget, "--loo-budget") if opts.loo_budget is not None else None
    all_flags = (QUICK.flags if quick else ()) + flags
    jobs = plan(suites, parse_methods(opts.methods, opts.ablations), parse_seeds(opts.seeds), budget, all_flags,
                runs_dir, loo=opts.loo, loo_budget=loo_budget, loo_only=opts.loo_only)
    for job in jobs:
        check_same_command(job)
    if opts.status:
        print_status(jobs, runs_dir)
        return 0
    if not opts.dry_run:
        check_writable(runs_dir)

    queued = queued_tasks(runs_dir)
    by_dir = {job.dir: job for job in jobs}
    to_run, skipped = [], []
    for job in jobs:
        action, run_dir = next_action(job)
        if action == "finished":
            skipped.append((job, "finished"))
        elif is_running(job):
            skipped.append((job, "running in another process"))
        elif job.name in queued:
            skipped.append((job, f"queued in Slurm as {queued[job.name][0]} ({queued[job.name][1]})"))
        else:
            to_run.append((job, action, run_dir))
    # A transfer job can start once its base finished, or after it in this matrix or in Slurm's queue;
    # a base that runs in another process (another local matrix) leaves it to a later rerun.
    will_run = {job.dir for job, _, _ in to_run}
    for item in list(to_run):
        job = item[0]
        if (item[1] == "start" and job.base and finished_run(job.base) is None and job.base not in will_run
                and by_dir[job.base].name not in queued):
            to_run.remove(item)
            skipped.append((job, f"its base {by_dir[job.base].name} runs in another process; run the matrix "
                                 f"again once it finished"))
    python = sys.executable
    if opts.dry_run:
        for job, reason in skipped:
            print(f"# skip {job.name}: {reason}")
        for job, action, run_dir in to_run:
            waits = action == "start" and job.base and finished_run(job.base) is None
            print(display_command(job_command(job, action, run_dir, python))
                  + (f"  # after {by_dir[job.base].name}: --init-from is its run directory" if waits else ""))
        if opts.launcher == "slurm" and to_run:
            submit_arrays([job for job, _, _ in to_run], by_dir, queued, runs_dir, python, slurm_options(opts),
                          dry_run=True)
        return 0

    held_out = sorted({(j.suite, j.holdout) for j in jobs if j.holdout})
    print(f"matrix: {len(jobs)} jobs ({', '.join(suites)}; {len({j.row.name for j in jobs if not j.holdout})} rows"
          + (f"; leave-one-out of {len(held_out)} tasks" if held_out else "") + f"; seeds "
          f"{opts.seeds}; {', '.join(sorted({f'{j.budget:,}' for j in jobs}))} env steps) in {display(runs_dir)}: "
          f"{sum(r == 'finished' for _, r in skipped)} finished, "
          f"{sum(r != 'finished' for _, r in skipped)} running elsewhere, "
          f"{sum(a == 'resume' for _, a, _ in to_run)} to resume, {sum(a == 'start' for _, a, _ in to_run)} to start",
          flush=True)
    for job, reason in skipped:
        if reason != "finished":
            print(f"  skipped {job.name}: {reason}")
    if opts.launcher == "slurm":
        waiting = sum(reason != "finished" for _, reason in skipped)
        if to_run:
            arrays = submit_arrays([job for job, _, _ in to_run], by_dir, queued, runs_dir, python,
                                   slurm_options(opts), False)
            for array_job, part, array in arrays:
                what = {"": "", "bases": " (leave-one-out bases)",
                        "transfers": " (leave-one-out transfer runs, after their bases)"}[part]
                print(f"submitted Slurm array job {array_job}{what}: {len(array)} tasks; logs in "
                      f"{display(os.path.join(runs_dir, 'slurm'))}/{array_job}_<task>.log and each job folder's "
                      f"job.log")
        if to_run or waiting:
            print("see where the jobs are with the same command and --status; run the command again once they are "
                  "done to write the report")
            return 0
        print("nothing to submit: every run finished")
    failed: list[Job] = []
    if opts.launcher == "local" and to_run:
        workers = opts.jobs or len(os.sched_getaffinity(0))
        try:
            failed = run_local([job for job, _, _ in to_run], workers, python)
        except KeyboardInterrupt:
            print("interrupted: run the same command again to resume the unfinished runs", file=sys.stderr)
            return 130
    unfinished = [job for job in jobs if next_action(job)[0] != "finished"]
    if len(unfinished) < len(jobs):
        write_report(runs_dir, opts.report_dir)
    if failed or unfinished:
        print(f"{len(failed)} failed, {len(unfinished)} not finished: " + ", ".join(j.name for j in unfinished))
        return 1
    return 0


SLURM_FLAGS = ("cpus_per_task", "mem", "time", "partition", "gpus", "max_running", "requeue_lead", "max_requeues",
               "sbatch_option")


def slurm_options(opts) -> SlurmOptions:
    return SlurmOptions(opts.cpus_per_task, opts.mem, opts.time, opts.partition, opts.gpus, opts.max_running,
                        opts.requeue_lead, opts.max_requeues, tuple(opts.sbatch_option))


def write_report(runs_dir: str, report_dir: str | None) -> None:
    from shared.report import build_report

    out = report_dir or os.path.join("report", os.path.basename(os.path.normpath(runs_dir)))
    path = build_report(runs_dir, out)
    print(f"report: {display(path)}")


if __name__ == "__main__":
    sys.exit(main())
