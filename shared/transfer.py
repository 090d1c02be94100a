"""Leave-one-out transfer (PROTOCOL section 7): start a run on a held-out task from a base run.

A base run trains a multi-task script on T-1 tasks of a suite (``--holdout-task k``). A transfer
run of the same script then learns task k alone, for its own budget:

    python algos/ppo_varshare.py --env-id cartpole-conflict --init-from BASE_RUN_DIR --transfer finetune

- ``--transfer finetune``: every parameter trains; ``task-params``: only the new task's own
  parameters train (each script's ``transfer_weights`` says which those are), the shared ones are
  frozen: no gradient, so Adam never touches them and they stay bit-identical.
- The transfer run's agent is the script's one-task agent. Its shared parameters are the base
  run's; the new task's own parameters keep the value a fresh agent gives them (the script's
  neutral start: VarShare mu = 0, PaCo the mean of the trained task vectors, ...).
- ``--tasks`` defaults to the base run's held-out task; ``--hidden-sizes`` to the base run's.
- The shared observation normaliser carries over from the base checkpoint and keeps updating; the
  reward scaler, whose statistics are per task, starts afresh for the new task.
- The first line of the run's eval.jsonl is the zero-shot evaluation (label ``zero-shot``, step 0),
  before any update.

Bad input (another method's run, another suite, a task the base trained on, another width, a
base run that has not finished or has no checkpoint) gets one sentence and exit code 2.
"""

from __future__ import annotations

import json
import os

import torch

from shared.cli import UsageError
from shared.params import is_per_task


def base_run_args(run_dir: str) -> dict:
    path = os.path.join(run_dir, "args.json")
    if not os.path.isfile(path):
        raise UsageError(f"--init-from {run_dir}: no args.json there, so it is not a run directory")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise UsageError(f"--init-from {run_dir}: its args.json cannot be read ({err})") from None


def transfer_args(args, algo: str, transfer_weights):
    """Check the transfer flags against the base run and fill in what they leave open.

    Without ``--init-from`` only checks that ``--transfer`` is not given alone. ``transfer_weights``
    is the script's rule (None: a script that shares nothing, the single-task oracle)."""
    if args.init_from is None:
        if args.transfer is not None:
            raise UsageError("--transfer needs --init-from BASE_RUN_DIR (the run to start from)")
        return args
    if transfer_weights is None:
        raise UsageError(f"{algo} shares no parameters between tasks, so there is nothing to transfer: its "
                         f"leave-one-out run on the held-out task is the plain run (--tasks TASK)")
    if args.transfer is None:
        raise UsageError("--init-from needs --transfer finetune (train everything) or --transfer task-params "
                         "(train only the new task's own parameters)")
    if args.holdout_task is not None:
        raise UsageError("--holdout-task is for the base run; a transfer run trains the held-out task itself "
                         "(--tasks, by default the base run's held-out task)")
    base = base_run_args(args.init_from)
    if base.get("algo") != algo:
        raise UsageError(f"--init-from {args.init_from}: that run is {base.get('algo')}, not {algo}; transfer "
                         f"starts from a base run of the same method")
    if base.get("env_id") != args.env_id:
        raise UsageError(f"--init-from {args.init_from}: that run is on suite '{base.get('env_id')}', this one on "
                         f"'{args.env_id}'; pass --env-id {base.get('env_id')}")
    base_tasks = base.get("task_names") or []
    if args.tasks is None:
        if base.get("holdout_task") is None:
            raise UsageError(f"--init-from {args.init_from}: that run held no task out; name the new task with "
                             f"--tasks, or start from a run with --holdout-task")
        args.tasks = [base["holdout_task"]]
    if len(args.tasks) != 1:
        raise UsageError(f"a transfer run learns one new task, got --tasks {' '.join(args.tasks)}")
    if args.tasks[0] in base_tasks:
        raise UsageError(f"--init-from {args.init_from}: that run already trained on '{args.tasks[0]}' "
                         f"(its tasks: {', '.join(base_tasks)}); transfer to a task it held out")
    base_sizes = tuple(base["hidden_sizes"]) if base.get("hidden_sizes") else None
    if args.hidden_sizes is None:
        args.hidden_sizes = base_sizes
    elif tuple(args.hidden_sizes) != base_sizes:
        raise UsageError(f"--hidden-sizes {' '.join(map(str, args.hidden_sizes))} differs from the base run's "
                         f"{' '.join(map(str, base_sizes or ()))}; drop the flag to use the base run's widths")
    return args


def load_shared(agent: torch.nn.Module, base_state: dict, skip: tuple[str, ...] = ()) -> dict:
    """Copy every entry of the base state into the agent except the agent's per-task parameters
    (and the names in ``skip``); returns {name: True} for those per-task parameters, the new task's
    own. A shape that differs (another width or architecture) is one sentence."""
    own = {}
    per_task_names = {name for name, p in agent.named_parameters() if is_per_task(p)}
    target = agent.state_dict()
    with torch.no_grad():
        for name, tensor in target.items():
            if name in per_task_names:
                own[name] = True
                continue
            if name in skip:
                continue
            if name not in base_state:
                raise UsageError(f"the base run's checkpoint has no '{name}': it was made with other "
                                 f"architecture flags than this run")
            check_shape(name, base_state[name].shape, tensor.shape)
            tensor.copy_(base_state[name])
    return own


def load_onehot_mlps(agent: torch.nn.Module, base_state: dict, first: tuple[str, ...]) -> dict:
    """``load_shared`` for an agent whose first layers (``first``) read [observation, one-hot task]:
    their observation columns come from the base run, the new task's column (the last) keeps the
    fresh agent's start and is the task's own entry, as a bool mask beside the shared columns."""
    own = load_shared(agent, base_state, skip=first)
    state = agent.state_dict()
    with torch.no_grad():
        for name in first:
            weight, base_weight = state[name], base_state[name]  # [h, obs_dim + 1], [h, obs_dim + T_base]
            obs_dim = weight.shape[1] - 1
            check_shape(f"{name} (observation columns)", (base_weight.shape[0], min(obs_dim, base_weight.shape[1])),
                        (weight.shape[0], obs_dim))
            weight[:, :obs_dim] = base_weight[:, :obs_dim]
            mask = torch.zeros_like(weight, dtype=torch.bool)
            mask[:, obs_dim:] = True
            own[name] = mask
    return own


def check_shape(name: str, base_shape, shape) -> None:
    if tuple(base_shape) != tuple(shape):
        raise UsageError(f"'{name}' is {list(base_shape)} in the base run and {list(shape)} here: the base run "
                         f"has another width or architecture; use its flags")


def freeze_shared(agent: torch.nn.Module, own: dict) -> None:
    """task-params: only the new task's own entries train. A parameter not in ``own`` gets no
    gradient (requires_grad off, so Adam never sees it); one mapped to a bool mask (the first
    layer of shared MTL, whose task column sits beside shared columns) trains with the gradient
    of its other entries zeroed, which keeps them, and their Adam moments, exactly at zero change."""
    for name, p in agent.named_parameters():
        spec = own.get(name)
        if spec is None:
            p.requires_grad_(False)
        elif spec is not True:
            mask = spec.to(p.device, p.dtype)
            p.register_hook(lambda grad, mask=mask: grad * mask)


def init_from_base(args, algo: str, agent: torch.nn.Module, obs_normalizer, transfer_weights) -> dict:
    """Load the base run's checkpoint into the fresh one-task agent (``transfer_weights``, the
    script's own rule, returns the new task's own entries) and the observation normaliser; freeze
    the rest for ``--transfer task-params``. Returns the own-entries map."""
    path = os.path.join(args.init_from, "checkpoint.pt")
    if not os.path.isfile(os.path.join(args.init_from, "summary.json")):
        raise UsageError(f"--init-from {args.init_from}: that run has not finished (no summary.json), so its "
                         f"checkpoint is not its final agent; wait for it, or resume it first")
    if not os.path.isfile(path):
        raise UsageError(f"--init-from {args.init_from}: no checkpoint.pt there (the base run has not "
                         f"reached its first checkpoint)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        base_state, extra = state["agent"], state["extra"]
    except Exception as err:  # a truncated or foreign file
        raise UsageError(f"--init-from {args.init_from}: checkpoint.pt cannot be read ({type(err).__name__})") from None
    if extra.get("algo") != algo:
        raise UsageError(f"--init-from {args.init_from}: checkpoint.pt was written by {extra.get('algo')}, not {algo}")
    device = next(agent.parameters()).device
    own = transfer_weights(args, agent, {name: t.to(device) for name, t in base_state.items()})
    if hasattr(agent, "clear_weight_cache"):
        agent.clear_weight_cache()
    obs_normalizer.load_state_dict(state["obs_normalizer"])
    if args.transfer == "task-params":
        freeze_shared(agent, own)
    return own
