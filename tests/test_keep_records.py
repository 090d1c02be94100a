"""benchmarks/keep_records.py: the finished runs' records are copied with their layout, an
unfinished run is left out, and the report built from the copy equals the one built from the runs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from shared import report
from tests.conftest import PYTHON, REPO, subprocess_env
from tests.test_report import MT3, write_run


def run_keep(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(REPO / "benchmarks" / "keep_records.py"), *argv], capture_output=True,
                          text=True, timeout=120, env=subprocess_env(), cwd=REPO)


def matrix_like_runs(root):
    """Two finished VarShare runs in matrix job folders (with job.json and the large files the
    records leave behind) and one unfinished run."""
    for seed, values in ((1, [1.0, 0.5, 0.0]), (2, [0.9, 0.3, 0.2])):
        job = root / "mt3" / "ppo_varshare" / f"seed{seed}"
        run = write_run(job, f"mt3__ppo_varshare__{seed}__t", "mt3", "ppo_varshare", seed, values, MT3,
                        residual="variational", curve=[(500, [0.1, 0.2, 0.3])])
        (job / "job.json").write_text(json.dumps({"job": f"mt3/ppo_varshare/seed{seed}", "attempts": []}))
        (job / "job.log").write_text("progress\n")
        (run / "checkpoint.pt").write_bytes(b"\0" * 1024)
        (run / "events.out.tfevents.1.vm").write_bytes(b"\0" * 64)
    write_run(root / "mt3" / "ppo_varshare" / "seed3", "mt3__ppo_varshare__3__t", "mt3", "ppo_varshare", 3,
              [1.0] * 3, MT3, residual="variational", finished=False, curve=[(500, [0.5, 0.5, 0.5])])


def test_finished_runs_keep_their_records_and_layout_and_nothing_else(tmp_path):
    runs, dest = tmp_path / "runs", tmp_path / "results"
    matrix_like_runs(runs)
    proc = run_keep(str(runs), str(dest))
    assert proc.returncode == 0, proc.stderr
    assert "kept the records of 2 finished runs" in proc.stdout and "(1 left out)" in proc.stdout
    assert "left out mt3/ppo_varshare/seed3/mt3__ppo_varshare__3__t: unfinished" in proc.stdout
    copied = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert copied == sorted([f"mt3/ppo_varshare/seed{s}/{name}" for s in (1, 2) for name in ("job.json",)]
                            + [f"mt3/ppo_varshare/seed{s}/mt3__ppo_varshare__{s}__t/{name}" for s in (1, 2)
                               for name in ("args.json", "eval.jsonl", "summary.json")])
    for name in ("args.json", "eval.jsonl", "summary.json"):
        source = runs / "mt3" / "ppo_varshare" / "seed2" / "mt3__ppo_varshare__2__t" / name
        assert (dest / source.relative_to(runs)).read_bytes() == source.read_bytes()


def test_report_from_the_records_has_the_same_rows_as_from_the_runs(tmp_path):
    runs, dest = tmp_path / "runs", tmp_path / "results"
    matrix_like_runs(runs)
    assert run_keep(str(runs), str(dest)).returncode == 0
    def rows(folder):
        found = report.find_runs(str(folder))
        report.check_budgets(found)
        return report.build_rows(found, 200, 0)

    from_runs, from_records = rows(runs), rows(dest)
    assert [(r.label, r.iqm, r.interval) for r in from_records["mt3"]] == \
        [(r.label, r.iqm, r.interval) for r in from_runs["mt3"]]
    assert len(from_records["mt3"][0].runs) == 2


def test_a_missing_or_empty_runs_folder_gets_one_sentence(tmp_path):
    proc = run_keep(str(tmp_path / "nope"), str(tmp_path / "results"))
    assert proc.returncode == 2 and "runs folder" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = run_keep(str(tmp_path / "empty"), str(tmp_path / "results"))
    assert proc.returncode == 2 and "no run directories" in proc.stderr
    for dest in (tmp_path / "empty", tmp_path / "empty" / "kept"):  # a rerun would copy the copies
        proc = run_keep(str(tmp_path / "empty"), str(dest))
        assert proc.returncode == 2 and "is inside the runs folder" in proc.stderr
    assert not (tmp_path / "empty" / "kept").exists()


def test_a_finished_run_missing_a_record_is_left_out_and_an_unwritable_dest_gets_one_sentence(tmp_path):
    runs = tmp_path / "runs"
    matrix_like_runs(runs)
    next((runs / "mt3" / "ppo_varshare" / "seed1").glob("mt3__*")).joinpath("eval.jsonl").unlink()
    proc = run_keep(str(runs), str(tmp_path / "results"))
    assert proc.returncode == 0, proc.stderr
    assert "left out mt3/ppo_varshare/seed1/mt3__ppo_varshare__1__t: finished, but eval.jsonl missing" in proc.stdout
    assert "kept the records of 1 finished runs" in proc.stdout
    (tmp_path / "file").write_text("")
    proc = run_keep(str(runs), str(tmp_path / "file" / "results"))
    assert proc.returncode == 2 and "cannot write the records" in proc.stderr and "Traceback" not in proc.stderr


def test_every_kept_record_under_results_is_a_finished_run_at_its_folders_budget():
    """results/ holds what the README's sections were measured from: a copy that lost a file, or a
    folder that mixes budgets (which the report would silently leave out), fails here."""
    folders = sorted(p for p in (REPO / "results").iterdir() if p.is_dir())
    assert folders, "results/ holds no kept runs folder"
    for folder in folders:
        runs = report.find_runs(str(folder))
        assert runs, f"{folder} holds no run records"
        report.check_budgets(runs)
        assert [(run.dir, run.problem) for run in runs if run.problem] == []
        job_folders = [os.path.dirname(run.dir) for run in runs
                       if os.path.isfile(os.path.join(os.path.dirname(run.dir), "job.json"))]
        # a job started afresh gets a new run folder: a stale copy beside it would be averaged in twice
        assert len(set(job_folders)) == len(job_folders), "a job folder holds two kept runs"
        for run in runs:
            assert run.curve, f"{run.dir}: eval.jsonl has no periodic evaluation"
            job_file = Path(run.dir).parent / "job.json"  # a matrix job's: its command names this run's seed
            if job_file.is_file():
                job = json.loads(job_file.read_text())
                assert job["script"] == run.args["algo"]
                assert job["command"][job["command"].index("--seed") + 1] == str(run.args["seed"])
