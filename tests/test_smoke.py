"""CleanRL-style smoke runs: each script end to end through subprocess with a tiny budget, then the
run directory is checked (PROTOCOL section 6). Runs go two at a time, longest first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared.params import mlp_count
from tests.conftest import ScriptRuns, describe, selected_test_names, subprocess_env, wandb_run_and_summary

TINY_CARTPOLE = ["--num-steps", "32", "--num-minibatches", "2", "--update-epochs", "1", "--hidden-sizes", "8", "8",
                 "--eval-episodes", "1", "--final-eval-episodes", "1"]
TINY_METAWORLD = ["--num-envs-per-task", "1", "--num-minibatches", "2", "--update-epochs", "1",
                  "--eval-episodes", "1", "--final-eval-episodes", "1"]
CARTPOLE_MT_TASKS = ["standard", "long-pole", "heavy-pole", "heavy-cart", "low-gravity-weak-push"]

# name: script, env_id, extra argv, total_timesteps, eval_every, task names, env vars
RUNS = {
    "test_ppo_mtl_embed_on_mt3": (
        "ppo_mtl_embed", "mt3", TINY_METAWORLD + ["--num-steps", "50"], 150, 150,
        ["reach-v3", "push-v3", "pick-place-v3"], {}),
    "test_ppo_single_on_reach": (
        "ppo_single", "reach-v3", TINY_METAWORLD + ["--num-steps", "100"], 200, 200, ["reach-v3"], {}),
    "test_tracked_run_works_with_wandb_offline": (
        "ppo_single", "CartPole-v1", TINY_CARTPOLE + ["--num-envs-per-task", "2", "--track"], 64, 64,
        ["CartPole-v1"], {"WANDB_MODE": "offline"}),
    "test_ppo_single_on_cartpole": (
        "ppo_single", "CartPole-v1", TINY_CARTPOLE + ["--num-envs-per-task", "2"], 128, 64, ["CartPole-v1"], {}),
    "test_ppo_single_on_cartpole_mt": (
        "ppo_single", "cartpole-mt", TINY_CARTPOLE + ["--num-envs-per-task", "1"], 320, 320, CARTPOLE_MT_TASKS, {}),
    "test_ppo_mtl_embed_on_cartpole_mt": (
        "ppo_mtl_embed", "cartpole-mt", TINY_CARTPOLE + ["--num-envs-per-task", "1"], 320, 160,
        CARTPOLE_MT_TASKS, {}),
}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    wanted = selected_test_names(request)
    jobs, dirs = {}, {}
    for name, (script, env_id, extra, total, every, _, env) in RUNS.items():
        if name not in wanted:
            continue
        root = tmp_path_factory.mktemp(name.removeprefix("test_"))
        dirs[name] = root / "runs"
        argv = ["--env-id", env_id, "--total-timesteps", str(total), "--eval-every", str(every),
                "--runs-dir", str(dirs[name]), *extra]
        jobs[name] = dict(script=script, argv=argv, env=subprocess_env(**env, WANDB_DIR=str(root)))
    pool = ScriptRuns(jobs)
    yield pool, dirs
    pool.close()


SUMMARY_KEYS = {"algo", "device", "final_episodes_per_task", "final_return", "final_success_rate", "global_step",
                "parameter_counts", "peak_memory_mb", "per_task", "perf", "sampled", "task_names", "wall_time_s"}
EVAL_KEYS = {"label", "global_step", "wall_time", "final", "episodes_per_task", "success_rate", "return", "per_task",
             "passes"}


def check_one_episode_result(env_id: str, result: dict) -> None:
    """What one evaluation episode can give: CartPole pays 1 per step for 8 to 500 steps and
    succeeds at 475; a Meta-World v2 reward lies in [0, 10] per step of at most 500, and success
    is the env's flag (0 or 1)."""
    ret, success = result["return"], result["success_rate"]
    if env_id.startswith("mt") or env_id.endswith("-v3"):
        assert 0.0 <= ret <= 10.0 * 500 and success in (0.0, 1.0), result
    else:
        assert ret == int(ret) and 8 <= ret <= 500 and success == float(ret >= 475), result


def finished_run(runs, name: str) -> Path:
    """Wait for the run, check the shared run-directory contract, return the run directory."""
    pool, dirs = runs
    script, env_id, extra, total, every, task_names, _ = RUNS[name]
    proc = pool.result(name)
    assert proc.returncode == 0, describe(proc)
    run_dirs = list(dirs[name].iterdir())
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    assert run_dir.name.startswith(f"{env_id}__{script}__1__"), run_dir.name
    files = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("events.out.tfevents."))
    tracked = ["wandb"] if "--track" in extra else []
    assert files == sorted(["args.json", "checkpoint.pt", "eval.jsonl", "summary.json", *tracked]), files

    args = json.loads((run_dir / "args.json").read_text())
    assert args["env_id"] == env_id and args["algo"] == script
    assert args["total_timesteps"] == total and args["task_names"] == task_names
    assert args["num_steps"] == int(extra[extra.index("--num-steps") + 1])
    assert all(args[field] is not None for field in ("num_envs_per_task", "learning_rate", "gamma", "hidden_sizes"))

    lines = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    # every evaluation is followed by its pass with sampled actions (--eval-sampled)
    sampled, lines = lines[1::2], lines[0::2]
    periodic = list(range(every, total + 1, every))
    assert [line["global_step"] for line in lines] == periodic + [total]
    assert [line["final"] for line in lines] == [False] * len(periodic) + [True]
    assert [(line["label"], line["global_step"], line["final"]) for line in sampled] == [
        ("sampled", line["global_step"], line["final"]) for line in lines]
    for line in lines + sampled:
        assert set(line) == (EVAL_KEYS if line in lines else EVAL_KEYS - {"passes"})
        assert list(line["per_task"]) == task_names
        for result in line["per_task"].values():
            check_one_episode_result(env_id, result)
        assert line["episodes_per_task"] == 1
        per_task = line["per_task"].values()
        assert line["return"] == pytest.approx(sum(r["return"] for r in per_task) / len(task_names))
        assert line["success_rate"] == pytest.approx(sum(r["success_rate"] for r in per_task) / len(task_names))

    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    counts = summary["parameter_counts"]
    assert set(counts) == {"total", "active", "trained_per_task"}
    assert summary["global_step"] == total
    assert summary["per_task"] == lines[-1]["per_task"]
    assert (summary["final_return"], summary["final_success_rate"]) == (lines[-1]["return"], lines[-1]["success_rate"])
    assert summary["final_episodes_per_task"] == 1
    assert summary["sampled"]["per_task"] == sampled[-1]["per_task"]

    events = list(run_dir.glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0

    checkpoint = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == total
    assert set(checkpoint) == {"agent", "optimizer", "obs_normalizer", "reward_scaler", "global_step", "rng", "extra"}
    return run_dir


def counts_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())["parameter_counts"]


def test_ppo_single_on_cartpole(runs):
    run_dir = finished_run(runs, "test_ppo_single_on_cartpole")
    one = mlp_count([4, 8, 8, 2]) + mlp_count([4, 8, 8, 1])  # 130 + 121
    assert counts_of(run_dir) == {"total": one, "active": one, "trained_per_task": one} == {
        "total": 251, "active": 251, "trained_per_task": 251}
    # CleanRL's metric names are in the tensorboard file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ["charts/SPS", "losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl",
                "losses/clipfrac", "losses/explained_variance", "eval/success_rate",
                "eval/CartPole-v1/success_rate", "eval/CartPole-v1/return", "perf/env_time",
                "perf/inference_time", "perf/update_time"]:
        assert tag in tags, f"{tag} not logged; have {sorted(tags)}"
    assert [e.step for e in acc.Scalars("charts/SPS")] == [64, 128]  # one point per iteration
    assert [e.step for e in acc.Scalars("eval/success_rate")] == [64, 128, 128]  # two evaluations, then the final
    assert [e.step for e in acc.Scalars("eval_sampled/success_rate")] == [64, 128, 128]  # their sampled passes


def test_ppo_single_on_cartpole_mt(runs):
    run_dir = finished_run(runs, "test_ppo_single_on_cartpole_mt")
    one = mlp_count([4, 8, 8, 2]) + mlp_count([4, 8, 8, 1])  # five independent agents of 251 each
    assert counts_of(run_dir) == {"total": 5 * one, "active": one, "trained_per_task": one}


def test_ppo_single_on_reach(runs):
    run_dir = finished_run(runs, "test_ppo_single_on_reach")
    one = mlp_count([39, 256, 256, 4]) + mlp_count([39, 256, 256, 1]) + 4  # + log-std
    assert counts_of(run_dir) == {"total": one, "active": one, "trained_per_task": one} == {
        "total": 153353, "active": 153353, "trained_per_task": 153353}


def test_ppo_mtl_embed_on_cartpole_mt(runs):
    run_dir = finished_run(runs, "test_ppo_mtl_embed_on_cartpole_mt")
    total = mlp_count([4 + 5, 8, 8, 2]) + mlp_count([4 + 5, 8, 8, 1])  # one-hot of 5 tasks in the input
    # one task's data reaches only its own one-hot column of the two first layers; at inference
    # that column folds into the bias too
    assert counts_of(run_dir) == {"total": total, "active": total - 5 * 16, "trained_per_task": total - 4 * 16}
    assert total == 331


def test_ppo_mtl_embed_on_mt3(runs):
    run_dir = finished_run(runs, "test_ppo_mtl_embed_on_mt3")
    total = mlp_count([39 + 3, 256, 256, 4]) + mlp_count([39 + 3, 256, 256, 1]) + 3 * 4
    assert total == 154897
    trained = total - 2 * (256 + 256) - 2 * 4
    active = trained - (256 + 256)  # the task's own one-hot columns fold into the biases
    assert active == mlp_count([39, 256, 256, 4]) + mlp_count([39, 256, 256, 1]) + 4  # the oracle's network
    assert counts_of(run_dir) == {"total": total, "active": active, "trained_per_task": trained}


def test_tracked_run_works_with_wandb_offline(runs):
    run_dir = finished_run(runs, "test_tracked_run_works_with_wandb_offline")
    pool, _ = runs
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline, "no wandb offline run was written"
    assert list(offline[0].glob("run-*.wandb")), "the offline run holds no .wandb log"
    assert "Traceback" not in pool.result("test_tracked_run_works_with_wandb_offline").stderr
    # group = the report's row (suite, method, variant), job type, tags, and summary.json's numbers
    run, summary = wandb_run_and_summary(next(offline[0].glob("run-*.wandb")))
    assert (run.run_group, run.job_type, list(run.tags)) == (
        "CartPole-v1__ppo_single", "train", ["CartPole-v1", "ppo_single", "seed-1"])
    expected = json.loads((run_dir / "summary.json").read_text())
    assert summary["params/total"] == summary["params/active"] == summary["params/trained_per_task"] == 251
    assert summary["final/return"] == pytest.approx(expected["final_return"])
    task = expected["per_task"]["CartPole-v1"]
    assert summary["final/CartPole-v1/success_rate"] == pytest.approx(task["success_rate"])
    assert summary["final_sampled/success_rate"] == pytest.approx(expected["sampled"]["final_success_rate"])
    assert summary["global_step"] == 64
