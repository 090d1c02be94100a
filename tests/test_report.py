"""The report (shared/report.py): rliable's statistics on hand-computed cases, and a report built
from synthetic run directories whose numbers are known in advance."""

from __future__ import annotations

import json
import subprocess

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
def write_run(root, name, env_id, algo, seed, values, tasks, *, budget=1000, suffix="", residual=None,
              finished=True, curve=(), ratios=None, metric="success_rate"):
    """One run directory as the scripts write it: ``values`` are the final per-task scores of
    ``metric``, ``curve`` the periodic evaluations as (step, per-task scores)."""
    run = root / name
    run.mkdir(parents=True)
    args = {"env_id": env_id, "algo": algo, "seed": seed, "total_timesteps": budget, "run_name_suffix": suffix,
            "tasks": None, "holdout_task": None, "task_names": tasks}
    if residual is not None:
        args["residual"] = residual
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
