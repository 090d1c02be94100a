"""Every script, through main() on a two-task CartPole suite: two runs with one seed are
bit-identical (parameters, optimiser, normalisers, eval.jsonl numbers, summary); another seed
gives other parameters; each run directory holds exactly what a correct short run must show; and
the evaluation pass with sampled actions (--eval-sampled, on by default) leaves training untouched.

Budget: 3 iterations of 2 tasks x 2 envs x 16 steps (64 env steps each), evaluations every 128
steps: after iteration 2 (step 128), after the last iteration (192) and the final one (192).
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import ALGOS, load_script

SCRIPTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(str(ALGOS / "ppo_*.py")))
TASKS = ["standard", "long-pole"]
TOTAL, EVERY = 192, 128
NOT_REPRODUCIBLE = {"wall_time", "wall_time_s", "perf", "peak_memory_mb"}  # clocks and memory
SUMMARY_KEYS = {"algo", "device", "final_episodes_per_task", "final_return", "final_success_rate", "global_step",
                "parameter_counts", "peak_memory_mb", "per_task", "perf", "sampled", "task_names", "wall_time_s"}
METHOD_SUMMARY_KEYS = {"ppo_varshare": {"residual_ratios"}}  # what a method adds to summary.json
EVAL_KEYS = {"label", "global_step", "wall_time", "final", "episodes_per_task", "success_rate", "return", "per_task",
             "passes"}


def run(script: str, seed: int, runs_dir: Path, eval_sampled: bool = True) -> Path:
    module = load_script(script)
    args = module.Args(env_id="cartpole-mt", tasks=TASKS, seed=seed, total_timesteps=TOTAL, num_envs_per_task=2,
                       num_steps=16, num_minibatches=2, update_epochs=2, hidden_sizes=(8, 8), eval_every=EVERY,
                       eval_episodes=1, final_eval_episodes=2, runs_dir=str(runs_dir), cuda=False,
                       eval_sampled=eval_sampled)
    module.main(args)
    (run_dir,) = runs_dir.iterdir()
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per script: run directories of seed 1, seed 1 again, seed 2, and seed 1 with --no-eval-sampled."""
    root = tmp_path_factory.mktemp("determinism")
    return {script: [run(script, seed, root / f"{script}-{i}", eval_sampled=i < 3)
                     for i, seed in enumerate((1, 1, 2, 1))]
            for script in SCRIPTS}


def reproducible(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in NOT_REPRODUCIBLE}


def eval_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)


def assert_same_tree(a, b, where: str) -> None:
    """Equal down to the bit: tensors and arrays element by element, everything else by ==."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif hasattr(a, "shape"):  # numpy
        assert a.shape == b.shape and (a == b).all(), where
    else:
        assert a == b, where


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_runs_with_one_seed_are_bit_identical(runs, script):
    first, second, *_ = runs[script]
    a, b = checkpoint(first), checkpoint(second)
    for part in ("agent", "optimizer", "obs_normalizer", "reward_scaler", "global_step"):
        assert_same_tree(a[part], b[part], part)
    assert [reproducible(line) for line in eval_lines(first)] == [reproducible(line) for line in eval_lines(second)]
    summaries = [json.loads((d / "summary.json").read_text()) for d in (first, second)]
    assert reproducible(summaries[0]) == reproducible(summaries[1])


@pytest.mark.parametrize("script", SCRIPTS)
def test_another_seed_gives_other_parameters_and_observations(runs, script):
    first, _, other, _ = runs[script]
    a, b = checkpoint(first), checkpoint(other)
    assert any(not torch.equal(a["agent"][name], b["agent"][name]) for name in a["agent"])
    assert (a["obs_normalizer"]["rms"]["mean"] != b["obs_normalizer"]["rms"]["mean"]).all()


@pytest.mark.parametrize("script", SCRIPTS)
def test_run_directory_holds_what_a_short_run_must_show(runs, script):
    run_dir = runs[script][0]
    names = sorted(p.name for p in run_dir.iterdir())
    assert names[:3] == ["args.json", "checkpoint.pt", "eval.jsonl"] and names[4] == "summary.json", names
    assert len(names) == 5 and names[3].startswith("events.out.tfevents."), names

    args = json.loads((run_dir / "args.json").read_text())
    assert args["algo"] == script and args["task_names"] == TASKS and args["seed"] == 1
    assert (args["total_timesteps"], args["num_envs_per_task"], args["num_steps"]) == (TOTAL, 2, 16)
    # flags left unset took the suite table's values
    assert (args["learning_rate"], args["gamma"], args["gae_lambda"], args["clip_coef"], args["anneal_lr"]) == (
        1e-3, 0.99, 0.95, 0.2, True)

    lines = eval_lines(run_dir)
    # each evaluation, then its pass with sampled actions
    assert [(line["global_step"], line["final"], line["episodes_per_task"], line["label"]) for line in lines] == [
        (128, False, 1, ""), (128, False, 1, "sampled"), (192, False, 1, ""), (192, False, 1, "sampled"),
        (192, True, 2, ""), (192, True, 2, "sampled")]
    for line in lines:
        if line["label"] == "":
            assert set(line) == EVAL_KEYS and line["passes"] == 1
        else:
            assert set(line) == EVAL_KEYS - {"passes"}
        assert list(line["per_task"]) == TASKS
        n = line["episodes_per_task"]
        for result in line["per_task"].values():
            # CartPole pays 1 per step and lasts 8 to 500 steps: n episodes sum to a whole number in
            # [8n, 500n]; success is a return of 475, which the best episode reaches only if the
            # others leave it room.
            total = result["return"] * n
            assert total == int(total) and 8 * n <= total <= 500 * n, result
            assert result["success_rate"] * n == int(result["success_rate"] * n)
            if total - 8 * (n - 1) < 475:
                assert result["success_rate"] == 0.0, result
            if n == 1 and total >= 475:
                assert result["success_rate"] == 1.0, result
        assert line["return"] == pytest.approx(sum(r["return"] for r in line["per_task"].values()) / 2)
        assert line["success_rate"] == pytest.approx(sum(r["success_rate"] for r in line["per_task"].values()) / 2)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS | METHOD_SUMMARY_KEYS.get(script, set())
    assert summary["algo"] == script and summary["global_step"] == TOTAL and summary["task_names"] == TASKS
    assert summary["per_task"] == lines[-2]["per_task"] and summary["final_episodes_per_task"] == 2
    assert (summary["final_return"], summary["final_success_rate"]) == (lines[-2]["return"], lines[-2]["success_rate"])
    assert summary["sampled"] == {"final_success_rate": lines[-1]["success_rate"], "final_return": lines[-1]["return"],
                                  "per_task": lines[-1]["per_task"]}
    assert summary["perf"]["iterations_measured"] == 2  # three iterations, the first one skipped as warm-up

    state = checkpoint(run_dir)
    assert state["global_step"] == TOTAL
    assert set(state) == {"agent", "optimizer", "obs_normalizer", "reward_scaler", "global_step", "rng", "extra"}
    assert state["extra"]["algo"] == script and state["extra"]["task_names"] == tuple(TASKS)
    assert (state["extra"]["iteration"], state["extra"]["next_eval"]) == (3, 256)  # what --resume continues from
    # every rollout observation was counted once: reset + 3 x 16 steps of 4 envs (the oracle keeps
    # one count per task, of its own 2 envs)
    rows_counted = (1 + 3 * 16) * (2 if script == "ppo_single" else 4)
    assert state["obs_normalizer"]["rms"]["count"] == pytest.approx(1e-4 + rows_counted)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_sampled_evaluation_pass_leaves_training_untouched(runs, script):
    """--no-eval-sampled drops the sampled pass and nothing else: parameters, optimiser, normalisers
    and the deterministic evaluations are bit-identical (the pass draws from an RNG of its own)."""
    with_pass, without = runs[script][0], runs[script][3]
    a, b = checkpoint(with_pass), checkpoint(without)
    for part in ("agent", "optimizer", "obs_normalizer", "reward_scaler", "global_step", "rng"):
        assert_same_tree(a[part], b[part], part)
    deterministic = [reproducible(line) for line in eval_lines(with_pass) if line["label"] == ""]
    assert deterministic == [reproducible(line) for line in eval_lines(without)]
    assert "sampled" not in json.loads((without / "summary.json").read_text())


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_sampled_pass_samples(runs, script):
    """Both passes of an evaluation start from the same seeded CartPole states, so a pass that
    secretly acted with the mode would repeat the deterministic returns exactly."""
    lines = eval_lines(runs[script][0])
    pairs = [(lines[i], lines[i + 1]) for i in range(0, len(lines), 2)]
    assert all(s["label"] == "sampled" and s["global_step"] == d["global_step"] for d, s in pairs)
    assert any(d["per_task"] != s["per_task"] for d, s in pairs), pairs
