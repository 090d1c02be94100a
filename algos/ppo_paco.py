"""PaCo on PPO: K parameter copies per layer, composed per task by a learned vector w_t.

Paper: Lingfeng Sun, Haichao Zhang, Wei Xu, Masayoshi Tomizuka. "PaCo: Parameter-Compositional
Multi-Task Reinforcement Learning." Advances in Neural Information Processing Systems 35
(NeurIPS 2022). arXiv:2210.11653.

The method. Every linear layer of actor and critic stores K full copies of its parameters,
weights ``V[K, d_in, d_out]`` and biases ``b[K, d_out]`` (the paper's parameter set Phi). Task t
owns one compositional vector ``w_t`` in R^K (a trainable [T, K] table, marked ``per_task``),
shared by every layer of both networks. Task t's layer is ``x @ (sum_k w_tk V_k) + sum_k w_tk b_k``:
each forward composes the T task weights once (the einsum over K -> [T, d_in, d_out], computed as
one matmul [T, K] @ [K, d_in * d_out]) and runs one task-major batched matmul (``torch.baddbmm``).
The network input is the normalised observation only; the task enters only through ``w``. No
constraint or regulariser on ``w`` (as in the paper).
Everything between the ``PPO CORE`` markers is byte-identical to ppo_mtl_embed.py.

Decisions and deviations (the paper is on SAC; "[PPO]" marks a change that PPO forces):
- One ``w`` table for actor and critic together (BASELINES.md: "shared by every layer of both
  networks"); actor and critic each have their own K copies of their own layers.
- Continuous actions: a state-independent log-std per task, ``actor_logstd[T, A]``, as in every
  multi-task script here [PPO] (SAC's policy outputs its std; PPO's reference uses a free log-std).
  It is a plain per-task parameter, not composed from copies.
- Initialisation of the copies: one ``layer_init`` (orthogonal, gain sqrt(2) for hidden layers,
  0.01 for the actor head, 1 for the critic head, zero bias) per layer, copied into all K slots.
- Initialisation of ``w``: the default initialiser of a task-to-K linear map, ``nn.Linear(T, K)``,
  i.e. w_tk ~ U(-1/sqrt(T), 1/sqrt(T)), then each row shifted by a constant so that
  sum_k w_tk = 1. Why the shift: with identical copies, task t's initial network is the shared
  network with every layer's weights and biases multiplied by s_t = sum_k w_tk. Unshifted, s_t is a
  sum of K uniforms (std about 0.58 at K = T = 5): some tasks would start near s_t = 0 (a signal
  shrunk by s_t in every layer, vanishing gradients, a near-constant critic), others sign-flipped
  or with a critic head far from layer_init's gain 1, so the starting scale would be an accident
  of the draw and differ between tasks. After the shift every task starts as exactly the
  layer_init network; the differences w_tk - w_tk' (which alone break the symmetry between the
  identical copies, since the gradient reaching copy k is sum_t w_tk dL_t/dW_t) are those of the
  default draw. The sum is not held at 1 afterwards.
- Loss maskout and w-reset, recalibrated [PPO]. The paper masks a task whose SAC loss exceeds an
  absolute 3e3, which never fires on PPO's losses (normalised advantages, per-task reward scaling,
  clipped value loss: healthy losses are O(0.01-10)). Rule here, on each task's total PPO loss
  L_t (method_update receives only that; it is dominated by vf_coef * value loss whenever it
  explodes, since the advantage-normalised surrogate and the entropy term are bounded):
      task t fires  if  L_t is not finite  or  L_t > maskout_ratio * max(median_s |L_s|, maskout_floor)
  with the median over the tasks still taking part in this minibatch. The median is the scale of a
  typical task and is not moved by one or a few exploding tasks (fewer than half); the floor keeps
  the threshold meaningful when the median is near 0 (losses small, or surrogate and value terms
  cancelling). A task at or below the median can never fire, so at least half the tasks always
  stay healthy. Defaults ratio 50 (toy suites; 20 on Meta-World, below), floor 0.1 (threshold at
  least 5.0). The ratio sits far above the spread of healthy tasks' losses: on cartpole-mt the
  per-iteration mean of max_t L_t / max(median, floor) stayed at or below 2.2 over the first 100k
  steps (largest in the first iterations, when value losses are large and uneven; below 0.2 once
  tasks are solved; nothing fired), so the rule stays silent on healthy training and catches only
  an order-of-magnitude blow-up, which is what the paper's threshold is for.
  Meta-World tasks can differ more in value scale at the start; ``paco/max_relative_loss`` logs
  that statistic (minibatch mean per iteration) so a user can check the margin on their suite, and
  ``paco/masked_fraction`` shows at once if the rule fires on healthy tasks. On mt3-tune the
  statistic peaked at 11.6 in the first iterations and averaged 0.1-1 afterwards; every reset there,
  at ratios 20, 50 and 100, was of pick-place-wall-v3, whose rare rewarded episode makes its value
  loss jump against the median task's. The Meta-World default, ratio 20, is the tuning rule's pick
  (README tuning table) and resets that stuck task more often; on seed 2 no reset fired at all.
  A firing task contributes nothing to this step (its loss is left out of the sum, the other
  tasks keep their usual weight 1/T, so the healthy tasks' update is exactly the one they would
  get without it). After the Adam step its ``w`` is replaced by sum_j c_j w_j over the healthy
  tasks j (those that took part and did not fire), c ~ Dirichlet(1) (uniform on the simplex,
  drawn as normalised Exp(1) variables), and the Adam first moment of its ``w`` row and log-std
  row is zeroed, so that stale momentum does not move the fresh ``w`` (the second moment is kept:
  zeroing it would make the next steps of that row several times larger than lr). [PPO] After a
  reset the task skips its remaining minibatches of this update (all epochs of this iteration):
  its stored log-probabilities and values belong to the old ``w``. Skipped tasks contribute
  nothing and are neither judged nor used as reset sources. The skip set is cleared at the first
  minibatch of each iteration (epoch 0, offset 0). If no task is healthy nothing is reset.
  A non-finite loss fires too (a NaN compares false and would otherwise pass as healthy); its
  gradient can still be non-finite through the shared batched forward, in which case the core
  stops the run as diverged, as the protocol asks.
- Update: loss = sum over contributing tasks of L_t / T; one gradient-norm clip over all
  parameters after masking; Adam (the core's make_adam), as in the reference.
- K = ``--num-copies``, default 5 everywhere (the paper's best MT10 setting; on the toy suites
  too, so the method is the same network family on every suite; note that with K >= T each task
  could in principle own a copy).
- Evaluation: the deterministic policy of the composed network (mean action / argmax).
- Parameter counts: total = K copies of actor and critic + the [T, K] table (+ [T, A] log-std);
  active at inference = one composed network (one copy's size per layer; the w row folds into
  it) (+ its log-std row); trained per task = all K copies + the task's w row (+ its log-std row).
- Acting and evaluation reuse the composed weights of all tasks until a parameter changes
  (cleared after every update step and load); the loss composes them afresh under autograd.
- Diagnostics (``paco/``): each task's w_k and sum_k w_tk, resets per task and in total, the
  fraction of task-minibatches masked (fired or skipped) in the iteration, the mean over
  minibatches of max_t L_t / max(median, floor), and how far the copies have moved apart
  (``copy_spread``: mean over layers of ||V_k - mean_k V|| / ||mean_k V||, 0 at initialisation).
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
from shared.transfer import check_shape, init_from_base, load_shared, transfer_args
from shared.weight_cache import WeightCacheMixin

ALGO = "ppo_paco"


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
    num_copies: int = 5
    """K: parameter copies per layer that each task's vector w_t composes"""
    maskout: bool = True
    """mask out (and reset the w of) a task whose loss explodes; --no-maskout turns it off
    (paco/max_relative_loss is still logged)"""
    maskout_ratio: Optional[float] = None
    """a task fires when its loss exceeds this times max(median task |loss|, --maskout-floor);
    default 50 on the toy suites, 20 on Meta-World (SUITE_KIND_DEFAULTS)"""
    maskout_floor: float = 0.1
    """lower bound on the median |loss| used as the scale of a typical task
    (also the scale of paco/max_relative_loss)"""


OBS_NORM_PER_TASK = False  # one observation normaliser shared by all tasks

# PaCo's own defaults by kind of suite: 50 was set on cartpole-mt; the Meta-World value (mt3-tune, mt3,
# mt10, single tasks) is the mt3-tune choice by the tuning rule (README tuning table: of six settings at
# seed 1, ratios 20 and 100 led; over two seeds ratio 20 had the higher final success, 0.363 against 0.330,
# all of the difference from seed 1's resets of pick-place-wall-v3, the task with no reward signal).
SUITE_KIND_DEFAULTS = {"gym": dict(maskout_ratio=50.0), "metaworld": dict(maskout_ratio=20.0)}


def check_paco_args(args: Args) -> None:
    if args.num_copies < 1:
        raise UsageError(f"--num-copies must be at least 1, got {args.num_copies}")
    if args.maskout_ratio is not None and not args.maskout_ratio > 1.0:  # also refuses NaN
        raise UsageError(f"--maskout-ratio must be above 1 (at 1 or below a healthy median task could fire), "
                         f"got {args.maskout_ratio}; use --no-maskout to turn the mechanism off")
    if not args.maskout_floor >= 0.0:
        raise UsageError(f"--maskout-floor must be 0 or positive, got {args.maskout_floor}")
    if not args.maskout and args.maskout_ratio is not None:
        raise UsageError("--maskout-ratio does nothing with --no-maskout (no task is ever masked); drop one of them")


class CompositionalLinear(nn.Module):
    """K copies of one linear layer; task t uses weights sum_k w_tk V_k and bias sum_k w_tk b_k."""

    def __init__(self, num_copies: int, d_in: int, d_out: int, std: float):
        super().__init__()
        shared_init = layer_init(nn.Linear(d_in, d_out), std)  # one init, copied into every slot
        copies = shared_init.weight.detach().t().expand(num_copies, d_in, d_out)  # [K, d_in, d_out]
        self.weight = nn.Parameter(copies.clone())
        self.bias = nn.Parameter(shared_init.bias.detach().expand(num_copies, d_out).clone())  # [K, d_out]
        self.composed: tuple | None = None  # (key, weight, bias) for acting; see forward

    def compose(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The einsum "tk,kio->tio" written as one matmul over K (3-5x less overhead on a CPU).
        weight = (w @ self.weight.flatten(1)).view(w.shape[0], *self.weight.shape[1:])  # [T, d_in, d_out]
        return weight, (w @ self.bias).unsqueeze(1)  # [T, 1, d_out]

    def forward(self, x: torch.Tensor, w: torch.Tensor, table_version: int | None = None) -> torch.Tensor:
        """x: [T, n, d_in] task-major; w: [T, K], row t the vector of the tasks in row t of x.

        ``table_version`` (w is the whole task table, in order, without autograd: acting and
        evaluation) reuses the composed weights until a parameter changes: Agent.clear_weight_cache()
        after every optimiser step, and the version counters for in-place edits elsewhere."""
        if table_version is None or torch.is_grad_enabled():
            weight, bias = self.compose(w)
        else:
            key = (table_version, self.weight._version, self.bias._version)
            if self.composed is None or self.composed[0] != key:
                self.composed = (key, *self.compose(w))
            weight, bias = self.composed[1:]
        return torch.baddbmm(bias, x, weight)  # [T, n, d_out]


class CompositionalMLP(nn.Module):
    """Tanh MLP of CompositionalLinear layers, all composed with the same w."""

    def __init__(self, num_copies: int, sizes: list[int], out_std: float):
        super().__init__()
        self.layers = nn.ModuleList(
            CompositionalLinear(num_copies, a, b, std=out_std if i == len(sizes) - 2 else np.sqrt(2))
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)))

    def forward(self, x: torch.Tensor, w: torch.Tensor, table_version: int | None = None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, w, table_version)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


def initial_task_vectors(num_tasks: int, num_copies: int) -> torch.Tensor:
    """nn.Linear(T, K)'s default weight draw, U(-1/sqrt(T), 1/sqrt(T)), as [T, K], each row shifted to sum 1."""
    w = nn.Linear(num_tasks, num_copies, bias=False).weight.detach().t()  # [T, K]
    return w + (1.0 - w.sum(dim=1, keepdim=True)) / num_copies


class Agent(WeightCacheMixin):
    """Compositional actor and critic over the observation alone; inputs are task-major [T, n, ...]."""

    def __init__(self, obs_dim: int, act_dim: int, discrete: bool, num_tasks: int,
                 hidden_sizes: tuple[int, ...], num_copies: int):
        super().__init__()
        self.num_tasks, self.num_copies, self.discrete = num_tasks, num_copies, discrete
        self.critic = CompositionalMLP(num_copies, [obs_dim, *hidden_sizes, 1], out_std=1.0)
        self.actor = CompositionalMLP(num_copies, [obs_dim, *hidden_sizes, act_dim], out_std=0.01)
        self.actor_logstd = None if discrete else per_task(nn.Parameter(torch.zeros(num_tasks, act_dim)))
        self.w = per_task(nn.Parameter(initial_task_vectors(num_tasks, num_copies)))  # [T, K]
        # Maskout state: tasks reset in this iteration sit out its remaining minibatches.
        self.register_buffer("skipped", torch.zeros(num_tasks, dtype=torch.bool), persistent=False)  # [T]
        self.register_buffer("resets", torch.zeros(num_tasks, dtype=torch.long), persistent=False)  # [T], so far
        self.register_buffer("task_range", torch.arange(num_tasks), persistent=False)  # rows of the whole task table

    def task_vectors(self, task_ids: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        """(w rows [T, K], row t of the batch being one task (the core's layout); the table's
        version when those rows are the whole table in order, which lets acting reuse composed weights)."""
        rows = task_ids[:, 0]
        whole_table = rows.shape[0] == self.num_tasks and torch.equal(rows, self.task_range)
        return self.w[rows], (self.w._version if whole_table else None)

    def clear_weight_cache(self) -> None:
        """Called after every optimiser step (fused Adam leaves version counters alone) and load."""
        for layer in [*self.actor.layers, *self.critic.layers]:
            layer.composed = None

    def get_value(self, obs: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        return self.critic(obs, *self.task_vectors(task_ids)).squeeze(-1)  # [T, n]

    def get_action_and_value(self, obs, task_ids, action=None):
        w, version = self.task_vectors(task_ids)
        logstd = None if self.discrete else self.actor_logstd[task_ids[:, :1]]  # [T, 1, A]
        action, logprob, entropy = action_logprob_entropy(self.actor(obs, w, version), logstd, action)
        return action, logprob, entropy, self.critic(obs, w, version).squeeze(-1)

    def act_deterministic(self, obs, task_ids):
        head = self.actor(obs, *self.task_vectors(task_ids))
        return head.argmax(-1) if self.discrete else head

    def episode_boundaries(self, ended: torch.Tensor) -> None:
        """Nothing to do at episode boundaries."""

    def own_row_count(self) -> int:
        """One task's w row and log-std row."""
        return self.num_copies + (0 if self.actor_logstd is None else self.actor_logstd.shape[1])

    def active_parameter_count(self) -> int:
        # At inference sum_k w_tk V_k folds into one plain network: one copy's worth per layer,
        # plus the task's log-std row (its w row is folded away).
        layers = [*self.actor.layers, *self.critic.layers]
        return sum(layer.weight[0].numel() + layer.bias[0].numel() for layer in layers) + \
            self.own_row_count() - self.num_copies

    def trained_parameter_count(self) -> int:
        # One task's data reaches every copy (scaled by w_tk) but only its own w and log-std rows.
        layers = [*self.actor.layers, *self.critic.layers]
        return sum(layer.weight.numel() + layer.bias.numel() for layer in layers) + self.own_row_count()


def make_agent(args: Args, suite, obs_dim: int, act_dim: int, discrete: bool) -> Agent:
    check_paco_args(args)
    if args.maskout and args.maskout_ratio is None:  # the suite kind's value (args.json records it)
        args.maskout_ratio = SUITE_KIND_DEFAULTS[getattr(suite, "kind", "gym")]["maskout_ratio"]
    return Agent(obs_dim, act_dim, discrete, suite.num_tasks, args.hidden_sizes, args.num_copies)


def make_optimizer(args: Args, agent: Agent) -> torch.optim.Optimizer:
    return make_adam(agent.parameters(), args.learning_rate)


def select_run_tasks(args: Args, suite):
    return select_tasks(suite, args.tasks, args.holdout_task)


def transfer_weights(args: Args, agent: Agent, base: dict) -> dict:
    """Leave-one-out transfer into this one-task agent (shared/transfer.py): the base run's parameter
    copies; the new task's w row starts at the mean of the base run's trained rows (a composition
    between the known tasks' ones), its log-std row at --init-logstd. Under --transfer task-params only w and the
    log-std row train."""
    own = load_shared(agent, base)
    check_shape("w (one task's row)", base["w"].shape[1:], agent.w.shape[1:])
    with torch.no_grad():
        agent.w.copy_(base["w"].mean(0, keepdim=True))
    return own


def exploding_tasks(args: Args, task_losses: torch.Tensor,
                    taking_part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The maskout rule: ([T] bool, which tasks fire; max_t L_t / scale over the tasks taking part)."""
    losses = task_losses.detach()
    finite = torch.isfinite(losses)
    typical = torch.where(taking_part & finite, losses.abs(), torch.nan).nanmedian()  # NaN if none
    scale = typical.clamp(min=args.maskout_floor)
    ratio = args.maskout_ratio if args.maskout else math.inf  # --no-maskout: no ratio (nothing fires anyway)
    fires = taking_part & (~finite | (losses > ratio * scale))
    max_relative = torch.where(taking_part & finite, losses / scale, -torch.inf).max()
    return fires, max_relative


@torch.no_grad()
def reset_task_vectors(agent: Agent, optimizer, fires: torch.Tensor, healthy: torch.Tensor) -> None:
    """w_t <- a Dirichlet(1) convex combination of the healthy tasks' w, for every firing t (no host sync)."""
    fires = fires & healthy.any()  # nothing to combine: leave w as it is
    weights = torch.empty(agent.num_tasks, agent.num_tasks, device=fires.device).exponential_()  # [T, T] Exp(1)
    weights = weights * healthy  # column j: source task j; rows normalised below -> Dirichlet(1) on the healthy set
    weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)
    agent.w.copy_(torch.where(fires[:, None], weights @ agent.w, agent.w))
    for param in (agent.w, agent.actor_logstd):  # stale momentum must not move the reset task's rows
        state = optimizer.state.get(param) if param is not None else None
        if state and "exp_avg" in state:
            state["exp_avg"].masked_fill_(fires.view(-1, *([1] * (param.dim() - 1))), 0.0)
    agent.skipped |= fires
    agent.resets += fires


def method_update(args: Args, agent: Agent, optimizer, task_losses: torch.Tensor, info: dict) -> dict:
    """One gradient step on the task-stratified minibatch (task_losses is [T]) with PaCo's loss maskout."""
    if info["epoch"] == 0 and info["start"] == 0:  # a new iteration: every task takes part again
        agent.skipped.zero_()
    taking_part = ~agent.skipped
    fires, max_relative = exploding_tasks(args, task_losses, taking_part)  # logged even with --no-maskout
    if not args.maskout:
        fires = torch.zeros_like(fires)
    contributing = taking_part & ~fires  # [T]
    loss = torch.where(contributing, task_losses, 0.0).sum() / agent.num_tasks  # healthy tasks keep weight 1/T
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
    optimizer.step()
    if args.maskout:
        reset_task_vectors(agent, optimizer, fires, healthy=contributing)
    agent.clear_weight_cache()
    return {"losses/grad_norm": grad_norm,
            "paco/masked_fraction": (~contributing).float().mean(),
            "paco/max_relative_loss": max_relative}


def method_diagnostics(args: Args, agent: Agent, logger: RunLogger, global_step: int) -> dict:
    w, resets = agent.w.detach().cpu(), agent.resets.cpu()
    out = {"paco/resets_total": float(resets.sum())}
    for t, name in enumerate(logger.task_names):
        out.update({f"paco/{name}/w_{k}": float(w[t, k]) for k in range(agent.num_copies)})
        out[f"paco/{name}/w_sum"] = float(w[t].sum())
        out[f"paco/{name}/resets"] = float(resets[t])
    with torch.no_grad():
        spreads = [(layer.weight - layer.weight.mean(0)).norm() / layer.weight.mean(0).norm().clamp(min=1e-12)
                   for layer in [*agent.actor.layers, *agent.critic.layers]]
    out["paco/copy_spread"] = float(torch.stack(spreads).mean())
    return out


def method_final(args: Args, agent: Agent, final_evaluation) -> dict:
    """Extra end-of-run results for summary.json; none here."""
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
