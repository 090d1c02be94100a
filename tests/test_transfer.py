"""Leave-one-out transfer (--init-from, --transfer): neutral starts, frozen shared parameters,
the zero-shot line, and one-sentence refusals of bad input (shared/transfer.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import tyro

from shared.cli import UsageError
from shared.suites import apply_suite_defaults, make_suite, select_tasks
from shared.transfer import load_shared
from tests.conftest import load_script, run_script

MULTITASK = ["ppo_mtl_embed", "ppo_pcgrad", "ppo_paco", "ppo_softmod", "ppo_varshare"]
SUITE, HELD_OUT = "cartpole-conflict", "standard-inverted"
SMALL = ["--hidden-sizes", "16", "--update-epochs", "2", "--eval-episodes", "1", "--final-eval-episodes", "1"]
BASE_STEPS = 2 * 4 * 4 * 128  # two iterations of 4 tasks x 4 envs x 128 steps
TRANSFER_STEPS = 2 * 4 * 128  # two iterations of the new task alone


def run(name: str, argv: list[str]):
    module = load_script(name)
    args = tyro.cli(module.Args, args=argv)
    module.main(args)
    return args


def only_run(path):
    (run_dir,) = [p for p in path.iterdir() if p.is_dir()]
    return run_dir


@pytest.fixture(scope="module")
def base_runs(tmp_path_factory):
    """One base run per multi-task script on cartpole-conflict without standard-inverted."""
    root = tmp_path_factory.mktemp("base")
    runs = {}
    for name in MULTITASK:
        run(name, ["--env-id", SUITE, "--holdout-task", HELD_OUT, "--total-timesteps", str(BASE_STEPS),
                   "--eval-every", str(BASE_STEPS), "--runs-dir", str(root / name), *SMALL])
        runs[name] = only_run(root / name)
    return runs


def transfer(name, base_dir, regime, runs_dir, *extra):
    return run(name, ["--env-id", SUITE, "--init-from", str(base_dir), "--transfer", regime,
                      "--total-timesteps", str(TRANSFER_STEPS), "--eval-every", str(TRANSFER_STEPS // 2),
                      "--runs-dir", str(runs_dir), "--update-epochs", "2", "--eval-episodes", "1",
                      "--final-eval-episodes", "1", *extra])


def checkpoint(run_dir) -> dict:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)


def own_entries(name: str, base_dir, *extra: str) -> dict:
    """The new task's own entries of a transfer agent, from the script's own rule."""
    module = load_script(name)
    args = tyro.cli(module.Args, args=["--env-id", SUITE, "--tasks", HELD_OUT, "--hidden-sizes", "16",
                                       "--init-from", str(base_dir), *extra])
    suite = make_suite(SUITE)
    apply_suite_defaults(args, suite)
    agent = module.make_agent(args, module.select_run_tasks(args, suite), 4, 2, True)  # CartPole: 4 obs, 2 actions
    return agent, module.transfer_weights(args, agent, checkpoint(base_dir)["agent"])


@pytest.mark.parametrize("name", MULTITASK)
def test_task_params_trains_only_the_new_tasks_own_entries(name, base_runs, tmp_path):
    transfer(name, base_runs[name], "task-params", tmp_path)
    run_dir = only_run(tmp_path)
    base, after = checkpoint(base_runs[name])["agent"], checkpoint(run_dir)
    _, own = own_entries(name, base_runs[name])
    changed_own = 0
    for key, value in after["agent"].items():
        spec = own.get(key)
        if spec is None:  # shared: exactly the base run's tensor
            assert torch.equal(value, base[key]), f"{name}: shared '{key}' moved under task-params"
        elif spec is True:
            changed_own += 1
        else:  # shared MTL's first layers: the observation columns are shared, the task column is own
            assert torch.equal(value[~spec].view(value.shape[0], -1),
                               base[key][:, :value.shape[1] - 1]), f"{name}: observation columns of '{key}' moved"
            changed_own += 1
    assert changed_own > 0
    # Adam holds state only for the parameters that train (frozen ones never get a gradient).
    trainable = sum(1 for key in after["agent"] if key in own)
    assert len(after["optimizer"]["state"]) == trainable
    lines = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert lines[0]["label"] == "zero-shot" and lines[0]["global_step"] == 0
    assert [line["global_step"] for line in lines[1:] if not line["label"]] == [
        TRANSFER_STEPS // 2, TRANSFER_STEPS, TRANSFER_STEPS]
    # the sampled pass follows the unlabelled evaluations only, never the zero-shot one
    assert [line["global_step"] for line in lines if line["label"] == "sampled"] == [
        TRANSFER_STEPS // 2, TRANSFER_STEPS, TRANSFER_STEPS]
    args = json.loads((run_dir / "args.json").read_text())
    assert args["task_names"] == [HELD_OUT] and args["transfer"] == "task-params"


@pytest.mark.parametrize("name", MULTITASK)
def test_finetune_starts_from_the_base_and_trains_the_shared_weights(name, base_runs, tmp_path):
    transfer(name, base_runs[name], "finetune", tmp_path)
    base, after = checkpoint(base_runs[name])["agent"], checkpoint(only_run(tmp_path))["agent"]
    _, own = own_entries(name, base_runs[name])
    shared = [key for key in after if key not in own and after[key].is_floating_point()]
    assert shared and any(not torch.equal(after[key], base[key]) for key in shared)


@pytest.mark.parametrize("name", MULTITASK)
def test_the_new_task_starts_neutral(name, base_runs):
    base = checkpoint(base_runs[name])["agent"]
    agent, own = own_entries(name, base_runs[name])
    state = agent.state_dict()
    for key, value in state.items():
        if key not in own:
            assert torch.equal(value, base[key]), f"{name}: '{key}' is not the base run's"
    if name == "ppo_varshare":  # mu = 0: the zero-shot policy is the shared theta
        mus = [key for key in own if key.endswith(".mu")]
        assert mus and all(torch.count_nonzero(state[key]) == 0 for key in mus)
    if name == "ppo_paco":  # the mean of the trained task vectors
        assert torch.allclose(state["w"], base["w"].mean(0, keepdim=True))
    if name in ("ppo_mtl_embed", "ppo_pcgrad"):
        for key in ("actor.0.weight", "critic.0.weight"):
            assert torch.equal(state[key][:, :-1], base[key][:, :4])  # CartPole: 4 observation columns
            assert own[key][:, -1].all() and not own[key][:, :-1].any()


def test_softmod_can_start_the_new_embedding_row_at_the_mean_of_the_trained_rows(base_runs, tmp_path):
    base_dir = base_runs["ppo_softmod"]
    base = checkpoint(base_dir)["agent"]
    fresh, _ = own_entries("ppo_softmod", base_dir)
    agent, own = own_entries("ppo_softmod", base_dir, "--transfer-embedding", "mean")
    for net in ("actor", "critic"):
        key = f"{net}.task_weight"
        assert key in own
        assert torch.allclose(agent.state_dict()[key], base[key].mean(0, keepdim=True))
        assert not torch.allclose(fresh.state_dict()[key], base[key].mean(0, keepdim=True))
    with pytest.raises(UsageError, match="--transfer-embedding says where"):
        run("ppo_softmod", ["--env-id", SUITE, "--transfer-embedding", "mean", "--runs-dir", str(tmp_path)])


@pytest.mark.parametrize(("argv", "message"), [
    (["--transfer", "finetune"], "--transfer needs --init-from"),
    (["--init-from", "BASE"], "--init-from needs --transfer"),
    (["--init-from", "BASE", "--transfer", "finetune", "--tasks", "standard"], "already trained on 'standard'"),
    (["--init-from", "BASE", "--transfer", "finetune", "--hidden-sizes", "32"], "differs from the base run's"),
    (["--init-from", "BASE", "--transfer", "finetune", "--holdout-task", "standard"], "--holdout-task is for"),
])
def test_bad_transfer_flags_get_one_sentence(argv, message, base_runs, tmp_path):
    argv = [str(base_runs["ppo_varshare"]) if a == "BASE" else a for a in argv]
    with pytest.raises(UsageError, match=message):
        run("ppo_varshare", ["--env-id", SUITE, "--runs-dir", str(tmp_path), *argv])


def test_the_task_blind_control_has_no_transfer(base_runs):
    with pytest.raises(UsageError, match="--task-encoding none is a task-blind control"):
        own_entries("ppo_mtl_embed", base_runs["ppo_mtl_embed"], "--task-encoding", "none")


def test_refuses_another_method_suite_or_a_script_that_shares_nothing(base_runs, tmp_path):
    base = str(base_runs["ppo_varshare"])
    with pytest.raises(UsageError, match="that run is ppo_varshare, not ppo_paco"):
        run("ppo_paco", ["--env-id", SUITE, "--init-from", base, "--transfer", "finetune"])
    with pytest.raises(UsageError, match="on suite 'cartpole-conflict'"):
        run("ppo_varshare", ["--env-id", "cartpole-mt", "--init-from", base, "--transfer", "finetune"])
    with pytest.raises(UsageError, match="no args.json there"):
        run("ppo_varshare", ["--env-id", SUITE, "--init-from", str(tmp_path), "--transfer", "finetune"])
    unfinished = tmp_path / "unfinished"
    shutil.copytree(base, unfinished)
    (unfinished / "summary.json").unlink()
    with pytest.raises(UsageError, match="that run has not finished"):
        run("ppo_varshare", ["--env-id", SUITE, "--init-from", str(unfinished), "--transfer", "finetune",
                             "--runs-dir", str(tmp_path / "runs")])
    result = run_script("ppo_single", ["--env-id", SUITE, "--init-from", base, "--transfer", "finetune",
                                       "--runs-dir", str(tmp_path)])
    assert result.returncode == 2 and "shares no parameters between tasks" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_varshare_transfer_under_another_prior_is_refused(base_runs, tmp_path):
    base = str(base_runs["ppo_varshare"])
    for flags in (["--beta", "2"], ["--sigma-prior-gain", "0.12"]):
        with pytest.raises(UsageError, match="that run's prior .* differs from this run's"):
            run("ppo_varshare", ["--env-id", SUITE, "--init-from", base, "--transfer", "finetune",
                                 "--runs-dir", str(tmp_path), *flags])
    # the toy base took the gradient step (its suite's default); the prox step would train the new
    # task's residual under another update rule than the one theta was trained beside
    with pytest.raises(UsageError, match="that run's prior step is gradient, this run's prox; pass --prior-step "
                                         "gradient"):
        run("ppo_varshare", ["--env-id", SUITE, "--init-from", base, "--transfer", "finetune",
                             "--runs-dir", str(tmp_path), "--prior-step", "prox"])


def test_a_varshare_transfer_with_another_task_input_is_refused(base_runs, tmp_path):
    with pytest.raises(UsageError, match="that run has --task-input none, this one --task-input onehot"):
        run("ppo_varshare", ["--env-id", SUITE, "--init-from", str(base_runs["ppo_varshare"]), "--transfer",
                             "finetune", "--runs-dir", str(tmp_path), "--task-input", "onehot"])


def test_a_transfer_with_another_residual_kind_or_l2_lambda_is_refused(base_runs, tmp_path):
    base = base_runs["ppo_varshare"]
    with pytest.raises(UsageError, match="that run has --residual variational, this one --residual l2"):
        run("ppo_varshare", ["--env-id", SUITE, "--init-from", str(base), "--transfer", "finetune",
                             "--runs-dir", str(tmp_path), "--residual", "l2"])
    # an L2Soft base (its args.json, which is all the check reads) whose lambda was 5 on every layer
    l2_base = tmp_path / "l2-base"
    shutil.copytree(base, l2_base)
    recorded = json.loads((l2_base / "args.json").read_text())
    recorded.update(residual="l2", l2_lambda_per_layer={name: 5.0 for name in recorded["sigma_prior_per_layer"]})
    (l2_base / "args.json").write_text(json.dumps(recorded))
    with pytest.raises(UsageError, match="l2_lambda_per_layer"):
        run("ppo_varshare", ["--env-id", SUITE, "--init-from", str(l2_base), "--transfer", "finetune",
                             "--runs-dir", str(tmp_path / "runs"), "--residual", "l2"])
    run("ppo_varshare", ["--env-id", SUITE, "--init-from", str(l2_base), "--transfer", "finetune",
                         "--runs-dir", str(tmp_path / "runs"), "--residual", "l2", "--l2-lambda", "5",
                         "--total-timesteps", str(TRANSFER_STEPS), "--eval-every", str(TRANSFER_STEPS),
                         "--update-epochs", "1", "--eval-episodes", "1", "--final-eval-episodes", "1"])


def test_a_base_of_another_width_is_refused_with_the_parameter_named(base_runs, tmp_path):
    # The width check of args.json can be passed by hand-editing; the tensors themselves are checked too.
    module = load_script("ppo_varshare")
    args = tyro.cli(module.Args, args=["--env-id", SUITE, "--tasks", HELD_OUT, "--hidden-sizes", "32"])
    suite = make_suite(SUITE)
    apply_suite_defaults(args, suite)
    agent = module.make_agent(args, select_tasks(suite, [HELD_OUT], None), 4, 2, True)
    with pytest.raises(UsageError, match=r"theta. is \[4, 16\] in the base run and \[4, 32\] here"):
        load_shared(agent, checkpoint(base_runs["ppo_varshare"])["agent"])


def test_a_resumed_transfer_run_keeps_one_zero_shot_line_and_its_frozen_weights(base_runs, tmp_path, monkeypatch):
    """Resume from a checkpoint written mid-run: the zero-shot evaluation is not redone, and the
    shared weights stay frozen in the resumed part (the freeze is rebuilt from the base run)."""
    name = "ppo_varshare"
    module = load_script(name)
    iteration = 4 * 128
    saved = module.save_checkpoint

    def keep_mid_run_copy(path, *args, **kwargs):
        saved(path, *args, **kwargs)
        if args[4] == 2 * iteration:  # global_step
            shutil.copy(path, path + ".mid")

    monkeypatch.setattr(module, "save_checkpoint", keep_mid_run_copy)
    run(name, ["--env-id", SUITE, "--init-from", str(base_runs[name]), "--transfer", "task-params",
               "--total-timesteps", str(4 * iteration), "--eval-every", str(iteration), "--update-epochs", "2",
               "--eval-episodes", "1", "--final-eval-episodes", "1", "--runs-dir", str(tmp_path)])
    monkeypatch.setattr(module, "save_checkpoint", saved)
    run_dir = only_run(tmp_path)
    shutil.move(run_dir / "checkpoint.pt.mid", run_dir / "checkpoint.pt")
    (run_dir / "summary.json").unlink()
    run(name, ["--resume", str(run_dir)])
    lines = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [line.get("label") for line in lines].count("zero-shot") == 1
    assert [line["global_step"] for line in lines if line["label"] != "sampled"] == [
        0, iteration, 2 * iteration, 3 * iteration, 4 * iteration, 4 * iteration]
    base, after = checkpoint(base_runs[name])["agent"], checkpoint(run_dir)
    assert after["global_step"] == 4 * iteration
    _, own = own_entries(name, base_runs[name])
    for key, value in after["agent"].items():
        if key not in own:
            assert torch.equal(value, base[key]), f"shared '{key}' moved after the resume"
