"""The report (shared/report.py): rliable's statistics on hand-computed cases, and a report built
from synthetic run directories whose numbers are known in advance."""

from __future__ import annotations

import json
import subprocess
from collections import Counter

import numpy as np
import pytest

from shared import report
from tests.conftest import PYTHON, REPO, read_wandb_records, subprocess_env

MT3 = ["reach-v3", "push-v3", "pick-place-v3"]
CARTPOLE_MT = ["standard", "long-pole", "heavy-pole", "heavy-cart", "low-gravity-weak-push"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------
def test_iqm_drops_a_quarter_from_each_end_like_scipy_trim_mean():
    assert report.iqm([0.2, 0.5, 0.9]) == pytest.approx(1.6 / 3)  # int(0.75) = 0: nothing dropped
    assert report.iqm([1, 2, 3, 10]) == pytest.approx(2.5)  # one from each end
    assert report.iqm([1, 2, 3, 4, 100]) == pytest.approx(3.0)  # int(1.25) = 1, no fractional weights
    assert report.iqm([[1, 2], [3, 4], [5, 6], [7, 100]]) == pytest.approx(4.5)  # runs x tasks pooled, 2 dropped


def test_interval_is_a_point_when_every_run_scores_the_same():
    scores = np.full((3, 2), 0.7)
    assert report.iqm_interval(scores, 500, np.random.default_rng(0)) == pytest.approx((0.7, 0.7))


def test_interval_of_two_runs_on_one_task_spans_both_scores():
    # Resamples of {0, 1}: mean 0 a quarter of the time, 1 a quarter: the 2.5th/97.5th percentiles.
    assert report.iqm_interval(np.array([[0.0], [1.0]]), 2000, np.random.default_rng(1)) == (0.0, 1.0)


def test_bootstrap_resamples_runs_within_each_task():
    """Task A scores {0, 1}, task B {5, 5}. Each resample keeps two values per task, so its IQM
    (4 values, one dropped at each end) is mean(0, 5) = 2.5 or mean(1, 5) = 3, never more; pooling
    the tasks would allow four 5s (IQM 5)."""
    scores = np.array([[0.0, 5.0], [1.0, 5.0]])  # [runs, tasks]
    resampled = report.stratified_resample(scores, 1000, np.random.default_rng(2))  # [reps, runs, tasks]
    assert set(np.unique(resampled[:, :, 1])) == {5.0} and set(np.unique(resampled[:, :, 0])) == {0.0, 1.0}
    assert report.iqm_interval(scores, 2000, np.random.default_rng(3)) == (2.5, 3.0)


def test_probability_of_improvement_counts_ties_half_and_averages_tasks():
    x = np.array([[1, 4], [2, 6], [3, 8]], dtype=float)  # [runs, tasks]
    y = np.array([[2, 5], [2, 5]], dtype=float)
    # task 0: x=1 loses twice, x=2 ties twice (1/2 each), x=3 wins twice -> 3/6; task 1: 4/6
    assert report.probability_of_improvement(x, y) == pytest.approx((3 / 6 + 4 / 6) / 2)
    assert report.probability_of_improvement(y, x) == pytest.approx(1 - 7 / 12)
    assert report.probability_of_improvement(x, x) == pytest.approx(0.5)
    assert report.improvement_interval(x + 10, y, 500, np.random.default_rng(4)) == (1.0, 1.0)


def test_every_row_keeps_its_colour_and_the_baselines_differ():
    keys = [("ppo_varshare", ""), ("ppo_varshare", "L2Soft"), ("ppo_mtl_embed", ""), ("ppo_mtl_embed", "wide"),
            ("ppo_pcgrad", ""), ("ppo_softmod", ""), ("ppo_paco", ""), ("ppo_single", "")]
    colours = [report.colour_of(*key) for key in keys]
    assert len(set(colours)) == len(keys)
    assert report.colour_of("ppo_mtl_embed", "lr3e-4") == report.colour_of("ppo_mtl_embed", "lr3e-4")


# ----------------------------------------------------------------------------------------------
# A report from synthetic runs
# ----------------------------------------------------------------------------------------------
def recorded_prior_step(env_id: str, args: dict) -> str:
    """The --prior-step a VarShare run left at its default records: the suite's default, the gradient
    step when there is no pull."""
    return "gradient" if args.get("beta") == 0 else report.varshare_default_prior_step(env_id)


def write_run(root, name, env_id, algo, seed, values, tasks, *, budget=1000, suffix="", residual=None,
              finished=True, curve=(), ratios=None, metric="success_rate", sampled=None):
    """One run directory as the scripts write it: ``values`` are the final per-task scores of
    ``metric``, ``curve`` the periodic evaluations as (step, per-task scores)."""
    run = root / name
    run.mkdir(parents=True)
    args = {"env_id": env_id, "algo": algo, "seed": seed, "total_timesteps": budget, "run_name_suffix": suffix,
            "tasks": None, "holdout_task": None, "task_names": tasks}
    if residual is not None:
        args["residual"] = residual
    if algo == "ppo_varshare":
        args["prior_step"] = recorded_prior_step(env_id, args)
    (run / "args.json").write_text(json.dumps(args))
    other = "return" if metric == "success_rate" else "success_rate"

    def per_task(scores, other_value):  # the metric the report must not read gets a loud value
        return {t: {metric: v, other: other_value} for t, v in zip(tasks, scores, strict=True)}

    lines = [{"label": "", "global_step": step, "final": False, "per_task": per_task(scores, -99.0)}
             for step, scores in curve]
    lines.append({"label": "", "global_step": budget, "final": True, "per_task": per_task([1e6] * len(tasks), -99.0)})
    lines.append({"label": "pruned@0.001", "global_step": budget, "final": True,
                  "per_task": per_task([1e6] * len(tasks), -99.0)})
    (run / "eval.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if finished:
        summary = {"algo": algo, "task_names": tasks, "global_step": budget - 8, "wall_time_s": 10.0 * seed,
                   "per_task": per_task(values, -99.0),
                   "parameter_counts": {"total": 9000 + seed % 2, "active": 700, "trained_per_task": 800}}
        if ratios is not None:
            summary["residual_ratios"] = ratios
        if sampled is not None:  # --eval-sampled: the final evaluation's pass with sampled actions
            summary["sampled"] = {"per_task": per_task(sampled, -99.0)}
        (run / "summary.json").write_text(json.dumps(summary))
    return run


VARSHARE_MT3 = {1: [0.9, 0.5, 0.1], 2: [0.8, 0.6, 0.2], 3: [1.0, 0.4, 0.0]}  # IQM of the 9: 0.5
MTL_MT3 = {1: [0.7, 0.5, 0.1], 2: [0.7, 0.3, 0.0], 3: [0.6, 0.5, 0.0]}  # IQM 0.4
# P(VarShare > shared MTL): reach 9/9, push 6/9, pick-place 6.5/9 -> 21.5 / 27
P_VARSHARE_OVER_MTL = 21.5 / 27


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for seed, values in VARSHARE_MT3.items():
        ratios = {t: {"critic0": 0.1 * seed, "actor0": 0.2 + 0.1 * i} for i, t in enumerate(MT3)}
        write_run(root, f"mt3__ppo_varshare__{seed}", "mt3", "ppo_varshare", seed, values, MT3,
                  residual="variational", ratios=ratios,
                  curve=[(500, [0.0, 0.0, 0.0]), (1000, [0.4, 0.4, 0.4])] if seed != 1 else
                  [(500, [0.9, 0.9, 0.9]), (500, [0.2, 0.2, 0.2]), (1000, [0.4, 0.4, 0.4])])  # resumed: last wins
    for seed, values in MTL_MT3.items():
        write_run(root, f"mt3__ppo_mtl_embed__{seed}", "mt3", "ppo_mtl_embed", seed, values, MT3,
                  curve=[(500, [0.1, 0.1, 0.1]), (1000, [0.3, 0.3, 0.3])])
    for seed in (1, 2):
        write_run(root, f"mt3__ppo_mtl_embed__{seed}__wide", "mt3", "ppo_mtl_embed", seed, [0.3] * 3, MT3,
                  suffix="wide")
        write_run(root, f"mt3__ppo_varshare__{seed}__l2soft", "mt3", "ppo_varshare", seed, [0.5] * 3, MT3,
                  suffix="l2soft", residual="l2", ratios={t: {"critic0": 0.05, "actor0": 0.05} for t in MT3})
    # Not to be averaged in: another budget, unfinished, an unreadable summary. Perfect scores, so
    # any leak would move VarShare's IQM off 0.5.
    write_run(root, "mt3__ppo_varshare__4", "mt3", "ppo_varshare", 4, [1.0] * 3, MT3, budget=2000,
              residual="variational")
    write_run(root, "mt3__ppo_varshare__5", "mt3", "ppo_varshare", 5, [1.0] * 3, MT3, residual="variational",
              finished=False, curve=[(500, [1.0, 1.0, 1.0])])
    broken = write_run(root, "mt3__ppo_varshare__6", "mt3", "ppo_varshare", 6, [1.0] * 3, MT3,
                       residual="variational")
    (broken / "summary.json").write_text('{"algo": "ppo_varsh')
    # A toy suite: the return is the score (its success is a return threshold).
    for seed, value in ((1, 500.0), (2, 400.0)):
        write_run(root, f"cartpole-mt__ppo_varshare__{seed}", "cartpole-mt", "ppo_varshare", seed, [value] * 5,
                  CARTPOLE_MT, residual="variational", metric="return", curve=[(500, [100.0] * 5)])
        write_run(root, f"cartpole-mt__ppo_mtl_embed__{seed}", "cartpole-mt", "ppo_mtl_embed", seed, [300.0] * 5,
                  CARTPOLE_MT, metric="return", curve=[(500, [50.0] * 5)])
    out = tmp_path_factory.mktemp("report")
    path = report.build_report(str(root), str(out), reps=300, seed=0)
    return root, out, open(path).read()


def table_row(text: str, label: str) -> list[str]:
    """The cells of the first markdown table row whose first cell is ``label``."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == label:
            return cells
    raise AssertionError(f"no row '{label}' in the report")


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def interval(cell: str) -> tuple[float, float, float]:
    value, rest = cell.split(" [")
    lo, hi = rest.rstrip("]").split(", ")
    return float(value), float(lo), float(hi)


def test_report_gives_known_iqm_interval_and_improvement_per_row(built):
    _, _, text = built
    mt3 = section(text, "mt3")
    varshare = table_row(mt3, "VarShare")
    assert varshare[1:4] == ["ppo_varshare", "3", "3"]  # script, seeds, runs: seeds 4-6 left out
    value, lo, hi = interval(varshare[4])
    assert value == 0.5 and 0.2 <= lo <= value <= hi <= 0.8  # the interval stays within the middle scores
    assert varshare[6] == "(reference)"
    mtl = table_row(mt3, "shared MTL")
    assert interval(mtl[4])[0] == 0.4
    improvement, lo, hi = interval(mtl[6])
    assert improvement == round(P_VARSHARE_OVER_MTL, 2) and lo <= improvement <= hi <= 1.0
    assert table_row(mt3, "shared MTL wide (capacity-matched)")[4] == "0.300 [0.300, 0.300]"
    assert interval(table_row(mt3, "shared MTL wide (capacity-matched)")[6])[0] == round(2 / 3, 2)
    l2soft = table_row(mt3, "L2Soft")
    assert l2soft[1:5] == ["ppo_varshare", "2", "2", "0.500 [0.500, 0.500]"]
    assert interval(l2soft[6])[0] == 0.5
    # counts (the median over seeds), env steps, wall time
    assert varshare[7:] == ["9,001 / 700 / 800", "992", "20"]


def test_rows_sit_next_to_their_partners(built):
    _, _, text = built
    mt3 = section(text, "mt3")
    summary_table = mt3.split("Per task")[0]
    order = [line.split("|")[1].strip() for line in summary_table.splitlines() if line.startswith("| ")][1:]
    assert order == ["VarShare", "L2Soft", "shared MTL", "shared MTL wide (capacity-matched)"]


def test_per_task_table_and_residual_ratio_heatmap(built):
    _, out, text = built
    mt3 = section(text, "mt3")
    per_task = mt3.split("Per task, IQM over runs:")[1]
    assert table_row(per_task, "VarShare")[1:] == ["0.900", "0.500", "0.100"]  # 3 values each: plain means
    assert table_row(per_task, "shared MTL")[1:] == ["0.667", "0.433", "0.033"]
    ratios = mt3.split("residual_ratios_mt3.png")[1]
    assert table_row(ratios, "reach-v3")[1:] == ["0.200", "0.200"]  # critic0 mean of 0.1, 0.2, 0.3
    assert table_row(ratios, "pick-place-v3")[1:] == ["0.200", "0.400"]
    assert (out / "residual_ratios_mt3.png").read_bytes().startswith(PNG_MAGIC)


def test_toy_suite_scores_the_return(built):
    _, _, text = built
    cartpole = section(text, "cartpole-mt")
    assert "final mean return per task" in cartpole
    assert interval(table_row(cartpole, "VarShare")[4])[0] == 450.0  # 10 values (5x400, 5x500), 2 dropped each end
    assert table_row(cartpole, "shared MTL")[4:7] == ["300.0 [300.0, 300.0]", "300.0", "1.00 [1.00, 1.00]"]


def test_unfinished_and_other_budget_runs_are_listed_not_averaged(built):
    _, _, text = built
    left_out = section(text, "Not averaged in")
    assert table_row(left_out, "mt3__ppo_varshare__4")[4] == "budget 2,000 env steps, not the suite's 1,000"
    assert table_row(left_out, "mt3__ppo_varshare__5")[4] == "unfinished: no summary.json; last evaluation at step 500"
    assert "unreadable" in table_row(left_out, "mt3__ppo_varshare__6")[4]
    assert "17 run directories: 14 averaged in, 3 listed" in text


def test_figures_are_written_and_non_empty(built):
    _, out, text = built
    for name in ("final_scores.png", "learning_curves.png", "residual_ratios_mt3.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
        assert f"]({name})" in text


def test_learning_curve_is_the_iqm_of_periodic_evaluations_only(built):
    root, _, _ = built
    runs = report.find_runs(str(root))
    report.check_budgets(runs)
    rows = report.build_rows(runs, 100, 0)
    varshare = next(r for r in rows["mt3"] if (r.method, r.variant) == ("ppo_varshare", ""))
    steps, mid, lo, hi = report.learning_curve(varshare, 100, 0)
    # step 500: seed 1's second line (0.2 x 3) and seeds 2, 3 (0 x 3): IQM of [0]*6 + [0.2]*3 drops
    # two from each end -> mean(0, 0, 0, 0, 0.2) = 0.04 (seed 1's first line, 0.9, would give 0.18);
    # the final and pruned lines (1e6) never enter.
    assert list(steps) == [500, 1000]
    assert mid == pytest.approx([0.04, 0.4])
    assert hi[1] == pytest.approx(0.4) and lo[1] == pytest.approx(0.4)


def test_majority_budget_tie_goes_to_the_larger_budget(tmp_path):
    for seed, budget in ((1, 1000), (2, 2000)):
        write_run(tmp_path, f"r{seed}", "mt3", "ppo_mtl_embed", seed, [0.5] * 3, MT3, budget=budget)
    runs = report.find_runs(str(tmp_path))
    assert report.check_budgets(runs) == {"mt3": 2000}
    assert [bool(r.problem) for r in sorted(runs, key=lambda r: r.dir)] == [True, False]


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_missing_or_empty_runs_dir_is_one_sentence_and_exit_2(tmp_path, capsys, make):
    runs_dir = tmp_path / "runs"
    if make == "empty":
        runs_dir.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(runs_dir), "--out", str(tmp_path / "report")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(runs_dir) in err
    assert not (tmp_path / "report").exists()


def test_report_logs_its_tables_and_figures_to_an_offline_wandb_run(built, tmp_path):
    root, _, _ = built
    out, wandb_dir = tmp_path / "report", tmp_path / "wandb"
    wandb_dir.mkdir()
    proc = subprocess.run([PYTHON, "-m", "shared.report", str(root), "--out", str(out), "--reps", "200", "--wandb"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=subprocess_env(WANDB_MODE="offline", WANDB_DIR=str(wandb_dir)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (offline,) = wandb_dir.rglob("offline-run-*")
    records = read_wandb_records(next(offline.glob("run-*.wandb")))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.job_type == "report" and list(run.tags) == ["report"]
    logged = {}  # media are logged as nested keys: (name, field) -> value
    for item in (i for r in records if r.WhichOneof("record_type") == "history" for i in r.history.item):
        if len(item.nested_key) == 2:
            logged.setdefault(item.nested_key[0], {})[item.nested_key[1]] = json.loads(item.value_json)
    assert {logged[k]["_type"] for k in ("report/rows", "report/per_task", "report/not_averaged_in")} == {
        "table-file"}
    assert {k for k in logged if k.startswith("figures/")} == {
        "figures/final_scores", "figures/learning_curves", "figures/residual_ratios_mt3"}
    # the table files hold the report's numbers: VarShare's row on mt3 has IQM 0.5 over 3 seeds
    table = json.loads((offline / "files" / logged["report/rows"]["path"]).read_text())
    rows = [dict(zip(table["columns"], data, strict=True)) for data in table["data"]]
    varshare = next(r for r in rows if (r["suite"], r["row"]) == ("mt3", "VarShare"))
    assert (varshare["iqm"], varshare["seeds"], varshare["params_total"]) == (0.5, 3, 9001)
    assert len(rows) == 6 and len(json.loads((offline / "files" / logged["report/per_task"]["path"]).read_text())[
        "data"]) == 4 * 3 + 2 * 5
    for key in ("figures/final_scores", "figures/learning_curves"):
        assert (offline / "files" / logged[key]["path"]).read_bytes().startswith(PNG_MAGIC)


# ----------------------------------------------------------------------------------------------
# Leave-one-out transfer and VarShare's ablations, from synthetic runs
# ----------------------------------------------------------------------------------------------
HELD_OUT = "push-v3"
OTHERS = ["reach-v3", "pick-place-v3"]


def write_loo_run(root, name, algo, seed, task_names, final, *, budget=1000, curve=(), zero_shot=None, finished=True,
                  **args):
    """A run directory of mt3 as the scripts write it, with any args.json entries (holdout_task,
    tasks, init_from, transfer, ...); ``final``, ``curve`` and ``zero_shot`` give one score per task."""
    run = root / name
    run.mkdir(parents=True)
    if algo == "ppo_varshare":
        args = {"prior_step": recorded_prior_step("mt3", args), **args}
    (run / "args.json").write_text(json.dumps(
        {"env_id": "mt3", "algo": algo, "seed": seed, "total_timesteps": budget, "run_name_suffix": "",
         "tasks": None, "holdout_task": None, "init_from": None, "transfer": None, "task_names": task_names,
         **args}))

    def per_task(scores):
        return {t: {"success_rate": v, "return": -99.0} for t, v in zip(task_names, scores, strict=True)}

    lines = []
    if zero_shot is not None:
        lines.append({"label": "zero-shot", "global_step": 0, "final": False, "per_task": per_task(zero_shot)})
    lines += [{"label": "", "global_step": step, "final": False, "per_task": per_task(s)} for step, s in curve]
    lines.append({"label": "", "global_step": budget, "final": True, "per_task": per_task([1e6] * len(task_names))})
    (run / "eval.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if finished:
        (run / "summary.json").write_text(json.dumps(
            {"algo": algo, "task_names": task_names, "global_step": budget, "wall_time_s": 1.0,
             "per_task": per_task(final), "parameter_counts": {"total": 1, "active": 1, "trained_per_task": 1}}))
    return run


# finetune (4 seeds): zero-shot, the periodic evaluation at 500 and the final one at 1000 per seed. Area:
# trapezoid through (0, zero-shot), (500, mid), (1000, final), over 1000 steps:
# seed 1: (0.2+0.6)/2*0.5 + (0.6+1.0)/2*0.5 = 0.6; seed 2: 0.2+0.3 = 0.5; seed 3: 0.35+0.4 = 0.75; seed 4: 1.0
FINETUNE = {1: (0.2, 0.6, 1.0), 2: (0.4, 0.4, 0.8), 3: (0.6, 0.8, 0.8), 4: (1.0, 1.0, 1.0)}
# IQM of 4 values drops one from each end: zero-shot mean(0.4, 0.6), final mean(0.8, 1.0), area mean(0.6, 0.75)
FINETUNE_IQM = {"zero-shot": 0.5, "final": 0.9, "auc": 0.675}
# task-params (2 seeds, plain means): areas (0.2+0.2)/4 + (0.2+0.4)/4 = 0.25 and (0.4+0.4)/4 + (0.4+0.6)/4 = 0.45
TASK_PARAMS = {1: (0.2, 0.2, 0.4), 2: (0.4, 0.4, 0.6)}
TASK_PARAMS_IQM = {"zero-shot": 0.3, "final": 0.5, "auc": 0.35}
# scratch (2 seeds): no zero-shot evaluation, the curve starts at 0: (0+0.2)/4 + (0.2+0.6)/4 = 0.25, and
# (0+0.4)/4 + (0.4+0.8)/4 = 0.4
SCRATCH = {1: (0.2, 0.6), 2: (0.4, 0.8)}
SCRATCH_IQM = {"final": 0.7, "auc": 0.325}
VARSHARE_MAIN = {1: [0.9, 0.5, 0.1], 2: [0.8, 0.6, 0.2], 3: [1.0, 0.4, 0.0]}  # IQM 0.5, as above


@pytest.fixture(scope="module")
def loo_built(tmp_path_factory):
    root = tmp_path_factory.mktemp("loo-runs")
    base_dirs = {}
    for seed in (1, 2):
        base_dirs[seed] = write_loo_run(root, f"loo/base/{seed}", "ppo_varshare", seed, OTHERS, [1.0, 0.0],
                                        budget=3000, holdout_task=HELD_OUT, residual="variational")
    for seed, (zero, mid, final) in FINETUNE.items():
        write_loo_run(root, f"loo/finetune/{seed}", "ppo_varshare", seed, [HELD_OUT], [final], zero_shot=[zero],
                      curve=[(500, [0.0]), (500, [mid])] if seed == 1 else [(500, [mid])],  # resumed: the last counts
                      tasks=[HELD_OUT], init_from=str(base_dirs[1 + seed % 2]), transfer="finetune",
                      residual="variational")
    for seed, (zero, mid, final) in TASK_PARAMS.items():
        write_loo_run(root, f"loo/task-params/{seed}", "ppo_varshare", seed, [HELD_OUT], [final], zero_shot=[zero],
                      curve=[(500, [mid])], tasks=[HELD_OUT], init_from=str(base_dirs[seed]), transfer="task-params",
                      residual="variational")
    for seed, (mid, final) in SCRATCH.items():
        write_loo_run(root, f"loo/scratch/{seed}", "ppo_varshare", seed, [HELD_OUT], [final], curve=[(500, [mid])],
                      tasks=[HELD_OUT], residual="variational")
        # the oracle's one-task run: (0+0.5)/4 + (0.5+0.5)/4 = 0.375
        write_loo_run(root, f"loo/single/{seed}", "ppo_single", seed, [HELD_OUT], [0.5], curve=[(500, [0.5])],
                      tasks=[HELD_OUT])
    # listed, not averaged in: a transfer run of another budget, an unfinished one
    write_loo_run(root, "loo/finetune-long", "ppo_varshare", 9, [HELD_OUT], [1.0], budget=2000, zero_shot=[1.0],
                  tasks=[HELD_OUT], init_from=str(base_dirs[1]), transfer="finetune", residual="variational")
    write_loo_run(root, "loo/finetune-cut", "ppo_varshare", 8, [HELD_OUT], [1.0], zero_shot=[1.0], finished=False,
                  tasks=[HELD_OUT], init_from=str(base_dirs[1]), transfer="finetune", residual="variational")
    # a one-task run of a task no base held out stays a suite of its own, as before
    write_loo_run(root, "other/single-reach", "ppo_single", 1, ["reach-v3"], [0.25], tasks=["reach-v3"])

    # the suite's own runs: VarShare and its ablations, each told apart by args.json
    for seed, values in VARSHARE_MAIN.items():
        write_loo_run(root, f"main/varshare/{seed}", "ppo_varshare", seed, MT3, values, residual="variational")
    for seed in (1, 2):
        write_loo_run(root, f"main/l2soft/{seed}", "ppo_varshare", seed, MT3, [0.5] * 3, residual="l2",
                      run_name_suffix="l2soft")
        write_loo_run(root, f"main/l2soft-tuned/{seed}", "ppo_varshare", seed, MT3, [0.5] * 3, residual="l2",
                      beta=3.0, run_name_suffix="l2soft-tuned")
        write_loo_run(root, f"main/beta0/{seed}", "ppo_varshare", seed, MT3, [0.3] * 3, residual="variational",
                      beta=0.0, run_name_suffix="beta0")
        write_loo_run(root, f"main/reparam/{seed}", "ppo_varshare", seed, MT3, [0.5] * 3, residual="variational",
                      estimator="reparam", run_name_suffix="reparam")
        write_loo_run(root, f"main/episode/{seed}", "ppo_varshare", seed, MT3, [1.0] * 3, residual="variational",
                      rollout_weights="episode", run_name_suffix="episode")
    # launched by hand with --beta 0 and no suffix: the beta=0 row, not VarShare's
    write_loo_run(root, "main/beta0-by-hand", "ppo_varshare", 3, MT3, [0.3] * 3, residual="variational", beta=0)
    out = tmp_path_factory.mktemp("loo-report")
    path = report.build_report(str(root), str(out), reps=300, seed=0)
    return root, out, open(path).read()


def test_transfer_table_gives_zero_shot_final_and_area_per_method_and_regime(loo_built):
    _, out, text = loo_built
    transfer = text.split(f"### mt3, held-out {HELD_OUT}\n", 1)[1].split("\n## ", 1)[0]
    assert "1,000 env steps per run on push-v3" in transfer
    rows = {}
    for line in transfer.split("Base runs")[0].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[1] in ("scratch", "finetune", "task-params"):
            rows[cells[0], cells[1]] = cells
    assert list(rows) == [("VarShare", "scratch"), ("VarShare", "finetune"), ("VarShare", "task-params"),
                          ("single-task", "scratch")]  # the main tables' method order, then the regimes
    for regime, expected, seeds in (("finetune", FINETUNE_IQM, 4), ("task-params", TASK_PARAMS_IQM, 2),
                                    ("scratch", SCRATCH_IQM, 2)):
        cells = rows["VarShare", regime]
        assert cells[2:4] == [str(seeds), str(seeds)]  # the other-budget and unfinished runs are not in
        for column, stat in ((4, "zero-shot"), (5, "final"), (6, "auc")):
            if stat not in expected:
                assert cells[column] == "-"
                continue
            value, lo, hi = interval(cells[column])
            assert value == pytest.approx(expected[stat], abs=5e-4) and lo <= value <= hi
    assert interval(rows["single-task", "scratch"][6])[0] == pytest.approx(0.375, abs=5e-4)
    assert interval(rows["VarShare", "task-params"][4])[1:] == pytest.approx((0.2, 0.4))  # 2 runs: either one
    base = table_row(transfer.split("Base runs")[1], "VarShare")
    assert base[1:3] == ["2", "2"] and base[3] == "0.500 [0.500, 0.500]"  # scores 1.0 and 0.0 on the other tasks
    assert (out / f"transfer_mt3_{HELD_OUT}.png").read_bytes().startswith(PNG_MAGIC)
    assert f"](transfer_mt3_{HELD_OUT}.png)" in transfer
    assert "trapezoid rule" in text and "divided by the env steps of the final evaluation" in text


def test_area_under_curve_by_hand():
    run = report.Run("r", {"total_timesteps": 1000}, summary={"global_step": 1000, "per_task": {"a": {"x": 1.0}}},
                     curve=[{"global_step": 250, "per_task": {"a": {"x": 0.5}}},
                            {"global_step": 1000, "per_task": {"a": {"x": 0.9}}}],
                     zero_shot={"per_task": {"a": {"x": 0.1}}})
    # (0.1+0.5)/2*250 + (0.5+0.9)/2*750 + 0 (the final evaluation at the same step) = 75 + 525
    assert report.area_under_curve(run, ["a"], "x") == pytest.approx(0.6)
    run.zero_shot = None  # a scratch run: from 0 at step 0
    assert report.area_under_curve(run, ["a"], "x") == pytest.approx((0.25 * 250 + 525) / 1000)


def test_leave_one_out_runs_stay_out_of_the_suite_tables(loo_built):
    root, _, text = loo_built
    mt3 = section(text, "mt3")
    varshare = table_row(mt3, "VarShare")
    assert varshare[2:4] == ["3", "3"] and interval(varshare[4])[0] == 0.5  # the main runs only
    assert "single-task" not in mt3.split("Per task")[0]  # the oracle's scratch runs are not a main row
    assert "## mt3 (holding out" not in text and f"## mt3 (tasks {HELD_OUT})" not in text
    assert "## mt3 (tasks reach-v3)" in text  # a one-task run that no base held out: as before
    runs = report.find_runs(str(root))
    regimes = Counter(run.regime for run in runs)
    assert regimes == {"": 3 + 5 * 2 + 1 + 1, "base": 2, "finetune": 4 + 2, "task-params": 2, "scratch": 4}
    left_out = section(text, "Not averaged in")
    assert table_row(left_out, "loo/finetune-long")[2:] == [
        "VarShare, finetune", "9", f"budget 2,000 env steps, not the 1,000 of most mt3 scratch and transfer runs "
                                   f"of held-out task {HELD_OUT}"]
    assert table_row(left_out, "loo/finetune-cut")[4].startswith("unfinished")
    assert f"{len(runs)} run directories: {len(runs) - 2} averaged in, 2 listed" in text


def test_task_encodings_other_than_the_one_hot_are_rows_of_their_own():
    assert report.variant_of({"algo": "ppo_mtl_embed", "task_encoding": "onehot"}) == ""
    assert report.variant_of({"algo": "ppo_mtl_embed", "task_encoding": "onehot", "run_name_suffix": "wide"}) == "wide"
    assert report.variant_of({"algo": "ppo_mtl_embed", "task_encoding": "none"}) == "task-blind"
    assert report.variant_of({"algo": "ppo_mtl_embed", "task_encoding": "none", "run_name_suffix": "taskblind"}) \
        == "task-blind"
    assert report.variant_of({"algo": "ppo_pcgrad", "task_encoding": "learned", "run_name_suffix": "x"}) \
        == "learned encoding x"
    assert report.row_label("ppo_mtl_embed", "task-blind") == "shared MTL task-blind"


def test_ablation_rows_follow_varshare_and_have_their_section(loo_built):
    _, _, text = loo_built
    order = [line.split("|")[1].strip() for line in section(text, "mt3").split("Per task")[0].splitlines()
             if line.startswith("| ")][1:]
    assert order == ["VarShare", "L2Soft", "L2Soft tuned", "VarShare beta=0", "VarShare episode weights",
                     "VarShare reparam estimator"]
    ablations = section(text, "VarShare's ablations")
    assert table_row(ablations, "VarShare")[5] == "(reference)"
    # P(VarShare > row) per task (VarShare: reach 0.9/0.8/1.0, push 0.5/0.6/0.4, pick-place 0.1/0.2/0.0), mean of 3:
    # beta=0 (0.3 each; 3 runs, one by hand without suffix): 1, 1, 0; L2Soft and reparam (0.5): 1, 1/2, 0;
    # episode weights (1.0): 1/6 (reach: VarShare's 1.0 ties both runs' 1.0), 0, 0
    for label, runs, score, improvement in (("L2Soft", "2", "0.500", 0.5), ("L2Soft tuned", "2", "0.500", 0.5),
                                            ("VarShare beta=0", "3", "0.300", 2 / 3),
                                            ("VarShare reparam estimator", "2", "0.500", 0.5),
                                            ("VarShare episode weights", "2", "1.000", 1 / 18)):
        cells = table_row(ablations, label)
        assert cells[1].startswith({"L2Soft": "--residual l2 (", "L2Soft tuned": "--residual l2 at the lambda tuned",
                                    "VarShare beta=0": "--beta 0",
                                    "VarShare reparam estimator": "--estimator reparam",
                                    "VarShare episode weights": "--rollout-weights episode"}[label])
        assert cells[3] == runs and cells[4].startswith(score)
        assert interval(cells[5])[0] == round(improvement, 2)


def test_transfer_rows_go_to_wandb_as_a_table(loo_built, tmp_path):
    root, _, _ = loo_built
    wandb_dir = tmp_path / "wandb"
    wandb_dir.mkdir()
    proc = subprocess.run([PYTHON, "-m", "shared.report", str(root), "--out", str(tmp_path / "report"), "--reps", "200",
                           "--wandb"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=subprocess_env(WANDB_MODE="offline", WANDB_DIR=str(wandb_dir)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (offline,) = wandb_dir.rglob("offline-run-*")
    records = read_wandb_records(next(offline.glob("run-*.wandb")))
    logged = {}  # media are logged as nested keys: (name, field) -> value
    for item in (i for r in records if r.WhichOneof("record_type") == "history" for i in r.history.item):
        if len(item.nested_key) == 2:
            logged.setdefault(item.nested_key[0], {})[item.nested_key[1]] = json.loads(item.value_json)
    table = json.loads((offline / "files" / logged["report/transfer"]["path"]).read_text())
    rows = {(r["row"], r["regime"]): r for r in (dict(zip(table["columns"], d, strict=True)) for d in table["data"])}
    finetune = rows["VarShare", "finetune"]
    assert (finetune["held_out"], finetune["runs"]) == (HELD_OUT, 4)
    assert (finetune["zero_shot"], finetune["final"], finetune["auc"]) == pytest.approx((0.5, 0.9, 0.675))
    assert rows["VarShare", "scratch"]["zero_shot"] is None and rows["VarShare", "base"]["auc"] is None
    assert f"figures/transfer_mt3_{HELD_OUT}" in logged


def test_varshare_with_the_one_hot_input_is_a_row_of_its_own():
    assert report.variant_of({"algo": "ppo_varshare", "task_input": "none"}) == ""
    assert report.variant_of({"algo": "ppo_varshare", "task_input": "onehot"}) == "one-hot input"
    assert report.variant_of({"algo": "ppo_varshare", "task_input": "onehot", "run_name_suffix": "onehot"}) \
        == "one-hot input"
    assert report.variant_of({"algo": "ppo_varshare", "task_input": "onehot", "beta": 0}) \
        == "one-hot input + beta=0"
    assert report.variant_of({"algo": "ppo_varshare", "task_input": "onehot", "residual": "l2"}) \
        == "one-hot input + L2Soft"
    assert report.ablation_change("ppo_varshare", "one-hot input") is None  # not one of VarShare's ablations


def test_varshare_with_the_prox_prior_step_is_a_row_of_its_own():
    assert report.variant_of({"algo": "ppo_varshare", "prior_step": "gradient"}) == ""
    assert report.variant_of({"algo": "ppo_varshare", "prior_step": "prox"}) == "prox step"
    assert report.variant_of({"algo": "ppo_varshare", "prior_step": "prox", "run_name_suffix": "prox"}) == "prox step"
    assert report.variant_of({"algo": "ppo_varshare", "prior_step": "prox", "residual": "l2"}) == "prox step + L2Soft"
    assert report.variant_of({"algo": "ppo_varshare", "prior_step": "prox", "task_input": "onehot"}) \
        == "one-hot input + prox step"


def test_sampled_action_scores_get_a_table_of_their_own_where_every_run_has_them(tmp_path):
    """The deterministic score stays the rows' score; the sampled pass is a separate table, with a row
    only for methods whose runs all logged it (runs from before --eval-sampled have none)."""
    root = tmp_path / "runs"
    sampled = {1: [1.0, 0.6, 0.0], 2: [1.0, 0.7, 0.1], 3: [0.9, 0.6, 0.0]}  # IQM of the 9 (2 cut each end): 0.580
    for seed in (1, 2, 3):
        write_run(root, f"mt3__ppo_mtl_embed__{seed}", "mt3", "ppo_mtl_embed", seed, MTL_MT3[seed], MT3,
                  sampled=sampled[seed])
        write_run(root, f"mt3__ppo_varshare__{seed}", "mt3", "ppo_varshare", seed, VARSHARE_MT3[seed], MT3,
                  residual="variational", sampled=sampled[seed] if seed != 2 else None)
    text = open(report.build_report(str(root), str(tmp_path / "out"), reps=100, seed=0)).read()
    assert table_row(text, "shared MTL")[4].startswith("0.40")  # the score is still the deterministic one
    table = text[text.index("with actions sampled from the policy"):].split("\n\n")[1]  # heading, table
    row = table_row(table, "shared MTL")
    assert row[1:] == ["0.580", "0.967", "0.633", "0.033"], row  # IQM over all tasks, then per task (3 runs: means)
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["shared MTL"]  # VarShare: no row


def test_a_prior_step_other_than_the_suites_default_is_a_row_of_its_own():
    """Meta-World's default is the prox step (toy suites: the gradient step); the other one is a
    variant. A run from before the flag (no prior_step in args.json) took the gradient step; without
    a pull (beta 0) the two steps are one, and the L2Soft-tuned row carries its own step."""
    assert report.varshare_default_prior_step("mt3") == "prox"
    assert report.varshare_default_prior_step("cartpole-mt") == "gradient"
    mt3 = {"algo": "ppo_varshare", "env_id": "mt3"}
    assert report.variant_of({**mt3, "prior_step": "prox", "beta": 0.0003}) == ""
    assert report.variant_of({**mt3, "prior_step": "gradient", "beta": 0.3}) == "gradient step"
    assert report.variant_of({**mt3, "beta": 0.3}) == "gradient step"  # before the flag existed
    assert report.variant_of({**mt3, "prior_step": "gradient", "beta": 0.0}) == "beta=0"
    assert report.variant_of({**mt3, "prior_step": "gradient", "residual": "l2", "beta": 3.0,
                              "run_name_suffix": "l2soft-tuned"}) == "L2Soft tuned"
    assert report.variant_of({**mt3, "prior_step": "prox", "residual": "l2"}) == "L2Soft"
    assert report.variant_of({**mt3, "prior_step": "gradient", "residual": "l2"}) == "gradient step + L2Soft"
    assert report.variant_of({"algo": "ppo_varshare", "env_id": "cartpole-mt", "prior_step": "gradient"}) == ""
