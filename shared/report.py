"""The study's report: ``python -m shared.report RUNS_DIR [--out report/] [--reps 50000] [--seed 0] [--wandb]``.

Reads every run directory under RUNS_DIR (a folder holding ``args.json``) through its
``args.json``, ``eval.jsonl`` and ``summary.json`` only, never the tensorboard files, and writes
``OUT/README.md`` with PNG figures beside it.

Rows. Runs are grouped by suite (``env_id``, plus ``--tasks`` when given), method (the script,
``algo``) and variant (``run_name_suffix``); leave-one-out runs (below) have a section of their
own. Conventions:

- VarShare, the reference row, is ``ppo_varshare`` with ``--residual variational``, none of the
  ablation settings below and no suffix. ``--residual l2`` is shown as L2Soft (a suffix ``l2soft``
  adds nothing, ``l2soft-tuned`` reads "L2Soft tuned"; another suffix is kept) and listed right
  after VarShare, as are the other ablations, each named from args.json whatever its suffix (a
  suffix equal to the matrix row's name adds nothing): ``--beta 0`` is "beta=0", ``--estimator
  reparam`` "reparam estimator", ``--rollout-weights episode`` "episode weights". The ablation
  section sets each beside VarShare.
- Shared MTL (and PCGrad) with ``--task-encoding none`` is "task-blind", with ``--task-encoding
  learned`` "learned encoding", named from args.json whatever the suffix (a suffix ``taskblind``
  or ``learned`` adds nothing), so neither ever joins the one-hot row.
- VarShare with ``--task-input onehot`` is "one-hot input" (joined by " + " to any ablation it
  also sets; a suffix ``onehot`` adds nothing), so it never joins VarShare's reference row.
- VarShare (or L2Soft) with ``--prior-step prox`` is "prox step", joined the same way (a suffix
  ``prox`` adds nothing).
- The capacity-matched row is a shared-MTL run (``ppo_mtl_embed``) whose ``--run-name-suffix``
  contains ``wide`` (for example ``wide``; ``python -m shared.capacity`` gives the width); it is
  listed right after shared MTL.
- A run averaged in has a readable ``summary.json`` (it finished) and the budget
  (``total_timesteps``) that most finished runs of its suite have (a tie goes to the larger
  budget). Every other run is listed under "Not averaged in", with the reason.

Leave-one-out runs (PROTOCOL section 7) are told apart by their args.json, not by their folders, so
that runs launched by hand count too: a run with ``init_from`` is a transfer run of its
``transfer`` regime (finetune or task-params) on its one task; a run with ``holdout_task`` is a
base run; a run of exactly one task that a base run of the same suite held out is that task's
scratch run (ppo_single's one-task run is the oracle's). None of them enters the suite's tables;
the transfer section reports them per suite, held-out task, method and regime: the zero-shot score
(the eval.jsonl line labelled ``zero-shot``, step 0), the final score and the area under the score
curve, each an IQM over runs with its stratified-bootstrap interval, and one learning-curve figure
per suite and held-out task. Area under the curve: the trapezoid rule through the run's
evaluations (the zero-shot one at step 0, the periodic ones, the final one), divided by the env
steps of the final evaluation (the budget, rounded down to whole iterations): the mean score over
training. A scratch run has no evaluation before training; its curve starts at 0 at step 0 (a
fresh policy's success rate; on the return-scored suites a little below a random policy's
return). The majority-budget rule applies per suite and held-out task, to the base runs and to the
other regimes separately. The final score is the final evaluation's, as in the suites' tables (the
summary.json of a finished run holds it).

Score. The final evaluation's (``summary.json``) mean success rate per task; on suites whose
success is a return threshold (the cartpole and lunarlander suites, single gymnasium ids) the mean
return per task, since there success only restates the return in one bit.

Statistics, with rliable's definitions (Agarwal et al. 2021, "Deep Reinforcement Learning at the
Edge of the Statistical Precipice"). A row's scores form a matrix [runs, tasks].

- IQM: the mean of the middle half of all runs x tasks scores, as ``scipy.stats.trim_mean(x,
  0.25)`` computes it (rliable's ``aggregate_iqm``): sort, drop ``int(0.25 * n)`` scores from each
  end, average the rest. (No fractional weighting: with 3 scores nothing is dropped, with 5 one
  from each end.)
- 95% interval: stratified bootstrap. Each resample draws, within each task separately, as many
  runs as the task has, with replacement; the interval is the 2.5th and 97.5th percentiles
  (numpy's linear interpolation) of the resampled IQMs.
- Probability of improvement P(VarShare > row): per task, the fraction of (VarShare run, row run)
  pairs in which VarShare scores higher, ties counting 1/2 (the Mann-Whitney U over n * m);
  averaged over tasks. Its interval resamples both rows the same stratified way.
- Learning curves: the IQM over runs x tasks of the periodic evaluations (``eval.jsonl`` lines
  with ``final`` false and no label) against env steps, the band its stratified-bootstrap interval.
  Runs evaluated at different steps are linearly interpolated onto the steps they all cover.

Why numpy rather than the ``rliable`` package: rliable 1.2.0 pulls arch, pandas, statsmodels,
seaborn and their own dependencies (about 160 MB beyond this project's packages), and with what
pip resolves for it next to numpy 2.4 on Python 3.11 (arch 7.2.0, pandas 3.1.1) ``import
rliable`` fails inside arch; it works only with pandas held below 3. The three definitions above
are a few lines each; tests/test_report.py checks them on hand-computed cases, and on random
score matrices they gave rliable 1.2.0's IQM and probability of improvement exactly and its
intervals to three decimals. Intervals are seeded (``--seed``, and each row's name), so a report
is reproducible.

``--wandb`` also logs the tables (rows, per task, runs not averaged in) and the figures to one
wandb run of job type "report" in ``--wandb-project``; it works with ``WANDB_MODE=offline`` and
no account.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import sys
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from shared.cli import UsageError
from shared.scripts import load_script
from shared.suites import make_suite

REFERENCE = ("ppo_varshare", "")
METHOD_ORDER = ["ppo_varshare", "ppo_mtl_embed", "ppo_pcgrad", "ppo_softmod", "ppo_paco", "ppo_single"]
METHOD_NAMES = {"ppo_varshare": "VarShare", "ppo_mtl_embed": "shared MTL", "ppo_pcgrad": "PCGrad",
                "ppo_softmod": "Soft Modularization", "ppo_paco": "PaCo", "ppo_single": "single-task"}
# One colour per method and variant in every figure; variants without an entry get a colour from
# EXTRA_COLOURS picked by a checksum of their name, so it too is the same in every report.
COLOURS = {"ppo_varshare": "#d62728", "L2Soft": "#ff7f0e", "ppo_mtl_embed": "#1f77b4", "capacity": "#17becf",
           "ppo_pcgrad": "#8c564b", "ppo_softmod": "#9467bd", "ppo_paco": "#2ca02c", "ppo_single": "#7f7f7f"}
EXTRA_COLOURS = ["#e377c2", "#bcbd22", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
                 "#f7b6d2", "#dbdb8d", "#9edae5", "#393b79"]
CHUNK = 4096  # bootstrap resamples computed at once: bounds memory on large suites


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------
def iqm(scores) -> float:
    """Interquartile mean of all scores (any shape), as scipy's trim_mean(x, 0.25)."""
    return float(_iqm_batch(np.asarray(scores, dtype=float).reshape(1, -1))[0])


def _iqm_batch(samples: np.ndarray) -> np.ndarray:
    """IQM of each row of samples [B, N] -> [B]."""
    n = samples.shape[1]
    cut = int(0.25 * n)
    return np.sort(samples, axis=1)[:, cut:n - cut].mean(axis=1)


def stratified_resample(scores: np.ndarray, reps: int, rng: np.random.Generator) -> np.ndarray:
    """[runs, tasks] -> [reps, runs, tasks]: each task's column resampled on its own."""
    n, m = scores.shape
    return scores[rng.integers(0, n, size=(reps, n, m)), np.arange(m)]


def _bootstrap(statistic, matrices: list[np.ndarray], reps: int, rng: np.random.Generator) -> np.ndarray:
    out = []
    for start in range(0, reps, CHUNK):
        size = min(CHUNK, reps - start)
        out.append(statistic(*[stratified_resample(x, size, rng) for x in matrices]))
    return np.concatenate(out)


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def iqm_interval(scores: np.ndarray, reps: int, rng: np.random.Generator) -> tuple[float, float]:
    """95% stratified-bootstrap interval of the IQM of scores [runs, tasks]."""
    return percentile_interval(_bootstrap(lambda s: _iqm_batch(s.reshape(len(s), -1)), [scores], reps, rng))


def _improvement_batch(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x [B, n, m], y [B, k, m] -> P(X > Y) per resample [B], ties 1/2, mean over the m tasks."""
    a, b = x[:, :, None, :], y[:, None, :, :]  # [B, n, 1, m], [B, 1, k, m]
    per_task = (a > b).mean(axis=(1, 2)) + 0.5 * (a == b).mean(axis=(1, 2))  # [B, m]
    return per_task.mean(axis=1)


def probability_of_improvement(x, y) -> float:
    """P(X > Y) for score matrices x [n, tasks] and y [k, tasks] of the same tasks."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return float(_improvement_batch(x[None], y[None])[0])


def improvement_interval(x: np.ndarray, y: np.ndarray, reps: int, rng: np.random.Generator) -> tuple[float, float]:
    return percentile_interval(_bootstrap(_improvement_batch, [x, y], reps, rng))


def row_rng(seed: int, *names: str) -> np.random.Generator:
    """A generator per statistic, keyed by the report seed and the row's names: adding a run of
    another row leaves this row's interval as it was."""
    return np.random.default_rng([seed, *(zlib.crc32(name.encode()) for name in names)])


# ----------------------------------------------------------------------------------------------
# Reading runs
# ----------------------------------------------------------------------------------------------
@dataclass
class Run:
    dir: str
    args: dict
    summary: dict | None = None
    curve: list[dict] = field(default_factory=list)  # periodic evaluations, one per step, in step order
    problem: str = ""  # why it is not averaged in; empty when it is
    zero_shot: dict | None = None  # a transfer run's evaluation before any update (label zero-shot)
    regime: str = ""  # leave-one-out: base, scratch, finetune or task-params; "" for the suites' own runs
    held_out: str = ""  # leave-one-out: the held-out task

    @property
    def suite(self) -> str:
        return suite_of(self.args)

    @property
    def key(self) -> tuple[str, str]:
        return self.args.get("algo", "?"), variant_of(self.args)


def suite_of(args: dict) -> str:
    name = args.get("env_id", "?")
    if args.get("tasks"):
        name += f" (tasks {','.join(args['tasks'])})"
    if args.get("holdout_task"):
        name += f" (holding out {args['holdout_task']})"
    return name


# VarShare's ablations other than L2Soft: (matrix row and run-name suffix, name in the report, flag).
ABLATIONS = (("beta0", "beta=0", "--beta 0 (no KL: free residuals)"),
             ("reparam", "reparam estimator", "--estimator reparam (one weight sample per task and minibatch)"),
             ("episode", "episode weights", "--rollout-weights episode (acting with a weight sample per episode)"))
L2SOFT_CHANGE = "--residual l2 (deterministic residuals, L2 penalty at the matched weight)"
L2SOFT_TUNED_CHANGE = "--residual l2 at the lambda tuned on mt3-tune (the matrix's l2soft-tuned row)"


# Shared MTL's (and PCGrad's) task encodings other than the one-hot: (name in the report, suffixes
# that add nothing to it). Named from args.json, so that a run without a suffix never joins the
# one-hot row it does not belong to.
TASK_ENCODINGS = {"none": ("task-blind", ("taskblind", "task-blind")),
                  "learned": ("learned encoding", ("learned",))}


def varshare_ablations(args: dict) -> list[tuple[str, str, str]]:
    """The ABLATIONS entries this VarShare run's args.json sets (none for L2Soft, which ignores them)."""
    if args.get("algo") != "ppo_varshare" or args.get("residual") == "l2":
        return []
    given = {"beta0": args.get("beta") == 0, "reparam": args.get("estimator") == "reparam",
             "episode": args.get("rollout_weights") == "episode"}
    return [entry for entry in ABLATIONS if given[entry[0]]]


@functools.lru_cache(maxsize=None)
def varshare_default_prior_step(env_id: str | None) -> str:
    """VarShare's --prior-step default on this suite: the script's SUITE_KIND_DEFAULTS for its kind."""
    try:
        kind = make_suite(env_id).kind if env_id else "gym"
    except UsageError:  # a suite this checkout does not know: the toy suites' default
        kind = "gym"
    return load_script("ppo_varshare").SUITE_KIND_DEFAULTS[kind]["prior_step"]


def variant_of(args: dict) -> str:
    suffix = args.get("run_name_suffix") or ""
    onehot = args.get("algo") == "ppo_varshare" and args.get("task_input", "none") == "onehot"
    if onehot:  # VarShare whose shared network also reads the one-hot task input
        rest = variant_of({**args, "task_input": "none",
                           "run_name_suffix": "" if suffix.lower() in ("onehot", "one-hot") else suffix})
        return "one-hot input" + (f" + {rest}" if rest else "")
    l2 = args.get("algo") == "ppo_varshare" and args.get("residual") == "l2"
    if l2 and suffix.lower() == "l2soft-tuned":  # the matrix row with its own tuned flags, step included
        return "L2Soft tuned"
    if args.get("algo") == "ppo_varshare":
        # A prior step other than the suite's default is a row of its own (runs from before the
        # flag have no prior_step: they took the gradient step). Without a pull the two are one.
        step = args.get("prior_step") or "gradient"
        no_pull = (args.get("l2_lambda") == 0 if args.get("l2_lambda") is not None else args.get("beta") == 0)
        default = "gradient" if no_pull else varshare_default_prior_step(args.get("env_id"))
        if step != default:
            rest = variant_of({**args, "prior_step": default,
                               "run_name_suffix": "" if suffix.lower() == step else suffix})
            return f"{step} step" + (f" + {rest}" if rest else "")
    if l2:
        return "L2Soft" if suffix.lower() in ("", "l2soft") else f"L2Soft {suffix}"
    ablations = varshare_ablations(args)
    if ablations:
        name = " + ".join(label for _, label, _ in ablations)
        return name if suffix.lower() in ("", *(row for row, _, _ in ablations)) else f"{name} {suffix}"
    encoding = TASK_ENCODINGS.get(args.get("task_encoding"))
    if args.get("algo") in ("ppo_mtl_embed", "ppo_pcgrad") and encoding:
        name, own_suffixes = encoding
        return name if suffix.lower() in ("", *own_suffixes) else f"{name} {suffix}"
    return suffix


def ablation_change(method: str, variant: str) -> str | None:
    """What an ablation row changes in VarShare (from its variant name); None for any other row."""
    if method != "ppo_varshare" or not variant:
        return None
    if variant == "L2Soft":
        return L2SOFT_CHANGE
    if variant == "L2Soft tuned":
        return L2SOFT_TUNED_CHANGE
    changes = {label: change for _, label, change in ABLATIONS}
    parts = variant.split(" + ")
    return "; ".join(changes[p] for p in parts) if all(p in changes for p in parts) else None


def is_capacity_matched(method: str, variant: str) -> bool:
    return method == "ppo_mtl_embed" and "wide" in variant


def row_label(method: str, variant: str) -> str:
    if variant.startswith("L2Soft"):
        return variant
    label = METHOD_NAMES.get(method, method) + (f" {variant}" if variant else "")
    return label + (" (capacity-matched)" if is_capacity_matched(method, variant) else "")


def row_order(key: tuple[str, str]) -> tuple:
    method, variant = key
    partner = variant.startswith("L2Soft") or is_capacity_matched(method, variant) or ablation_change(method, variant)
    rank = 0 if not variant else 1 if partner else 2
    method_rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return method_rank, method, rank, variant


def colour_of(method: str, variant: str) -> str:
    if not variant:
        return COLOURS.get(method, EXTRA_COLOURS[zlib.crc32(method.encode()) % len(EXTRA_COLOURS)])
    if variant == "L2Soft":
        return COLOURS["L2Soft"]
    if is_capacity_matched(method, variant):
        return COLOURS["capacity"]
    return EXTRA_COLOURS[zlib.crc32(f"{method}/{variant}".encode()) % len(EXTRA_COLOURS)]


def score_key(env_id: str) -> str:
    """'return' where the suite's success is a return threshold, else 'success_rate'."""
    from shared.suites import make_suite

    try:
        return "return" if make_suite(env_id).success_return is not None else "success_rate"
    except UsageError:  # a suite this checkout does not define: judge by its family's name
        return "return" if env_id.lower().startswith(("cartpole", "lunarlander")) else "success_rate"


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def read_curve(path: str) -> list[dict]:
    """The periodic evaluations of one eval.jsonl, the last line per step (a resumed run may
    repeat a step); final evaluations and labelled extra ones (e.g. pruned) are left out."""
    by_step = {}
    if not os.path.exists(path):
        return []
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed run
                continue
            if not entry.get("final") and not entry.get("label") and "per_task" in entry:
                by_step[entry["global_step"]] = entry
    return [by_step[step] for step in sorted(by_step)]


def read_zero_shot(path: str) -> dict | None:
    """The evaluation labelled zero-shot (a transfer run's score before any update), or None."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("label") == "zero-shot" and "per_task" in entry:
                return entry
    return None


def classify(runs: list[Run]) -> None:
    """Mark the leave-one-out runs from their args.json: transfer runs (init_from), base runs
    (holdout_task), and one-task runs of a task that some base run of the suite held out (scratch)."""
    held_out = {(run.args.get("env_id"), run.args["holdout_task"]) for run in runs if run.args.get("holdout_task")}
    for run in runs:
        args = run.args
        tasks = args.get("task_names") or args.get("tasks") or []
        if args.get("init_from"):
            run.regime, run.held_out = args.get("transfer") or "finetune", tasks[0] if tasks else "?"
        elif args.get("holdout_task"):
            run.regime, run.held_out = "base", args["holdout_task"]
        elif len(tasks) == 1 and (args.get("env_id"), tasks[0]) in held_out:
            run.regime, run.held_out = "scratch", tasks[0]


def budget_group(run: Run) -> str:
    """Runs that must share one budget: a suite's own runs; per suite and held-out task, the base
    runs, and the scratch and transfer runs together."""
    if not run.regime:
        return run.suite
    stage = "base runs" if run.regime == "base" else "scratch and transfer runs"
    return f"{run.args.get('env_id', '?')} {stage} of held-out task {run.held_out}"


def find_runs(runs_dir: str) -> list[Run]:
    runs = []
    for dirpath, dirnames, filenames in os.walk(runs_dir):
        dirnames.sort()
        if "args.json" not in filenames and "summary.json" not in filenames:
            continue
        dirnames[:] = []  # a run's own subfolders (wandb) hold no further runs
        try:
            run = Run(dirpath, _read_json(os.path.join(dirpath, "args.json")))
        except (OSError, json.JSONDecodeError):
            runs.append(Run(dirpath, {}, problem="args.json missing or unreadable"))
            continue
        run.curve = read_curve(os.path.join(dirpath, "eval.jsonl"))
        if run.args.get("init_from"):
            run.zero_shot = read_zero_shot(os.path.join(dirpath, "eval.jsonl"))
        summary_path = os.path.join(dirpath, "summary.json")
        if not os.path.exists(summary_path):
            last = f"; last evaluation at step {run.curve[-1]['global_step']:,}" if run.curve else ""
            run.problem = f"unfinished: no summary.json{last}"
        else:
            try:
                run.summary = _read_json(summary_path)
            except (OSError, json.JSONDecodeError):
                run.summary = None
            if not isinstance(run.summary, dict) or not isinstance(run.summary.get("per_task"), dict):
                run.summary, run.problem = None, "summary.json unreadable or without per-task results"
        runs.append(run)
    classify(runs)
    return runs


def _steps(budget) -> str:
    return f"{budget:,}" if isinstance(budget, int) else "unknown"


def check_budgets(runs: list[Run]) -> dict[str, int]:
    """Each suite's majority budget among its finished runs; marks the others. Returns the budgets,
    by suite (and by ``budget_group`` for the leave-one-out runs)."""
    by_suite = defaultdict(list)
    for run in runs:
        if not run.problem:
            by_suite[budget_group(run)].append(run)
    budgets = {}
    for suite, group in by_suite.items():
        counts = Counter(run.args.get("total_timesteps") for run in group)
        budgets[suite] = max(counts, key=lambda b: (counts[b], b if b is not None else -1))
        for run in group:
            if run.args.get("total_timesteps") != budgets[suite]:
                whose = (f"the suite's {_steps(budgets[suite])}" if not run.regime
                         else f"the {_steps(budgets[suite])} of most {suite}")
                run.problem = f"budget {_steps(run.args.get('total_timesteps'))} env steps, not {whose}"
    return budgets


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------
@dataclass
class Row:
    suite: str
    method: str
    variant: str
    runs: list[Run]
    tasks: list[str]
    metric: str
    scores: np.ndarray  # [runs, tasks]
    iqm: float = math.nan
    interval: tuple[float, float] = (math.nan, math.nan)
    improvement: float | None = None  # P(VarShare > this row); None for VarShare itself or without it
    improvement_interval: tuple[float, float] = (math.nan, math.nan)

    @property
    def label(self) -> str:
        return row_label(self.method, self.variant)


def final_scores(runs: list[Run], tasks: list[str], metric: str) -> np.ndarray:
    return np.array([[float(run.summary["per_task"][t][metric]) for t in tasks] for run in runs])  # [runs, tasks]


def build_rows(runs: list[Run], reps: int, seed: int) -> dict[str, list[Row]]:
    groups = defaultdict(list)
    for run in runs:
        if not run.problem and not run.regime:  # leave-one-out runs have a section of their own
            groups[run.suite, *run.key].append(run)
    rows = defaultdict(list)
    for (suite, method, variant), group in sorted(groups.items(), key=lambda kv: (kv[0][0], row_order(kv[0][1:]))):
        group.sort(key=lambda r: (r.args.get("seed", 0), r.dir))
        tasks = list(group[0].summary.get("task_names") or group[0].summary["per_task"])
        metric = score_key(group[0].args.get("env_id", ""))
        scores = final_scores(group, tasks, metric)
        row = Row(suite, method, variant, group, tasks, metric, scores, iqm(scores),
                  iqm_interval(scores, reps, row_rng(seed, suite, method, variant)))
        rows[suite].append(row)
    for suite, suite_rows in rows.items():
        reference = next((r for r in suite_rows if (r.method, r.variant) == REFERENCE), None)
        for row in suite_rows:
            if reference is None or row is reference or row.tasks != reference.tasks:
                continue
            row.improvement = probability_of_improvement(reference.scores, row.scores)
            row.improvement_interval = improvement_interval(
                reference.scores, row.scores, reps, row_rng(seed, suite, row.method, row.variant, "improvement"))
    return rows


def learning_curve(row: Row, reps: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(steps, IQM, band low, band high) of the row's periodic evaluations; None without any."""
    curves = [curve for run in row.runs for curve in [run_curve(run.curve, row.tasks, row.metric)] if curve]
    return curve_band(curves, reps, row_rng(seed, row.suite, row.method, row.variant, "curve"))


def run_curve(entries: list[dict], tasks: list[str], metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """One run's evaluations as (steps [P], values [P, tasks]); None without any."""
    points = [e for e in entries if all(t in e["per_task"] for t in tasks)]
    if not points:
        return None
    steps = np.array([e["global_step"] for e in points], dtype=float)
    return steps, np.array([[e["per_task"][t][metric] for t in tasks] for e in points], dtype=float)


def curve_band(curves: list[tuple[np.ndarray, np.ndarray]], reps: int, rng: np.random.Generator):
    """(steps, IQM, band low, band high) over runs x tasks of the runs' curves, on the steps they all
    cover (each run linearly interpolated there); None without any."""
    if not curves:
        return None
    first, last = max(s[0] for s, _ in curves), min(s[-1] for s, _ in curves)
    grid = np.unique(np.concatenate([s[(s >= first) & (s <= last)] for s, _ in curves]))
    if grid.size == 0:
        return None
    # [G, runs, tasks]: each run's values at the common steps
    at = np.stack([np.stack([np.interp(grid, s, v[:, j]) for j in range(v.shape[1])], axis=1) for s, v in curves],
                  axis=1)
    mid = np.array([iqm(point) for point in at])
    bands = np.array([iqm_interval(point, reps, rng) for point in at])
    return grid, mid, bands[:, 0], bands[:, 1]


# ----------------------------------------------------------------------------------------------
# Leave-one-out transfer
# ----------------------------------------------------------------------------------------------
REGIMES = ("base", "scratch", "finetune", "task-params")
REGIME_STYLE = {"scratch": ":", "finetune": "-", "task-params": "--"}


@dataclass
class TransferRow:
    """One method and regime of one suite's held-out task: each statistic as (IQM, (CI low, high))
    over its runs, None where it does not apply (zero-shot and area for base and scratch runs)."""
    suite: str  # the env_id
    task: str  # the held-out task
    method: str
    variant: str
    regime: str
    runs: list[Run]
    tasks: list[str]  # the held-out task; a base run's other tasks
    metric: str
    zero_shot: tuple[float, tuple[float, float], int] | None = None  # also the number of runs that have one
    final: tuple[float, tuple[float, float]] = (math.nan, (math.nan, math.nan))
    auc: tuple[float, tuple[float, float]] | None = None

    @property
    def label(self) -> str:
        return row_label(self.method, self.variant)


def run_score(entry: dict, tasks: list[str], metric: str) -> float:
    return float(np.mean([entry["per_task"][t][metric] for t in tasks]))


def area_under_curve(run: Run, tasks: list[str], metric: str) -> float:
    """The mean score over training: the trapezoid rule through (0, zero-shot score; 0 for a run
    without one), the periodic evaluations and the final one, divided by the final one's step."""
    final_step = float(run.summary.get("global_step") or run.args.get("total_timesteps") or 0)
    start = run_score(run.zero_shot, tasks, metric) if run.zero_shot else 0.0
    points = [(0.0, start)] + [(float(e["global_step"]), run_score(e, tasks, metric)) for e in run.curve
                               if 0 < e["global_step"] <= final_step and all(t in e["per_task"] for t in tasks)]
    points.append((final_step, run_score(run.summary, tasks, metric)))
    if final_step <= 0:
        return math.nan
    steps, values = zip(*sorted(points, key=lambda point: point[0]), strict=True)  # sort is stable
    return float(np.trapezoid(values, steps) / final_step)


def transfer_rows(runs: list[Run], reps: int, seed: int) -> dict[tuple[str, str], list[TransferRow]]:
    """(suite, held-out task) -> its rows, by method (the main tables' order), then regime."""
    groups = defaultdict(list)
    for run in runs:
        if run.regime and not run.problem:
            groups[run.args.get("env_id", "?"), run.held_out, *run.key, run.regime].append(run)
    out = defaultdict(list)
    for key in sorted(groups, key=lambda k: (k[0], k[1], row_order(k[2:4]), REGIMES.index(k[4]))):
        suite, task, method, variant, regime = key
        group = sorted(groups[key], key=lambda r: (r.args.get("seed", 0), r.dir))
        tasks = list(group[0].summary.get("task_names") or group[0].summary["per_task"])
        metric = score_key(suite)

        row = TransferRow(suite, task, method, variant, regime, group, tasks, metric)
        row.final = _iqm_and_interval(final_scores(group, tasks, metric), reps, seed, *key, "final")
        if regime != "base":
            with_zero_shot = [r for r in group if r.zero_shot]
            if with_zero_shot:
                scores = np.array([[r.zero_shot["per_task"][t][metric] for t in tasks] for r in with_zero_shot])
                row.zero_shot = (*_iqm_and_interval(scores, reps, seed, *key, "zero-shot"), len(with_zero_shot))
            areas = np.array([[area_under_curve(r, tasks, metric)] for r in group])
            row.auc = _iqm_and_interval(areas, reps, seed, *key, "auc")
        out[suite, task].append(row)
    return out


def _iqm_and_interval(scores: np.ndarray, reps: int, seed: int, *names: str) -> tuple[float, tuple[float, float]]:
    return iqm(scores), iqm_interval(scores, reps, row_rng(seed, *names))


def transfer_curve(row: TransferRow, reps: int, seed: int):
    """The row's learning curve, from the zero-shot evaluation (step 0) where the runs have one."""
    curves = []
    for run in row.runs:
        entries = ([run.zero_shot] if run.zero_shot else []) + [e for e in run.curve if e["global_step"] > 0]
        curve = run_curve(entries, row.tasks, row.metric)
        if curve:
            curves.append(curve)
    return curve_band(curves, reps, row_rng(seed, row.suite, row.task, row.method, row.variant, row.regime, "curve"))


def plot_transfer_curves(rows: list[TransferRow], path: str, reps: int, seed: int) -> bool:
    fig, (ax,) = _figure(1, width=6.0, height=4.0)
    drawn = False
    for row in rows:
        curve = transfer_curve(row, reps, seed) if row.regime != "base" else None
        if curve is None:
            continue
        steps, mid, lo, hi = curve
        colour = colour_of(row.method, row.variant)
        ax.plot(steps, mid, color=colour, linestyle=REGIME_STYLE[row.regime], marker="o", markersize=3,
                label=f"{row.label}, {row.regime} ({len(row.runs)})")
        ax.fill_between(steps, lo, hi, color=colour, alpha=0.15, linewidth=0)
        drawn = True
    if not drawn:
        return False
    ax.set_title(f"{rows[0].suite}: held-out {rows[0].task}")
    ax.set_xlabel("env steps on the held-out task")
    ax.xaxis.set_major_formatter(_steps_formatter())
    ax.set_ylabel(f"IQM {metric_label(rows[0].metric)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return True


# ----------------------------------------------------------------------------------------------
# Figures (matplotlib's object API: no pyplot state, no display needed)
# ----------------------------------------------------------------------------------------------
def _figure(panels: int, width: float = 5.0, height: float = 3.6):
    from matplotlib.figure import Figure

    cols = min(3, panels)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes


def _steps_formatter():
    from matplotlib.ticker import FuncFormatter

    # 1.2M rather than 1200000: MT10 budgets run into tens of millions
    return FuncFormatter(lambda x, _: f"{x / 1e6:g}M" if abs(x) >= 1e6 else f"{x / 1e3:g}k" if x else "0")


def metric_label(metric: str) -> str:
    return "mean return per task" if metric == "return" else "success rate"


def plot_learning_curves(rows: dict[str, list[Row]], path: str, reps: int, seed: int) -> bool:
    suites = [s for s in rows if any(r.runs for r in rows[s])]
    if not suites:
        return False
    fig, axes = _figure(len(suites))
    for ax, suite in zip(axes, suites, strict=False):
        for row in rows[suite]:
            curve = learning_curve(row, reps, seed)
            if curve is None:
                continue
            steps, mid, lo, hi = curve
            colour = colour_of(row.method, row.variant)
            ax.plot(steps, mid, color=colour, marker="o", markersize=3, label=f"{row.label} ({len(row.runs)})")
            ax.fill_between(steps, lo, hi, color=colour, alpha=0.2, linewidth=0)
        ax.set_title(suite)
        ax.set_xlabel("env steps (all tasks)")
        ax.xaxis.set_major_formatter(_steps_formatter())
        ax.set_ylabel(f"IQM {metric_label(rows[suite][0].metric)}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a suite whose runs logged no periodic evaluation has none
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return True


def plot_final_scores(rows: dict[str, list[Row]], path: str) -> None:
    suites = list(rows)
    fig, axes = _figure(len(suites), height=1.3 + 0.45 * max(len(r) for r in rows.values()))
    for ax, suite in zip(axes, suites, strict=False):
        suite_rows = rows[suite][::-1]  # first row on top
        for y, row in enumerate(suite_rows):
            lo, hi = row.interval
            ax.errorbar(row.iqm, y, xerr=[[row.iqm - lo], [hi - row.iqm]], fmt="o", capsize=4,
                        color=colour_of(row.method, row.variant))
        ax.set_yticks(range(len(suite_rows)), [r.label for r in suite_rows])
        ax.set_title(suite)
        ax.set_xlabel(f"final IQM {metric_label(suite_rows[0].metric)} (95% CI)")
        ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=110)


def residual_ratio_table(row: Row) -> tuple[list[str], np.ndarray] | None:
    """(layer names, mean over runs [tasks, layers]) of the runs that recorded summary.json's
    residual_ratios; None when none did (runs from before it was recorded)."""
    found = [r.summary["residual_ratios"] for r in row.runs if r.summary.get("residual_ratios")]
    if not found:
        return None
    layers = list(found[0][row.tasks[0]])
    values = np.array([[[ratios[t][layer] for layer in layers] for t in row.tasks] for ratios in found])
    return layers, values.mean(axis=0)


def plot_residual_ratios(suite: str, tables: list[tuple[Row, list[str], np.ndarray]], path: str) -> None:
    fig, axes = _figure(len(tables), width=1.2 + 0.9 * len(tables[0][1]), height=1.2 + 0.45 * len(tables[0][0].tasks))
    top = max(float(values.max()) for _, _, values in tables) or 1.0  # one scale: VarShare and L2Soft compare
    for ax, (row, layers, values) in zip(axes, tables, strict=False):
        image = ax.imshow(values, cmap="viridis", aspect="auto", vmin=0, vmax=top)
        ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right")
        ax.set_yticks(range(len(row.tasks)), row.tasks)
        for (i, j), value in np.ndenumerate(values):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="x-small",
                    color="white" if value < 0.6 * top else "black")
        ax.set_title(f"{suite}: {row.label}, ||mu_task|| / ||theta|| ({len(row.runs)} runs)", fontsize="small")
        fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------------------
# The markdown report
# ----------------------------------------------------------------------------------------------
def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")


def fmt(value: float, metric: str) -> str:
    return f"{value:.1f}" if metric == "return" else f"{value:.3f}"


def _median(values) -> float:
    return float(np.median(np.asarray(values, dtype=float)))


PARAMETER_COUNTS = ("total", "active", "trained_per_task")


def row_facts(row: Row) -> dict:
    """Seeds, median parameter counts (None where a run lacks one), median env steps and wall time."""
    counts = [r.summary.get("parameter_counts", {}) for r in row.runs]
    facts = {k: int(_median([c[k] for c in counts])) if all(k in c for c in counts) else None
             for k in PARAMETER_COUNTS}
    facts.update(seeds=len({r.args.get("seed") for r in row.runs}),
                 env_steps=_median([r.summary.get("global_step", math.nan) for r in row.runs]),
                 wall_time_s=_median([r.summary.get("wall_time_s", math.nan) for r in row.runs]))
    return facts


def suite_section(suite: str, suite_rows: list[Row], budget: int, out_dir: str) -> list[str]:
    metric = suite_rows[0].metric
    score = ("final mean return per task (success on this suite is a return threshold, so the return "
             "says more)" if metric == "return" else "final success rate per task")
    has_reference = any((r.method, r.variant) == REFERENCE for r in suite_rows)
    lines = [f"## {suite}", "", f"Score: {score}; budget {_steps(budget)} env steps.", "",
             "| method | script | seeds | runs | IQM [95% CI] | mean | P(VarShare > row) [95% CI] "
             "| params total / active / trained per task | env steps | wall time per run (s, median) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in suite_rows:
        lo, hi = row.interval
        if row.improvement is not None:
            ilo, ihi = row.improvement_interval
            improvement = f"{row.improvement:.2f} [{ilo:.2f}, {ihi:.2f}]"
        else:
            improvement = "(reference)" if (row.method, row.variant) == REFERENCE else "-"
        facts = row_facts(row)
        params = " / ".join(f"{facts[k]:,}" if facts[k] is not None else "?" for k in PARAMETER_COUNTS)
        lines.append(f"| {row.label} | {row.method} | {facts['seeds']} | {len(row.runs)} "
                     f"| {fmt(row.iqm, metric)} [{fmt(lo, metric)}, {fmt(hi, metric)}] "
                     f"| {fmt(float(row.scores.mean()), metric)} | {improvement} | {params} "
                     f"| {facts['env_steps']:,.0f} | {facts['wall_time_s']:,.0f} |")
    if not has_reference:
        lines += ["", "No VarShare run (ppo_varshare, --residual variational, no ablation, no suffix) here: no "
                      "probability of improvement."]
    tasks = suite_rows[0].tasks
    lines += ["", "Per task, IQM over runs:", "", "| method | " + " | ".join(tasks) + " |",
              "|---|" + "---|" * len(tasks)]
    for row in suite_rows:
        if row.tasks == tasks:
            per_task = [fmt(iqm(row.scores[:, j]), metric) for j in range(len(tasks))]
            lines.append(f"| {row.label} | " + " | ".join(per_task) + " |")
    sampled = [(row, np.array([[float(run.summary["sampled"]["per_task"][t][metric]) for t in tasks]
                               for run in row.runs]))
               for row in suite_rows if row.tasks == tasks and all("sampled" in run.summary for run in row.runs)]
    if sampled:
        lines += ["", "The same final evaluation with actions sampled from the policy (--eval-sampled; a "
                      "diagnostic: the score above is the deterministic policy's), IQM over runs:", "",
                  "| method | all tasks | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
        for row, scores in sampled:
            per_task = [fmt(iqm(scores[:, j]), metric) for j in range(len(tasks))]
            lines.append(f"| {row.label} | {fmt(iqm(scores), metric)} | " + " | ".join(per_task) + " |")
    tables = [(row, *table) for row in suite_rows if row.method == "ppo_varshare"
              for table in [residual_ratio_table(row)] if table is not None]
    if tables:
        name = f"residual_ratios_{slug(suite)}.png"
        plot_residual_ratios(suite, tables, os.path.join(out_dir, name))
        lines += ["", "VarShare's final residual ratio ||mu_task|| / ||theta|| per task and layer, mean over runs "
                      "(summary.json's residual_ratios):", "", f"![residual ratios, {suite}]({name})"]
        for row, layers, values in tables:
            lines += ["", f"| {row.label}: task | " + " | ".join(layers) + " |", "|---|" + "---|" * len(layers)]
            lines += [f"| {task} | " + " | ".join(f"{v:.3f}" for v in values[i]) + " |"
                      for i, task in enumerate(row.tasks)]
    return lines + [""]


def _stat(value: tuple | None, metric: str) -> str:
    if value is None:
        return "-"
    mid, (lo, hi) = value[:2]
    return f"{fmt(mid, metric)} [{fmt(lo, metric)}, {fmt(hi, metric)}]"


AUC_DEFINITION = (
    "Area under the curve (AUC): the trapezoid rule through a run's evaluations (the zero-shot one at step "
    "0, the periodic ones and the final one) divided by the env steps of the final evaluation (the budget "
    "rounded down to whole iterations), i.e. the mean score over training; a scratch run has no evaluation "
    "before training, so its curve starts at 0 at step 0 (a fresh policy's success rate; on the "
    "return-scored suites a little below a random policy's return).")


def transfer_section(rows: dict[tuple[str, str], list[TransferRow]], budgets: dict[str, int], out_dir: str,
                     curve_reps: int, seed: int) -> list[str]:
    lines = ["## Leave-one-out transfer", "",
             "Per suite and held-out task: base runs train the other tasks (--holdout-task); then, on the held-out "
             "task alone, scratch runs start fresh, finetune runs start from a base run with every parameter "
             "trained, task-params runs with only the new task's own parameters trained. Runs are told apart by "
             "their args.json (init_from and transfer, holdout_task, one task that a base run held out). "
             "Zero-shot: the evaluation before any update (label zero-shot, step 0). Final: the final "
             "evaluation. " + AUC_DEFINITION + " Each is the IQM over runs with its 95% stratified-bootstrap "
             "interval.", ""]
    for (suite, task), suite_rows in rows.items():
        metric = suite_rows[0].metric
        transfer = [r for r in suite_rows if r.regime != "base"]
        bases = [r for r in suite_rows if r.regime == "base"]
        budget = budgets.get(budget_group(transfer[0].runs[0])) if transfer else None
        lines += [f"### {suite}, held-out {task}", "",
                  f"Score: the {metric_label(metric)}" + (f"; {_steps(budget)} env steps per run on {task}"
                                                         if budget else "") + "."]
        if transfer:
            lines += ["", "| method | regime | seeds | runs | zero-shot IQM [95% CI] | final IQM [95% CI] "
                          "| AUC IQM [95% CI] |", "|---|---|---|---|---|---|---|"]
            for row in transfer:
                zero_shot = _stat(row.zero_shot, metric)
                if row.zero_shot is not None and row.zero_shot[2] < len(row.runs):
                    zero_shot += f" ({row.zero_shot[2]} runs)"
                lines.append(f"| {row.label} | {row.regime} | {len({r.args.get('seed') for r in row.runs})} "
                             f"| {len(row.runs)} | {zero_shot} | {_stat(row.final, metric)} "
                             f"| {_stat(row.auc, metric)} |")
        if bases:
            base_budget = budgets.get(budget_group(bases[0].runs[0]))
            lines += ["", f"Base runs: trained on the other {len(bases[0].tasks)} tasks for {_steps(base_budget)} "
                          "env steps; final score on those tasks:", "",
                      "| method | seeds | runs | final IQM [95% CI] |", "|---|---|---|---|"]
            lines += [f"| {row.label} | {len({r.args.get('seed') for r in row.runs})} | {len(row.runs)} "
                      f"| {_stat(row.final, metric)} |" for row in bases]
        name = f"transfer_{slug(suite)}_{slug(task)}.png"
        if transfer and plot_transfer_curves(transfer, os.path.join(out_dir, name), curve_reps, seed):
            lines += ["", f"Learning curves on {task}: IQM over runs, band = 95% CI; solid finetune, dashed "
                          "task-params, dotted scratch (legend: runs per line).", "",
                      f"![transfer to {task}, {suite}]({name})"]
        lines.append("")
    return lines


def ablation_section(rows: dict[str, list[Row]]) -> list[str]:
    """Each VarShare ablation row beside VarShare's own row on its suite."""
    lines = []
    for suite in sorted(rows):
        ablations = [r for r in rows[suite] if ablation_change(r.method, r.variant)]
        if not ablations:
            continue
        metric = ablations[0].metric
        reference = next((r for r in rows[suite] if (r.method, r.variant) == REFERENCE), None)
        lines += [f"### {suite}", "", "| row | differs from VarShare by | seeds | runs | IQM [95% CI] "
                                      "| P(VarShare > row) [95% CI] |", "|---|---|---|---|---|---|"]
        for row in ([reference] if reference else []) + ablations:
            if row is reference:
                change, improvement = "-", "(reference)"
            else:
                change = ablation_change(row.method, row.variant)
                improvement = (f"{row.improvement:.2f} [{row.improvement_interval[0]:.2f}, "
                               f"{row.improvement_interval[1]:.2f}]" if row.improvement is not None else "-")
            lines.append(f"| {row.label} | {change} | {len({r.args.get('seed') for r in row.runs})} | {len(row.runs)} "
                         f"| {fmt(row.iqm, metric)} [{fmt(row.interval[0], metric)}, {fmt(row.interval[1], metric)}] "
                         f"| {improvement} |")
        if reference is None:
            lines += ["", "No VarShare run (ppo_varshare, --residual variational, no ablation, no suffix) here: no "
                          "probability of improvement."]
        lines.append("")
    if not lines:
        return []
    return ["## VarShare's ablations", "",
            "Each ablation row (ppo_varshare with one setting changed, told apart by args.json) against VarShare's "
            "default row on the same suite: final IQM with its 95% stratified-bootstrap interval, and the "
            "probability that a VarShare run beats a run of the row on a task (ties 1/2). The same rows are in "
            "the suite's table above.", "", *lines]


def excluded_section(runs: list[Run], runs_dir: str) -> list[str]:
    left_out = [run for run in runs if run.problem]
    if not left_out:
        return ["## Not averaged in", "", "None: every run finished at its suite's budget.", ""]
    lines = ["## Not averaged in", "", "| run | suite | method | seed | why |", "|---|---|---|---|---|"]
    for run in sorted(left_out, key=lambda r: r.dir):
        method = (row_label(*run.key) + (f", {run.regime}" if run.regime else "")) if run.args else "?"
        lines.append(f"| {os.path.relpath(run.dir, runs_dir)} | {run.suite if run.args else '?'} | {method} "
                     f"| {run.args.get('seed', '?')} | {run.problem} |")
    return lines + [""]


def build_report(runs_dir: str, out_dir: str, reps: int = 50_000, seed: int = 0,
                 wandb_project: str | None = None, wandb_entity: str | None = None) -> str:
    """Write OUT/README.md and its figures; returns the README's path. With ``wandb_project``,
    also log the tables and figures to one wandb run (job type "report")."""
    if not os.path.isdir(runs_dir):
        raise UsageError(f"runs directory '{runs_dir}' does not exist; give the folder the scripts wrote to "
                         "(their --runs-dir, default runs/)")
    runs = find_runs(runs_dir)
    if not runs:
        raise UsageError(f"no run directories (with an args.json) under '{runs_dir}'; train runs first "
                         "(bash run_all.sh) or give the folder the scripts wrote to")
    if reps < 1:
        raise UsageError(f"--reps must be a positive number of bootstrap resamples, got {reps}")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the report folder '{out_dir}' ({err.strerror}); "
                         "give a writable --out") from None
    budgets = check_budgets(runs)
    rows = build_rows(runs, reps, seed)
    transfers = transfer_rows(runs, reps, seed)
    included = (sum(len(r.runs) for suite_rows in rows.values() for r in suite_rows)
                + sum(len(r.runs) for group in transfers.values() for r in group))
    lines = ["# Report", "",
             f"Written by `python -m shared.report {runs_dir}` from the args.json, eval.jsonl and summary.json of "
             f"{len(runs)} run directories: {included} averaged in, {len(runs) - included} listed under "
             "\"Not averaged in\".", "",
             "Each row's score is the final evaluation per task (success rate, or on the toy suites the return), "
             "one value per run and task. IQM: the mean of the middle 50% of those values (rliable's "
             "definition, as scipy's trim_mean(0.25)). 95% CI: stratified bootstrap (runs resampled within each "
             f"task, {reps:,} resamples, percentile interval). P(VarShare > row): probability that a VarShare run "
             "beats a run of that row on a task, ties counting 1/2, averaged over tasks, with its bootstrap "
             "interval. The capacity-matched row (shared MTL with a \"wide\" suffix) follows shared MTL and "
             "L2Soft and VarShare's other ablations follow VarShare (and have a section of their own). "
             "Leave-one-out runs (base, scratch, finetune, task-params) are in no suite table: they have "
             "their own section. Runs that did not finish, or ran another budget than most of their "
             "suite, are listed at the end and are in no number or figure.", ""]
    if rows:
        plot_final_scores(rows, os.path.join(out_dir, "final_scores.png"))
        lines += ["![final IQM per suite and method, 95% CI](final_scores.png)", ""]
        if plot_learning_curves(rows, os.path.join(out_dir, "learning_curves.png"), min(reps, 2000), seed):
            lines += ["Learning curves: IQM over runs and tasks of the periodic evaluations, band = 95% "
                      "stratified-bootstrap CI (legend: runs per row).", "",
                      "![learning curves](learning_curves.png)", ""]
    for suite in sorted(rows):
        lines += suite_section(suite, rows[suite], budgets[suite], out_dir)
    lines += ablation_section(rows)
    if transfers:
        lines += transfer_section(transfers, budgets, out_dir, min(reps, 2000), seed)  # curves: as the main ones
    lines += excluded_section(runs, runs_dir)
    path = os.path.join(out_dir, "README.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    if wandb_project:
        log_to_wandb(rows, runs, runs_dir, out_dir, wandb_project, wandb_entity, transfers)
    return path


def log_to_wandb(rows: dict[str, list[Row]], runs: list[Run], runs_dir: str, out_dir: str, project: str,
                 entity: str | None, transfers: dict[tuple[str, str], list[TransferRow]] | None = None) -> None:
    """One wandb run (job type "report") holding the report's numbers as tables (one row per suite
    and method; one per suite, method and task; the runs not averaged in; the leave-one-out rows)
    and its PNG figures, so that they sit beside the training runs (grouped by the same rows) in the
    project."""
    import wandb

    name = "report-" + slug(os.path.basename(os.path.abspath(runs_dir)))
    run = wandb.init(project=project, entity=entity, job_type="report", name=name, tags=["report"],
                     config={"runs_dir": os.path.abspath(runs_dir), "out_dir": os.path.abspath(out_dir)})
    summary = wandb.Table(columns=[
        "suite", "row", "script", "variant", "score", "seeds", "runs", "iqm", "ci_low", "ci_high", "mean",
        "p_varshare_better", "p_ci_low", "p_ci_high", *(f"params_{k}" for k in PARAMETER_COUNTS), "env_steps",
        "wall_time_s"])
    per_task = wandb.Table(columns=["suite", "row", "task", "score", "iqm"])
    for suite, suite_rows in rows.items():
        for row in suite_rows:
            facts = row_facts(row)
            improvement = (row.improvement, *row.improvement_interval) if row.improvement is not None else (None,) * 3
            summary.add_data(suite, row.label, row.method, row.variant, row.metric, facts["seeds"], len(row.runs),
                             row.iqm, *row.interval, float(row.scores.mean()), *improvement,
                             *(facts[k] for k in PARAMETER_COUNTS), facts["env_steps"], facts["wall_time_s"])
            for j, task in enumerate(row.tasks):
                per_task.add_data(suite, row.label, task, row.metric, iqm(row.scores[:, j]))
    left_out = wandb.Table(columns=["run", "suite", "row", "seed", "why"])
    for r in runs:
        if r.problem:
            left_out.add_data(os.path.relpath(r.dir, runs_dir), r.suite if r.args else "?",
                              row_label(*r.key) if r.args else "?", r.args.get("seed"), r.problem)
    figures = {f"figures/{name[:-4]}": wandb.Image(os.path.join(out_dir, name))
               for name in sorted(os.listdir(out_dir)) if name.endswith(".png")}
    tables = {"report/rows": summary, "report/per_task": per_task, "report/not_averaged_in": left_out}
    if transfers:
        transfer = wandb.Table(columns=["suite", "held_out", "row", "script", "variant", "regime", "score", "runs",
                                        *(f"{stat}{end}" for stat in ("zero_shot", "final", "auc")
                                          for end in ("", "_ci_low", "_ci_high"))])
        for group in transfers.values():
            for row in group:
                values = [(v[0], *v[1]) if v is not None else (None,) * 3 for v in (row.zero_shot, row.final, row.auc)]
                transfer.add_data(row.suite, row.task, row.label, row.method, row.variant, row.regime, row.metric,
                                  len(row.runs), *(x for triple in values for x in triple))
        tables["report/transfer"] = transfer
    run.log({**tables, **figures})
    run.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", nargs="?", default="runs", help="folder holding the run directories")
    parser.add_argument("--out", default="report", help="where README.md and the PNG figures go")
    parser.add_argument("--reps", type=int, default=50_000,
                        help="bootstrap resamples per interval (rliable's default; curves use at most 2,000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the tables and figures to a wandb run (works with WANDB_MODE=offline)")
    parser.add_argument("--wandb-project", default="mtrl-varshare", help="the wandb project (the scripts' default)")
    parser.add_argument("--wandb-entity", default=None, help="the wandb entity (team)")
    opts = parser.parse_args(argv)
    try:
        path = build_report(opts.runs_dir, opts.out, opts.reps, opts.seed,
                            opts.wandb_project if opts.wandb else None, opts.wandb_entity)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
