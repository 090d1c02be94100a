"""Copy the records of the finished runs under a runs folder into a folder that git tracks, so
that a README section's report can be rebuilt from a clean clone after the runs folder is gone:

    .venv/bin/python benchmarks/keep_records.py runs/ablate-mt3 results/ablate-mt3
    .venv/bin/python -m shared.report results/ablate-mt3 --out report/ablate-mt3

A run's records are the three files the report reads (args.json, eval.jsonl, summary.json) and,
in a matrix's runs folder, its job folder's job.json (the command and every attempt). The folder
layout under the runs folder is kept. Checkpoints, tensorboard events and logs stay behind: they
are large, the report reads none of them, and a run is resumed from its own folder, not from
its records. A run without a readable summary.json has not finished, and one that lost a record
is incomplete: each is left out with one line. A run already kept is overwritten, so running the
tool again after more runs finish brings the copy up to date; a copy of a run that no longer
exists is not removed (tests/test_keep_records.py refuses two kept runs in one job folder). The
destination must lie outside the runs folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from shared.report import find_runs  # noqa: E402

RUN_RECORDS = ("args.json", "eval.jsonl", "summary.json")
JOB_RECORD = "job.json"


def keep_records(runs_dir: str, dest: str) -> tuple[list[str], list[str]]:
    """Copy every finished run's records from ``runs_dir`` to ``dest``; returns (kept, left out)
    as run folders relative to ``runs_dir``, the left-out ones with the reason."""
    kept, left_out = [], []
    for run in find_runs(runs_dir):
        rel = os.path.relpath(run.dir, runs_dir)
        if run.summary is None:
            left_out.append(f"{rel}: {run.problem}")
            continue
        missing = [name for name in RUN_RECORDS if not os.path.isfile(os.path.join(run.dir, name))]
        if missing:  # e.g. eval.jsonl deleted by hand: a record without its curve would mislead
            left_out.append(f"{rel}: finished, but {', '.join(missing)} missing")
            continue
        os.makedirs(os.path.join(dest, rel), exist_ok=True)
        for name in RUN_RECORDS:
            shutil.copyfile(os.path.join(run.dir, name), os.path.join(dest, rel, name))
        job_dir = os.path.dirname(run.dir)
        if os.path.relpath(job_dir, runs_dir) != "." and os.path.isfile(os.path.join(job_dir, JOB_RECORD)):
            shutil.copyfile(os.path.join(job_dir, JOB_RECORD), os.path.join(dest, os.path.dirname(rel), JOB_RECORD))
        kept.append(rel)
    return kept, left_out


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", help="the runs folder (a matrix's --runs-dir, or a script's)")
    parser.add_argument("dest", help="where the records go, e.g. results/<name>")
    opts = parser.parse_args(argv)
    if not os.path.isdir(opts.runs_dir):
        fail(f"runs folder '{opts.runs_dir}' does not exist; give the folder the runs were written to")
    source, dest = os.path.realpath(opts.runs_dir), os.path.realpath(opts.dest)
    if dest == source or dest.startswith(source + os.sep):
        # a second call would find the copies as runs and copy them into themselves
        fail(f"the destination '{opts.dest}' is inside the runs folder; give a folder outside it, e.g. "
             "results/<name>")
    try:
        kept, left_out = keep_records(opts.runs_dir, opts.dest)
    except OSError as err:
        fail(f"cannot write the records to '{opts.dest}' ({err.strerror}); give a writable folder")
    if not kept and not left_out:
        fail(f"no run directories (with an args.json) under '{opts.runs_dir}'; give the folder the runs were "
             "written to")
    for line in left_out:
        print(f"left out {line}")
    print(f"kept the records of {len(kept)} finished runs in {opts.dest} ({len(left_out)} left out)")


if __name__ == "__main__":
    main()
