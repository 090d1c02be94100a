"""PCGrad: shared multi-task PPO whose update projects away conflicting task gradients.

Paper: Tianhe Yu, Saurabh Kumar, Abhishek Gupta, Sergey Levine, Karol Hausman, Chelsea Finn,
"Gradient Surgery for Multi-Task Learning", Advances in Neural Information Processing Systems 33
(NeurIPS 2020), arXiv:2001.06782.

The network, the task encoding (``--task-encoding``) and the parameter counts are exactly those of
ppo_mtl_embed.py (copied unchanged); only ``method_update`` differs, and ``make_agent`` adds forward
hooks that keep each linear layer's input and output for it. Read this file as that one plus the
gradient surgery below. The regions between ``PPO CORE`` markers are byte-identical in every
``algos/ppo_*.py`` (tests/test_core_identical.py enforces it).

The update, per task-stratified minibatch (the core hands over ``task_losses`` [T], each task's
full PPO loss: clipped surrogate - ent_coef * entropy + vf_coef * value loss):
1. g_t = gradient of task t's loss, for every task, all from one backward pass (see below).
2. Surgery (Algorithm 1 of the paper), on the shared entries only: for each task i, visit the other
   tasks j in a fresh random order; if g_i^PC . g_j < 0, set g_i^PC <- g_i^PC - (g_i^PC . g_j) /
   |g_j|^2 g_j, always against the ORIGINAL g_j (never an already-projected one).
3. The update direction is the mean over tasks of the projected gradients; task-only entries keep
   their plain gradient; one gradient-norm clip over all parameters; Adam.

Decisions and deviations from the paper:
- [PPO] The paper runs SAC; here each task's loss is its PPO loss on its own rows of the
  task-stratified minibatch, and the surgery runs once per PPO minibatch (update_epochs x
  num_minibatches times per rollout). The per-task advantage normalisation of the core stays as is.
- Actor and critic separately: the surgery runs twice, once on the flattened actor gradient and once
  on the flattened critic gradient, each with its own random visiting orders. Since the two MLPs are
  separate, the actor's gradient is that of the surrogate + entropy terms and the critic's that of
  the value term, as the paper's SAC version treats its policy and Q losses separately.
- Mean, not sum: the paper sums the projected gradients; the reference script (ppo_mtl_embed.py)
  minimises the mean of the task losses, so the projected gradients are averaged (a factor 1/T).
  With no conflict this update equals ppo_mtl_embed's exactly (a test pins it down), so the two
  scripts share learning rate and clipping threshold and differ only by the surgery.
- Task-only entries are kept out of the dot products, the projections and the cosines, and receive
  the plain gradient of the mean loss (which, for an entry only task t reaches, is task t's own
  gradient / T): the per-task log-std rows, the learned embedding rows, and with
  ``--task-encoding onehot`` the one-hot input columns of the actor's and critic's first layers.
  The first layer's weight is therefore split: its observation columns are shared and go through
  the surgery, its one-hot columns are task-only. Why: other tasks' gradients are zero on task t's
  column, but projecting g_i along g_j would still rescale by |g_j|^2 (which counts task j's own
  column) and write a multiple of task j's column into g_i, i.e. move task j's private weights with
  task i's gradient. The paper's official code flattens every parameter, one-hot weights included;
  this departs from it on purpose, following BASELINES.md ("parameters that only one task uses keep
  that task's plain gradient").
- ``--task-encoding learned``: the embedding rows are task-only, but the first layer's embedding
  columns are shared (a learned embedding is dense once it leaves its identity start, so every task's
  data reaches every column) and go through the surgery.
- Per-task gradients in one pass (``per_task_gradients``): the batch is task-major and no row of one
  task ever meets a row of another (per-task advantage normalisation and means), so one backward of
  the summed loss gives each task's own gradient at every linear layer's output, and task t's weight
  gradient is g_t^T x_t, one batched matmul over the task axis. The arithmetic is that of one ordinary
  backward, split by task; a test checks the update against T backward passes and the paper's loop.
  At MT10's sizes (10 tasks, 3 x 400 units, 100 rows per task) on this project's 2-core CPU the
  per-task gradients took about 560 ms per minibatch by T calls of torch.autograd.grad, 700 ms
  vmapped over the backward (is_grads_batched=True), 95 ms with torch.func (vmap over the task axis
  of grad of each task's loss) and 90 ms here. torch.func would also need the minibatch inside the
  update (the core hands over only the losses) and a one-hot that vmap accepts.
- The surgery runs on the T x T gram matrix of the task gradients (``projection_coefficients``):
  every projection adds a multiple of an original g_j, so each projected gradient is a combination
  of the originals whose dot products follow from the gram matrix, and the mean of the projected
  gradients is one weighted sum of the originals. The P-long vectors are read once for the gram
  matrix and once for that sum, instead of once per visiting step.
- Visiting orders: one torch.randperm of the other tasks per task i, per group, per minibatch, drawn
  from torch's global CPU generator, which ``--seed`` seeds; the draws shift that generator, so on a
  CPU the same seed does not give ppo_mtl_embed's minibatch order.
- Conflict means a strictly negative dot product, as in the paper; the projection is written
  without a branch (min(g_i^PC . g_j, 0) / |g_j|^2), so it needs no device sync, and a zero g_j
  projects nothing.
- Gradient clipping: after the surgery, one clip of the global norm over all parameters, as the
  reference script does. ``losses/grad_norm`` is the norm of the surgered gradient before clipping.
- Diagnostics (``pcgrad/``), per update, averaged by the core over the iteration's minibatches:
  ``{actor,critic}_conflict_fraction``, the fraction of unordered task pairs with g_i . g_j < 0, and
  ``{actor,critic}_cosine``, the mean pairwise cosine, both on the original shared gradients, before
  the surgery. With one task there are no pairs and nothing is logged under ``pcgrad/``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from shared.checkpoint import resume_args, resume_checkpoint, save_checkpoint
from shared.cli import TrainingDiverged, UsageError, check_budget, check_positive, run_cli
from shared.evaluate import evaluate, finished_episodes, step_success
from shared.normalize import ObsNormalizer, RewardScaler
from shared.params import count_parameters, per_task
from shared.progress import Progress
from shared.runlog import RunLogger
from shared.suites import apply_suite_defaults, env_seed, make_suite, make_vector_env, select_tasks, space_dims
from shared.transfer import init_from_base, load_onehot_mlps, transfer_args

ALGO = "ppo_pcgrad"


# ==== PPO CORE 1/2: begin (identical in every algos/ppo_*.py) ====
@dataclass
class PPOArgs:
    seed: int = 1
    """seed of the run (torch, numpy, python, environments)"""
    torch_deterministic: bool = True
    """sets torch.backends.cudnn.deterministic"""
    cuda: bool = True
    """use CUDA when it is available"""
    torch_threads: int = 1
    """CPU threads for torch: with envs stepping in the same process and small networks, more threads
    mostly spin (and slow down badly on a loaded machine); raise it for wide networks on idle cores"""
    track: bool = False
    """log to Weights & Biases as well (works with WANDB_MODE=offline)"""
    wandb_project_name: str = "mtrl-varshare"
    """the wandb project"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    runs_dir: str = "runs"
    """where run directories are created"""
    run_name_suffix: str = ""
    """appended to the run directory name"""
    resume: Optional[str] = None
    """continue the interrupted run in this directory from its last checkpoint, with the run's own flags"""
    checkpoint_every: float = 300.0
    """write checkpoint.pt at least this often, in seconds of wall time (and at every evaluation)"""

    env_id: str = "cartpole-mt"
    """suite id (cartpole-mt, cartpole-identical, cartpole-conflict, lunarlander-mt, mt3-tune, mt3, mt10), a gymnasium
    id, or a Meta-World task"""
    tasks: Optional[list[str]] = None
    """train on these tasks of the suite only"""
    holdout_task: Optional[str] = None
    """leave this task of the suite out (the base run of leave-one-out transfer)"""
    init_from: Optional[str] = None
    """leave-one-out transfer: start from this base run (same method and suite, this run's task held out)"""
    transfer: Optional[Literal["finetune", "task-params"]] = None
    """with --init-from: train every parameter (finetune) or only the new task's own parameters (task-params)"""
    num_envs_per_task: Optional[int] = None
    """envs per task k; env column i runs task i // k (default: suite table)"""
    async_envs: bool = False
    """step envs in subprocesses (for machines with many cores)"""
    total_timesteps: Optional[int] = None
    """environment steps over all tasks; each task gets total / T (default: suite table)"""
    num_steps: Optional[int] = None
    """rollout length per env (default: suite table)"""
    learning_rate: Optional[float] = None
    """Adam learning rate (default: suite table)"""
    anneal_lr: Optional[bool] = None
    """linearly anneal the learning rate to 0 (default: suite table)"""
    gamma: Optional[float] = None
    """discount (default: suite table)"""
    gae_lambda: Optional[float] = None
    """GAE lambda (default: suite table)"""
    num_minibatches: Optional[int] = None
    """task-stratified minibatches per epoch (default: suite table)"""
    update_epochs: Optional[int] = None
    """epochs per rollout (default: suite table)"""
    norm_adv: bool = True
    """normalise advantages per minibatch and per task"""
    clip_coef: Optional[float] = None
    """PPO surrogate clip (default: suite table)"""
    clip_vloss: bool = True
    """clip the value loss as CleanRL does"""
    ent_coef: Optional[float] = None
    """entropy bonus coefficient (default: suite table)"""
    init_logstd: float = 0.0
    """initial log-std of the Gaussian policy, every task and action dimension (0: std 1); continuous
    actions only"""
    vf_coef: Optional[float] = None
    """value loss coefficient (default: suite table)"""
    max_grad_norm: Optional[float] = None
    """gradient-norm clip of the RL gradient (default: suite table)"""
    target_kl: Optional[float] = None
    """stop the epochs of an update early above this approximate KL (off by default)"""
    hidden_sizes: Optional[tuple[int, ...]] = None
    """hidden widths of actor and critic (default: suite table)"""
    eval_every: Optional[int] = None
    """evaluate every this many env steps (default: suite table)"""
    eval_episodes: Optional[int] = None
    """episodes per task in periodic evaluations (default: suite table)"""
    final_eval_episodes: Optional[int] = None
    """episodes per task in the final evaluation (default: suite table; 50 = one per goal on Meta-World)"""
    eval_sampled: bool = True
    """every evaluation runs a second pass with actions sampled from the policy (the reported score stays
    the deterministic one; the pass is logged as eval.jsonl label "sampled" and summary.json "sampled")"""


def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def make_adam(params, lr: float) -> torch.optim.Adam:
    try:
        return torch.optim.Adam(params, lr=lr, eps=1e-5, fused=True)
    except (RuntimeError, TypeError):  # fused kernels missing for this device or dtype
        return torch.optim.Adam(params, lr=lr, eps=1e-5)


LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def action_logprob_entropy(head: torch.Tensor, logstd: torch.Tensor | None, action: torch.Tensor | None):
    """Sample an action when none is given, and return (action, log-probability, entropy).

    ``logstd is None``: categorical over the logits ``head``; otherwise a diagonal Gaussian with
    mean ``head``. Written out instead of torch.distributions, whose per-call overhead is most of
    the policy's cost at rollout batch sizes on a CPU."""
    if logstd is None:
        logp_all = torch.log_softmax(head, dim=-1)  # [..., num_actions]
        if action is None:
            action = torch.multinomial(logp_all.exp().reshape(-1, head.shape[-1]), 1).view(head.shape[:-1])
        logprob = logp_all.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return action, logprob, entropy
    logstd = logstd.expand_as(head)
    std = logstd.exp()
    if action is None:
        action = head + std * torch.randn_like(head)
    logprob = (-0.5 * ((action - head) / std) ** 2 - logstd - LOG_SQRT_2PI).sum(-1)
    entropy = (0.5 + LOG_SQRT_2PI + logstd).sum(-1)
    return action, logprob, entropy
# ==== PPO CORE 1/2: end ====


@dataclass
class Args(PPOArgs):
    task_encoding: Literal["onehot", "learned"] = "onehot"
    """how the task id enters the network: a one-hot, or a learned embedding of the same width"""


OBS_NORM_PER_TASK = False  # one observation normaliser shared by all tasks


def mlp(sizes: list[int], out_std: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        last = i == len(sizes) - 2
        layers.append(layer_init(nn.Linear(a, b), std=out_std if last else np.sqrt(2)))
        if not last:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class Agent(nn.Module):
    """Actor and critic MLPs over [observation, task encoding]; inputs are task-major [T, n, ...]."""

    def __init__(self, obs_dim: int, act_dim: int, discrete: bool, num_tasks: int,
                 hidden_sizes: tuple[int, ...], task_encoding: str):
        super().__init__()
        self.num_tasks, self.discrete = num_tasks, discrete
        in_dim = obs_dim + num_tasks
        self.critic = mlp([in_dim, *hidden_sizes, 1], out_std=1.0)
        self.actor = mlp([in_dim, *hidden_sizes, act_dim], out_std=0.01)
        self.actor_logstd = None if discrete else per_task(nn.Parameter(torch.zeros(num_tasks, act_dim)))
        self.task_embedding = None
        if task_encoding == "learned":
            self.task_embedding = per_task(nn.Parameter(torch.eye(num_tasks)))  # [T, T], starts as one-hot

    def inputs(self, obs: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        if self.task_embedding is None:
            z = nn.functional.one_hot(task_ids, self.num_tasks).to(obs.dtype)  # [T, n, T]
        else:
            z = self.task_embedding[task_ids]  # [T, n, T]
        return torch.cat([obs, z], dim=-1)  # [T, n, obs_dim + T]

    def get_value(self, obs: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        return self.critic(self.inputs(obs, task_ids)).squeeze(-1)  # [T, n]

    def get_action_and_value(self, obs, task_ids, action=None):
        x = self.inputs(obs, task_ids)
        logstd = None if self.discrete else self.actor_logstd[task_ids[:, :1]]  # [T, 1, A]
        action, logprob, entropy = action_logprob_entropy(self.actor(x), logstd, action)
        return action, logprob, entropy, self.critic(x).squeeze(-1)

    def act_deterministic(self, obs, task_ids):
        head = self.actor(self.inputs(obs, task_ids))
        return head.argmax(-1) if self.discrete else head

    def episode_boundaries(self, ended: torch.Tensor) -> None:
        """Nothing to do at episode boundaries (VarShare's per-episode weight sampling uses this)."""

    def trained_parameter_count(self) -> int:
        # One task's data reaches every shared weight but only its own one-hot column of the
        # first layers (other tasks' columns multiply zeros), its log-std row and embedding row.
        total = sum(p.numel() for p in self.parameters())
        t = self.num_tasks
        unused = 0 if self.actor_logstd is None else (t - 1) * self.actor_logstd.shape[1]
        if self.task_embedding is None:
            unused += (t - 1) * (self.critic[0].out_features + self.actor[0].out_features)
        else:  # a dense learned embedding reaches every task column of the first layers
            unused += (t - 1) * t
        return total - unused

    def active_parameter_count(self) -> int:
        # At inference the task input is a constant: the first layers' task columns times the
        # one-hot (or the task's embedding row) fold into their biases, as VarShare's theta + mu_m
        # folds into one matrix.
        task_columns = self.critic[0].out_features + self.actor[0].out_features
        if self.task_embedding is None:
            return self.trained_parameter_count() - task_columns
        return self.trained_parameter_count() - self.num_tasks * task_columns - self.num_tasks


def make_agent(args: Args, suite, obs_dim: int, act_dim: int, discrete: bool) -> Agent:
    agent = Agent(obs_dim, act_dim, discrete, suite.num_tasks, args.hidden_sizes, args.task_encoding)
    keep_linear_io(agent)
    return agent


def make_optimizer(args: Args, agent: Agent) -> torch.optim.Optimizer:
    return make_adam(agent.parameters(), args.learning_rate)


def select_run_tasks(args: Args, suite):
    return select_tasks(suite, args.tasks, args.holdout_task)


def transfer_weights(args: Args, agent: Agent, base: dict) -> dict:
    """Leave-one-out transfer into this one-task agent (shared/transfer.py): the base run's weights,
    except the new task's own entries, which keep a fresh agent's start: its one-hot column of the
    first actor and critic layers (the last input column, orthogonal init like every column) and its
    log-std row (--init-logstd). Under --transfer task-params only those entries train. A learned encoding has
    no row for a new task that the base run's first layers could read, so it is refused."""
    if agent.task_embedding is not None:
        raise UsageError("--task-encoding learned has no embedding for a task the base run never saw; "
                         "leave-one-out transfer uses the one-hot encoding (the default)")
    return load_onehot_mlps(agent, base, first=("actor.0.weight", "critic.0.weight"))


def linear_layers(agent: Agent) -> list[nn.Linear]:
    return [layer for net in (agent.actor, agent.critic) for layer in net if isinstance(layer, nn.Linear)]


def keep_linear_io(agent: Agent) -> None:
    """Forward hooks on the actor's and critic's Linear layers that keep each layer's input and output
    of the latest forward pass run with autograd on (the loss's), for ``per_task_gradients``. Rollout and
    evaluation run in inference mode and keep nothing."""
    for layer in linear_layers(agent):
        layer.last_io = None
        layer.register_forward_hook(_keep_io)


def _keep_io(layer: nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
    if torch.is_grad_enabled():
        layer.last_io = (inputs[0], output)


def per_task_gradients(agent: Agent, task_losses: torch.Tensor) -> tuple[dict, dict]:
    """Every task's own gradient of every Linear parameter, from ONE backward pass.

    Returns (task_grads, plain): task_grads maps each Linear weight and bias p to [T, *p.shape], row t
    the gradient of task_losses[t] alone; plain maps every other parameter (per-task log-std and
    embedding rows) to the gradient of the mean loss.

    Why one pass is enough: the batch is task-major [T, n, ...] and nothing in the network or the loss
    mixes rows of different tasks (per-task advantage normalisation, per-task means), so at a layer's
    output y the gradient of the summed loss, restricted to row t, is task t's own g_t = dL_t/dy_t
    [n, out]. Task t's gradient of y = x W^T + b is then g_t^T x_t for W and the row sum of g_t for b:
    one batched matmul over the task axis, the same arithmetic as an ordinary weight gradient, split by
    task. The backward itself stops at the layer outputs and computes no weight gradient."""
    layers = linear_layers(agent)
    if any(getattr(layer, "last_io", None) is None for layer in layers):
        raise RuntimeError("PCGrad's update needs the layer inputs and outputs of the forward pass that built "
                           "task_losses: build the agent with make_agent (it installs the hooks that keep them)")
    inputs, outputs = zip(*(layer.last_io for layer in layers), strict=True)
    for layer in layers:  # drop the references, so that the graph is freed after this update
        layer.last_io = None
    linear_params = {id(p) for layer in layers for p in (layer.weight, layer.bias)}
    others = [p for p in agent.parameters() if id(p) not in linear_params]
    grads = torch.autograd.grad(task_losses.sum(), [*outputs, *others])
    num_tasks = task_losses.shape[0]
    task_grads = {}
    with torch.no_grad():
        for layer, x, g in zip(layers, inputs, grads[:len(layers)], strict=True):  # x [T, n, in], g [T, n, out]
            task_grads[layer.weight] = torch.bmm(g.transpose(1, 2), x.detach())  # [T, out, in]
            task_grads[layer.bias] = g.sum(1)  # [T, out]
    plain = {p: g / num_tasks for p, g in zip(others, grads[len(layers):], strict=True)}
    return task_grads, plain


def random_orders(num_tasks: int) -> torch.Tensor:
    """Row i: the tasks other than i in a fresh random order, one torch.randperm per task -> [T, T-1]."""
    rows = []
    for i in range(num_tasks):
        perm = torch.randperm(num_tasks - 1)  # a permutation of 0..T-2, shifted past i to skip it
        rows.append(perm + (perm >= i).long())
    return torch.stack(rows)


def projection_coefficients(gram: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """PCGrad's surgery on the gram matrix: gram [T, T] (g_i . g_j), orders [T, T-1] -> C [T, T] such that
    the projected gradients are g_i^PC = g_i + sum_j C[i, j] g_j.

    For each task i, visit the tasks j in ``orders[i]``; where the current g_i^PC conflicts with the
    ORIGINAL g_j (negative dot product), remove g_i^PC's component along g_j. Every projection adds a
    multiple of an original g_j, so g_i^PC stays in the span of the originals and its dot product with
    g_j is gram[i, j] + sum_k C[i, k] gram[k, j]: the whole loop runs on T x T numbers, and the P-long
    gradients are touched only to form the gram matrix and the final combination. Rows run in parallel,
    one visiting step at a time (step s handles task orders[i, s] for every row i), which is the same as
    running the paper's loop one task after the other."""
    num_tasks = gram.shape[0]
    orders = orders.to(gram.device)
    rows = torch.arange(num_tasks, device=gram.device)
    sq_norms = gram.diagonal().clamp_min(torch.finfo(gram.dtype).tiny)  # [T]; a zero g_j projects nothing
    coefficients = torch.zeros_like(gram)  # [T, T]
    for step in range(num_tasks - 1):
        j = orders[:, step]  # [T]: the task each row visits now (each j once per row)
        dot = gram[rows, j] + (coefficients * gram[:, j].T).sum(1)  # [T]: g_i^PC . g_j
        coefficients[rows, j] = -dot.clamp(max=0.0) / sq_norms[j]
    return coefficients


def project_conflicting(grads: torch.Tensor, orders: torch.Tensor | None = None) -> torch.Tensor:
    """PCGrad's surgery on explicit vectors: grads [T, P], one flattened gradient per task -> projected
    gradients [T, P] (orders [T, T-1], random when None; see ``projection_coefficients``)."""
    if orders is None:
        orders = random_orders(grads.shape[0])
    return grads + projection_coefficients(grads @ grads.T, orders) @ grads


def conflict_statistics(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Over the unordered task pairs of a gram matrix [T, T] (T >= 2): fraction with g_i . g_j < 0, mean cosine."""
    norms = gram.diagonal().sqrt()
    cosine = gram / (norms[:, None] * norms[None, :]).clamp_min(torch.finfo(gram.dtype).tiny)
    i, j = torch.triu_indices(gram.shape[0], gram.shape[0], offset=1, device=gram.device)
    return (gram[i, j] < 0).float().mean(), cosine[i, j].mean()


def shared_entries(agent: Agent, net: nn.Sequential) -> list[tuple[nn.Parameter, slice]]:
    """The entries of an MLP that every task's data reaches: (parameter, slice of its last axis).

    All of them but the first layer's one-hot columns (weight[:, obs_dim:]), which only their own
    task reaches. With a learned embedding those columns are shared as well (module docstring)."""
    first = net[0].weight  # [h, obs_dim + T]
    obs_dim = first.shape[1] - agent.num_tasks
    first_columns = slice(None) if agent.task_embedding is not None else slice(0, obs_dim)
    return [(first, first_columns)] + [(p, slice(None)) for p in list(net.parameters())[1:]]


def method_update(args: Args, agent: Agent, optimizer, task_losses: torch.Tensor, info: dict) -> dict:
    """One PCGrad step on the task-stratified minibatch: task_losses is [T]."""
    num_tasks = task_losses.shape[0]
    if num_tasks == 1:  # nothing to project (a leave-one-out transfer run learns one task): the plain step
        for layer in linear_layers(agent):
            layer.last_io = None
        optimizer.zero_grad(set_to_none=True)
        task_losses.sum().backward()
        grad_norm = nn.utils.clip_grad_norm_([p for p in agent.parameters() if p.grad is not None],
                                             args.max_grad_norm)
        optimizer.step()
        return {"losses/grad_norm": grad_norm}
    task_grads, plain = per_task_gradients(agent, task_losses)
    optimizer.zero_grad(set_to_none=True)
    for p, g in plain.items():  # log-std and embedding rows: task-only, the plain gradient of the mean loss
        p.grad = g
    stats = {}
    with torch.no_grad():
        for name, net in (("actor", agent.actor), ("critic", agent.critic)):
            entries = shared_entries(agent, net)
            flats = [task_grads[p][..., cols].reshape(num_tasks, -1) for p, cols in entries]  # [T, P_e] each
            gram = sum(flat @ flat.T for flat in flats)  # [T, T]
            coefficients = projection_coefficients(gram, random_orders(num_tasks))
            # mean_i g_i^PC = sum_j weights[j] g_j: the projected mean is one combination of the originals.
            weights = (1.0 + coefficients.sum(0)) / num_tasks  # [T]
            for (p, cols), flat in zip(entries, flats, strict=True):
                surgered = weights @ flat  # [P_e]
                if cols == slice(None):
                    p.grad = surgered.view_as(p)
                else:  # the first layer: its one-hot columns are task-only and keep the plain mean
                    p.grad = task_grads[p].mean(0)
                    p.grad[..., cols] = surgered.view_as(p.grad[..., cols])
            if num_tasks > 1:
                conflict_fraction, cosine = conflict_statistics(gram)
                stats[f"pcgrad/{name}_conflict_fraction"] = conflict_fraction
                stats[f"pcgrad/{name}_cosine"] = cosine
    stats["losses/grad_norm"] = nn.utils.clip_grad_norm_(list(agent.parameters()), args.max_grad_norm)
    optimizer.step()
    return stats


def method_diagnostics(args: Args, agent: Agent, logger: RunLogger, global_step: int) -> dict:
    return {}


def method_final(args: Args, agent: Agent, final_evaluation) -> dict:
    """Extra end-of-run results for summary.json (VarShare's pruned evaluation); none here."""
    return {}


# ==== PPO CORE 2/2: begin (identical in every algos/ppo_*.py) ====
def compute_gae(rewards, values, ended, next_value, gamma: float, gae_lambda: float):
    """GAE over a rollout. rewards, values, ended: [S, ...]; next_value: [...].

    ``ended[t]`` means the episode ended after action t (terminated or truncated), so nothing is
    bootstrapped across it. A truncation's bootstrap gamma * V(final_obs) is already in
    ``rewards[t]``; a termination gets none."""
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        following_value = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        not_ended = 1.0 - ended[t]
        delta = rewards[t] + gamma * following_value * not_ended - values[t]
        last_gae = delta + gamma * gae_lambda * not_ended * last_gae
        advantages[t] = last_gae
    return advantages


def ppo_task_losses(args, agent, mb: dict) -> tuple[torch.Tensor, dict]:
    """Each task's PPO loss on a task-stratified minibatch ([T, n, ...] tensors) -> [T]."""
    _, newlogprob, entropy, newvalue = agent.get_action_and_value(mb["obs"], mb["task_ids"], mb["actions"])
    logratio = newlogprob - mb["logprobs"]
    ratio = logratio.exp()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
    adv = mb["advantages"]
    if args.norm_adv:
        adv = (adv - adv.mean(dim=1, keepdim=True)) / (adv.std(dim=1, keepdim=True) + 1e-8)
    pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean(dim=1)
    if args.clip_vloss:
        v_clipped = mb["values"] + (newvalue - mb["values"]).clamp(-args.clip_coef, args.clip_coef)
        v_loss = 0.5 * torch.max((newvalue - mb["returns"]) ** 2, (v_clipped - mb["returns"]) ** 2).mean(dim=1)
    else:
        v_loss = 0.5 * ((newvalue - mb["returns"]) ** 2).mean(dim=1)
    entropy_loss = entropy.mean(dim=1)
    task_losses = pg_loss - args.ent_coef * entropy_loss + args.vf_coef * v_loss  # [T]
    stats = {"losses/policy_loss": pg_loss.detach().mean(), "losses/value_loss": v_loss.detach().mean(),
             "losses/entropy": entropy_loss.detach().mean(), "losses/approx_kl": approx_kl, "losses/clipfrac": clipfrac}
    return task_losses, stats


def main(args) -> dict:
    if args.resume is not None:
        args = resume_args(args, ALGO)
    args = transfer_args(args, ALGO, transfer_weights)
    suite = make_suite(args.env_id)
    apply_suite_defaults(args, suite)
    suite = select_run_tasks(args, suite)
    check_positive(num_envs_per_task=args.num_envs_per_task, num_steps=args.num_steps,
                   num_minibatches=args.num_minibatches, update_epochs=args.update_epochs,
                   eval_every=args.eval_every, eval_episodes=args.eval_episodes,
                   final_eval_episodes=args.final_eval_episodes, learning_rate=args.learning_rate,
                   max_grad_norm=args.max_grad_norm, clip_coef=args.clip_coef, gamma=args.gamma,
                   gae_lambda=args.gae_lambda, checkpoint_every=args.checkpoint_every)
    if not args.hidden_sizes or min(args.hidden_sizes) <= 0:
        raise UsageError("--hidden-sizes needs one or more positive widths, e.g. --hidden-sizes 64 64")
    T, k, S = suite.num_tasks, args.num_envs_per_task, args.num_steps
    batch_size = T * k * S
    num_iterations = check_budget(args.total_timesteps, batch_size)
    if (k * S) % args.num_minibatches != 0:
        raise UsageError(f"num_envs_per_task x num_steps = {k * S} is not divisible by "
                         f"--num-minibatches {args.num_minibatches}; pick a divisor")
    minibatch_per_task = k * S // args.num_minibatches

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.cuda and device.type == "cpu":
        print("CUDA is not available: running on the CPU")

    print(f"{args.env_id} {ALGO} seed {args.seed}: building {T * k} training and {T} evaluation envs", flush=True)
    envs, column_tasks = make_vector_env(suite, k, args.seed, args.async_envs)
    eval_envs, _ = make_vector_env(suite, 1, args.seed, args.async_envs, evaluation=True)
    obs_dim, act_dim, discrete = space_dims(envs)
    agent = make_agent(args, suite, obs_dim, act_dim, discrete).to(device)
    if args.init_logstd != 0.0:
        if discrete:
            raise UsageError(f"--init-logstd sets a Gaussian policy's initial spread, but {args.env_id}'s actions "
                             f"are discrete; drop the flag")
        with torch.no_grad():
            agent.actor_logstd.fill_(args.init_logstd)
    obs_normalizer = ObsNormalizer(T, obs_dim, per_task=OBS_NORM_PER_TASK)
    reward_scaler = RewardScaler(T, k, args.gamma)
    if args.init_from is not None:  # leave-one-out transfer: the base run's shared weights (shared/transfer.py)
        init_from_base(args, ALGO, agent, obs_normalizer, transfer_weights)
    optimizer = make_optimizer(args, agent)
    # --resume: the run's checkpoint replaces the fresh state (RNG states too) before anything is drawn.
    resumed = (resume_checkpoint(args.resume, ALGO, agent, optimizer, obs_normalizer, reward_scaler)
               if args.resume else None)
    logger = RunLogger(args, ALGO, suite.task_names, args.runs_dir, resume=resumed)
    checkpoint_path = os.path.join(logger.dir, "checkpoint.pt")
    parameter_counts = count_parameters(agent)
    print(f"{logger.run_name}: {T} tasks x {k} envs, {num_iterations} iterations of {batch_size} steps, "
          f"parameters {parameter_counts}, device {device}")

    # Rollout storage, task-major: [S, T, k, ...]. task_ids[t, j] = t is each column's true task.
    task_ids = torch.as_tensor(column_tasks.reshape(T, k), device=device)  # [T, k]
    action_shape = () if discrete else (act_dim,)
    obs_buf = torch.zeros((S, T, k, obs_dim), device=device)
    actions_buf = torch.zeros((S, T, k, *action_shape), device=device, dtype=torch.long if discrete else torch.float32)
    logprobs_buf = torch.zeros((S, T, k), device=device)
    rewards_buf = torch.zeros((S, T, k), device=device)
    ended_buf = torch.zeros((S, T, k), device=device)
    values_buf = torch.zeros((S, T, k), device=device)
    act_low, act_high = (None, None) if discrete else (envs.single_action_space.low, envs.single_action_space.high)

    def deterministic_policy(obs_np: np.ndarray) -> np.ndarray:
        obs_t = torch.as_tensor(obs_np, device=device)
        eval_task_ids = torch.arange(T, device=device)[:, None].expand(T, obs_np.shape[1])
        with torch.inference_mode():
            actions = agent.act_deterministic(obs_t, eval_task_ids)  # [T, n, ...]
            return actions.reshape(T * obs_np.shape[1], *action_shape).cpu().numpy()

    def sampled_policy(obs_np: np.ndarray) -> np.ndarray:  # actions drawn as in a training rollout
        obs_t = torch.as_tensor(obs_np, device=device)
        eval_task_ids = torch.arange(T, device=device)[:, None].expand(T, obs_np.shape[1])
        with torch.inference_mode():
            actions = agent.get_action_and_value(obs_t, eval_task_ids)[0]  # [T, n, ...]
            return actions.reshape(T * obs_np.shape[1], *action_shape).cpu().numpy()

    def run_evaluation(eval_env, episodes: int, step: int, final: bool, label: str = "", sampled_env=None) -> dict:
        # One pass with the deterministic policy; VarShare's --eval-sample-weights N makes this N
        # passes, each with its own weight sample (drawn on entering eval mode), averaged.
        passes = []
        for _ in range(getattr(agent, "eval_passes", 1)):
            agent.eval()
            passes.append(evaluate(deterministic_policy, eval_env, T, obs_normalizer, episodes,
                                   suite.success_return, env_seed(args.seed, evaluation=True)))
            agent.train()
        result = {key: np.mean([p[key] for p in passes], axis=0) if key in ("success", "return") else passes[0][key]
                  for key in passes[0]}
        result["passes"] = len(passes)
        if label:
            result["label"] = label
        logger.eval(result, step, final=final)
        print(f"step {step}: eval{' ' + label if label else ''} success {result['success'].mean():.3f} "
              f"return {result['return'].mean():.1f} "
              + " ".join(f"{n}={r:.1f}" for n, r in zip(suite.task_names, result["return"], strict=True)))
        if args.eval_sampled and not label:
            # The same episodes with sampled actions. Its own seeded RNG stream (entering eval mode
            # may draw too: VarShare's --eval-sample-weights): training draws the same numbers
            # with or without this pass.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(args.seed * 1_000_003 + step)
                agent.eval()
                sampled = evaluate(sampled_policy, eval_env if sampled_env is None else sampled_env, T,
                                   obs_normalizer, episodes, suite.success_return,
                                   env_seed(args.seed, evaluation=True))
                agent.train()
            logger.eval({**sampled, "label": "sampled"}, step, final=final)
            print(f"step {step}: eval sampled success {sampled['success'].mean():.3f} "
                  f"return {sampled['return'].mean():.1f}")
            result["sampled"] = sampled
        return result

    def final_evaluation(label: str = "") -> dict:
        # Fresh envs, so that Meta-World's 50 episodes visit each of the task's 50 goals once, in
        # both the deterministic and the sampled pass.
        final_envs, _ = make_vector_env(suite, 1, args.seed, args.async_envs, evaluation=True)
        sampled_envs = (make_vector_env(suite, 1, args.seed, args.async_envs, evaluation=True)[0]
                        if args.eval_sampled and not label else None)
        try:
            return run_evaluation(final_envs, args.final_eval_episodes, global_step, final=True, label=label,
                                  sampled_env=sampled_envs)
        finally:
            final_envs.close()
            if sampled_envs is not None:
                sampled_envs.close()

    global_step, start_time, next_eval, first_iteration = 0, time.time(), args.eval_every, 1
    if resumed:  # episodes in progress at the checkpoint are not restored: the envs start afresh
        global_step, next_eval = resumed["global_step"], resumed["extra"]["next_eval"]
        first_iteration = resumed["extra"]["iteration"] + 1
        print(f"resuming {logger.dir} at step {global_step} (iteration {first_iteration})")
    start_step, last_checkpoint = global_step, time.monotonic()
    progress = Progress(f"{args.env_id} {ALGO} seed {args.seed}", num_iterations * batch_size, start_step=start_step)

    def checkpoint(iteration: int) -> None:
        save_checkpoint(checkpoint_path, agent, optimizer, obs_normalizer, reward_scaler, global_step,
                        {"algo": ALGO, "args": dataclasses.asdict(args), "task_names": suite.task_names,
                         "iteration": iteration, "next_eval": next_eval, "wall_time": logger.elapsed()})

    if args.init_from is not None and not resumed:  # the new task's score before any update
        run_evaluation(eval_envs, args.eval_episodes, 0, final=False, label="zero-shot")
    raw_obs, _ = envs.reset(seed=env_seed(args.seed, evaluation=False) + global_step)
    raw_obs = raw_obs.reshape(T, k, obs_dim)
    obs_normalizer.update(raw_obs)
    next_obs = torch.as_tensor(obs_normalizer.normalize(raw_obs), device=device)  # [T, k, obs_dim]
    running_success = np.zeros(T * k, bool)
    try:
        for iteration in range(first_iteration, num_iterations + 1):
            if args.anneal_lr:
                for group in optimizer.param_groups:
                    group["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate
            episode_returns = [[] for _ in range(T)]
            episode_successes = [[] for _ in range(T)]
            env_time = inference_time = 0.0
            rollout_start = time.perf_counter()
            for step in range(S):
                global_step += T * k
                progress.tick(global_step, "collecting")
                obs_buf[step] = next_obs
                tic = time.perf_counter()
                with torch.inference_mode():
                    action, logprob, _, value = agent.get_action_and_value(next_obs, task_ids)
                env_action = action.reshape(T * k, *action_shape).cpu().numpy()
                inference_time += time.perf_counter() - tic
                values_buf[step], actions_buf[step], logprobs_buf[step] = value, action, logprob
                if act_low is not None:
                    env_action = np.clip(env_action, act_low, act_high)
                tic = time.perf_counter()
                raw_obs, reward, terminated, truncated, info = envs.step(env_action)
                env_time += time.perf_counter() - tic
                ended = terminated | truncated
                raw_obs = raw_obs.reshape(T, k, obs_dim)
                obs_normalizer.update(raw_obs)
                next_obs = torch.as_tensor(obs_normalizer.normalize(raw_obs), device=device)
                scaled_reward = reward_scaler.scale(reward.reshape(T, k), ended.reshape(T, k))
                bootstrap = truncated & ~terminated  # time limit: the episode did not really end
                if bootstrap.any():
                    final_obs = raw_obs.copy().reshape(T * k, obs_dim)
                    for i in np.flatnonzero(bootstrap):
                        final_obs[i] = info["final_obs"][i]
                    final_obs_t = torch.as_tensor(obs_normalizer.normalize(final_obs.reshape(T, k, obs_dim)),
                                                  device=device)
                    with torch.inference_mode():
                        final_value = agent.get_value(final_obs_t, task_ids).cpu().numpy().reshape(T * k)
                    scaled_reward = scaled_reward.reshape(T * k)
                    scaled_reward[bootstrap] += args.gamma * final_value[bootstrap]
                    scaled_reward = scaled_reward.reshape(T, k)
                rewards_buf[step] = torch.as_tensor(scaled_reward, device=device)
                ended_buf[step] = torch.as_tensor(ended.reshape(T, k), device=device, dtype=torch.float32)
                running_success |= step_success(info, ended)
                if ended.any():
                    done_mask, returns_np = finished_episodes(info, ended)
                    for i in np.flatnonzero(done_mask):
                        episode_returns[i // k].append(returns_np[i])
                        episode_successes[i // k].append(running_success[i])
                    running_success[ended] = False
                    agent.episode_boundaries(torch.as_tensor(ended.reshape(T, k), device=device))
            rollout_time = time.perf_counter() - rollout_start

            update_start = time.perf_counter()
            with torch.inference_mode():
                next_value = agent.get_value(next_obs, task_ids)
            advantages = compute_gae(rewards_buf, values_buf, ended_buf, next_value, args.gamma, args.gae_lambda)
            returns = advantages + values_buf

            # Flatten each task's data: [S, T, k, ...] -> [T, S * k, ...]; minibatches keep the task axis.
            def per_task_rows(x):
                return x.transpose(0, 1).reshape(T, S * k, *x.shape[3:])

            batch = {"obs": per_task_rows(obs_buf), "actions": per_task_rows(actions_buf),
                     "logprobs": per_task_rows(logprobs_buf), "advantages": per_task_rows(advantages),
                     "returns": per_task_rows(returns), "values": per_task_rows(values_buf)}
            batch_task_ids = task_ids[:, :1].expand(T, minibatch_per_task)  # [T, n]
            stats_sum: dict[str, torch.Tensor] = {}
            num_updates = 0
            stop_early = False
            for epoch in range(args.update_epochs):
                order = torch.rand(T, S * k, device=device).argsort(dim=1)  # a fresh permutation per task
                for start in range(0, S * k, minibatch_per_task):
                    idx = order[:, start:start + minibatch_per_task]  # [T, n]
                    mb = {key: torch.take_along_dim(value, idx.view(T, -1, *([1] * (value.dim() - 2))), dim=1)
                          for key, value in batch.items()}
                    mb["task_ids"] = batch_task_ids
                    task_losses, stats = ppo_task_losses(args, agent, mb)
                    stats.update(method_update(args, agent, optimizer, task_losses,
                                               {"epoch": epoch, "start": start, "iteration": iteration}))
                    for key, value in stats.items():  # summed as tensors: no device sync per minibatch
                        stats_sum[key] = stats_sum.get(key, 0.0) + value
                    num_updates += 1
                    progress.tick(global_step, "updating")
                    if args.target_kl is not None and float(stats["losses/approx_kl"]) > args.target_kl:
                        stop_early = True
                        break
                if stop_early:
                    break
            for name, param in agent.named_parameters():
                if not torch.isfinite(param).all():
                    raise TrainingDiverged(f"parameter '{name}' is not finite after the update of iteration "
                                           f"{iteration} (step {global_step}); the last good checkpoint is "
                                           f"{checkpoint_path}")
            update_time = time.perf_counter() - update_start

            y_pred, y_true = values_buf.flatten().cpu().numpy(), returns.flatten().cpu().numpy()
            var_y = np.var(y_true)
            explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
            for key, value in stats_sum.items():
                logger.scalar(key, float(value) / num_updates, global_step)
            logger.scalar("losses/explained_variance", explained_var, global_step)
            logger.scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
            logger.scalar("charts/SPS", (global_step - start_step) / (time.time() - start_time), global_step)
            logger.scalar("perf/env_time", env_time, global_step)
            logger.scalar("perf/inference_time", inference_time, global_step)
            logger.scalar("perf/rollout_time", rollout_time, global_step)
            logger.scalar("perf/update_time", update_time, global_step)
            logger.scalar("perf/rollout_sps", batch_size / rollout_time, global_step)
            all_returns = [r for task in episode_returns for r in task]
            progress.phase_times(rollout_time, update_time)
            progress.episodes(all_returns, None if suite.success_return is not None
                              else [s for task in episode_successes for s in task])
            if all_returns:
                logger.scalar("charts/episodic_return", np.mean(all_returns), global_step)
            for name, task_returns, task_successes in zip(suite.task_names, episode_returns, episode_successes,
                                                          strict=True):
                if task_returns:
                    logger.scalar(f"charts/{name}/episodic_return", np.mean(task_returns), global_step)
                    if suite.success_return is None:
                        logger.scalar(f"charts/{name}/success_rate", np.mean(task_successes), global_step)
            for key, value in method_diagnostics(args, agent, logger, global_step).items():
                logger.scalar(key, value, global_step)
            logger.perf_history.append({"rollout_time": rollout_time, "update_time": update_time,
                                        "env_time": env_time, "inference_time": inference_time,
                                        "steps": batch_size})

            if global_step >= next_eval or iteration == num_iterations:
                while next_eval <= global_step:
                    next_eval += args.eval_every
                run_evaluation(eval_envs, args.eval_episodes, global_step, final=False)
                checkpoint(iteration)
                last_checkpoint = time.monotonic()
            elif time.monotonic() - last_checkpoint >= args.checkpoint_every:
                checkpoint(iteration)
                last_checkpoint = time.monotonic()
    finally:  # also on a crash: the logs so far reach disk, the last good checkpoint stays
        logger.writer.flush()
        envs.close()
        eval_envs.close()

    final = final_evaluation()
    extra = {**logger.perf_summary(), **method_final(args, agent, final_evaluation)}
    summary = logger.summary(final, global_step, parameter_counts, device, extra)
    logger.close()
    return summary


if __name__ == "__main__":
    run_cli(main, Args)
# ==== PPO CORE 2/2: end ====
