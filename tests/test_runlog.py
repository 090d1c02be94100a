"""Run directories: runs never share a directory."""

from __future__ import annotations

import json

from shared import runlog
from tests.conftest import load_script


def test_two_runs_started_in_the_same_second_get_separate_directories(tmp_path, monkeypatch):
    """Same env-id, algo and seed started within one second (e.g. two leave-one-out runs with
    different --holdout-task launched together) must not write into one directory: the second
    would overwrite the first's args.json and append to its eval.jsonl."""
    monkeypatch.setattr(runlog.time, "strftime", lambda fmt, *a: "20260101-000000")  # the same second
    Args = load_script("ppo_mtl_embed").Args
    first = runlog.RunLogger(Args(env_id="cartpole-mt", holdout_task="long-pole"), "ppo_mtl_embed",
                             ("standard",), str(tmp_path))
    second = runlog.RunLogger(Args(env_id="cartpole-mt", holdout_task="heavy-pole"), "ppo_mtl_embed",
                              ("standard",), str(tmp_path))
    first.close()
    second.close()
    assert json.loads((tmp_path / first.run_name / "args.json").read_text())["holdout_task"] == "long-pole"
    assert first.dir != second.dir, f"both runs write into {first.dir}"
