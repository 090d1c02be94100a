"""Soft Modularization on PPO: a base network of modules, mixed per sample by a task-conditioned router.

Paper: Ruihan Yang, Huazhe Xu, Yi Wu, Xiaolong Wang. "Multi-Task Reinforcement Learning with Soft
Modularization". Advances in Neural Information Processing Systems 33 (NeurIPS 2020).

Network (one for the actor, one for the critic; they share nothing):
- state encoder ``f(s)``: a 2-layer ReLU MLP of width D; task encoder ``h(z)``: one linear layer of
  the one-hot ``z``, width D (stored as a [T, D] table plus a bias: row t is the column of the
  linear map that task t's one-hot selects);
- routing: ``p1 = W_d1 relu(f * h)``, ``p(l+1) = W_d(l+1) relu((W_u(l) p(l)) * f * h)``; each ``p(l)``
  is reshaped to n x n and softmaxed over the source modules, one row per target module;
- base: L layers of n modules of width d. Module j of layer l outputs ``relu(W_j(l) g_j(l) + b_j(l))``;
  the first layer's modules all take ``f(s)``; module i of layer l+1 takes
  ``g_i(l+1) = sum_j p(l)[i, j] relu(W_j(l) g_j(l) + b_j(l))``; the output is
  ``sum_j U_j relu(W_j(L) g_j(L) + b_j(L)) + c`` (per-module output maps U_j). So there are L - 1
  routing matrices, between consecutive layers. All modules of a layer run as one batched matmul
  over stacked weights [n, d_in, d]; the only Python loop in a forward pass is over the L layers.
The task enters only through the router: the base network sees ``f(s)`` alone.

Decisions and deviations (placed in the paper's own equations; "[PPO]" = forced by PPO):
- The paper's equations, not the official code. The official implementation differs in four
  ways that this script does not copy: (1) an extra MLP on ``f * h`` before the routing layers;
  (2) skip connections across routing layers (each routing layer is conditioned on all earlier
  routing outputs, not only the previous one); (3) linear modules whose ReLU comes after the mix
  (here each module applies its own ReLU before the mix, as the paper's equation writes);
  (4) a final routing mix that weights the last layer's n modules into one vector before a
  single output layer (here: per-module output maps, summed, which the paper's description and
  BASELINES.md ask for).
- ``W_u(l)`` reads the routing logits ``p(l)`` (before the softmax), as in the equation.
- Activations are ReLU, as in the paper (the shared-MTL reference uses CleanRL's tanh).
- Initialisation: CleanRL's orthogonal init (``layer_init``: gain sqrt(2) for hidden layers, 0.01
  for the actor's output, 1 for the critic's), applied to each module's [d_in, d] slice; the output
  maps are initialised as one orthogonal [n * d, out] matrix (the output layer over the
  concatenated last modules). The routing output layers ``W_d`` start at gain 0.01, so every task
  starts from the near-uniform mix (an equal-weight ensemble of modules) and tasks separate only as
  training asks. The task encoder's table is N(0, 1) with a zero bias, so ``f * h`` keeps the scale
  of ``f`` whatever T is (a default linear init would shrink it by 1/sqrt(T)). The paper gives none
  of these.
- Sizes (``--num-layers`` L, ``--num-modules`` n, ``--module-width`` d, ``--embedding-width`` D).
  L x n is 2 x 2 on the toy suites and 4 x 4 on Meta-World, chosen on mt3-tune (README tuning
  table; ``SUITE_KIND_DEFAULTS``); a transfer run (``--init-from``) takes L and n from its base
  run unless given. On mt10, d = 256 and D = 400, the paper's MT10 widths.
  Elsewhere d and D default to None = derived: D = d = the widest of ``--hidden-sizes`` (the
  shared-MTL MLP's width from the suite table), so that every hidden layer of SoftMod (the
  encoder's layers and each module) is as wide as the other methods' hidden layers: PROTOCOL
  section 5's "same effective network width". A ``--hidden-sizes`` other than the suite's
  (a width sweep across methods) derives D and d on mt10 too; given together with both D and d it
  would do nothing and is refused. Matching total parameters instead is not possible at D = width:
  the state encoder alone (obs_dim x D + D x D) costs about as much as the whole shared-MTL MLP, so
  no positive d would match (cartpole-mt, width 64: shared MTL 9.8k parameters in all, SoftMod's
  two state encoders alone 9.0k, SoftMod in all 43.9k). SoftMod's larger total is visible in the
  three parameter counts every run reports, and the protocol's shared-MTL baseline scaled to a
  larger count covers the count-matched reading. L < 2 or n < 2 is refused: with one layer or one
  module there is nothing to route and the network would ignore the task.
- [PPO] The paper balances task losses with SAC's per-task temperature, which PPO does not have.
  No balancing here: the update minimises the mean of the task losses, and every method gets the
  same per-task reward scaling from the protocol.
- [PPO] Continuous actions: a Gaussian with the actor's output as mean and a state-independent
  per-task log-std (as in every multi-task script), instead of SAC's tanh-squashed Gaussian with a
  state-dependent std. Evaluation acts with the mean (the argmax for discrete actions); the soft
  routing is deterministic, so evaluation runs the same network as training.
- Update: as the reference: the mean of the [T] task losses, one gradient-norm clip over all
  parameters, Adam.
- Diagnostics (tensorboard, ``softmod/``), from the routing of the update's last minibatch (the
  agent keeps those probabilities, detached): ``softmod/{actor,critic}/routing_entropy`` and its
  per-task value ``softmod/{net}/<task>/routing_entropy`` (entropy in nats of a routing row, mean
  over layers, target modules and observations; the uniform mix has log n), and
  ``softmod/{net}/routing_task_distance`` (total-variation distance between two tasks' mean routing
  rows, averaged over layers and target modules, then over all task pairs: 0 = every task routes
  alike, 1 = disjoint routes).
- Parameter counts: everything is shared except each task encoder's table (one task's one-hot
  reaches only its own row) and the log-std rows; active and trained-per-task counts both take one
  row of each. For leave-one-out transfer (PROTOCOL section 7) a task's own handle is its row of
  each task encoder's table (``task_weight``, marked per-task).

Everything between the ``PPO CORE`` markers is byte-identical to ppo_mtl_embed.py.
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
from shared.suites import (
    SUITE_DEFAULTS,
    apply_suite_defaults,
    env_seed,
    make_suite,
    make_vector_env,
    select_tasks,
    space_dims,
)
from shared.transfer import base_run_args, check_shape, init_from_base, load_shared, transfer_args

ALGO = "ppo_softmod"


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
    num_layers: Optional[int] = None
    """L: layers of modules in the base network (at least 2: the task enters only through routing between
    layers); default 2 on the toy suites, 4 on Meta-World (SUITE_KIND_DEFAULTS)"""
    num_modules: Optional[int] = None
    """n: modules per layer (at least 2: a single module leaves nothing to route); default 2 on the toy
    suites, 4 on Meta-World (SUITE_KIND_DEFAULTS)"""
    module_width: Optional[int] = None
    """d: width of each module (default: 256 on mt10 as in the paper, else the widest of --hidden-sizes)"""
    embedding_width: Optional[int] = None
    """D: width of the state and task encoders (default: 400 on mt10 as in the paper, else the widest of
    --hidden-sizes)"""
    transfer_embedding: Literal["fresh", "mean"] = "fresh"
    """with --init-from: the held-out task's embedding row starts fresh (random, as every row starts;
    PROTOCOL section 7) or at the mean of the base run's trained rows (PaCo's rule for its w)"""


OBS_NORM_PER_TASK = False  # one observation normaliser shared by all tasks

# The paper's MT10 widths (its "Shallow" setting, D = 400, d = 256; L and n come from SUITE_KIND_DEFAULTS).
PAPER_SIZES = {"mt10": dict(embedding_width=400, module_width=256)}

# Layers and modules by kind of suite: 2 x 2 (the paper's MT10 "Shallow" shape) on the toy suites; on
# Meta-World (mt3-tune, mt3, mt10, single tasks) the mt3-tune choice by the tuning rule (README tuning
# table: of six shapes at seed 1, 2 x 4 and 4 x 4 led at 0.340; over two seeds 4 x 4 had the higher
# final success), which is the paper's MT50 "Deep" shape.
SUITE_KIND_DEFAULTS = {"gym": dict(num_layers=2, num_modules=2), "metaworld": dict(num_layers=4, num_modules=4)}


def resolve_sizes(args: Args, suite) -> None:
    """Refuse size flags that cannot work and fill the defaults of L and n (by kind of suite) and the
    derived defaults of D and d."""
    for name, value in SUITE_KIND_DEFAULTS[getattr(suite, "kind", "gym")].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.num_layers < 2:
        raise UsageError(f"--num-layers {args.num_layers} leaves no routing between layers, so the network "
                         f"would ignore the task; use 2 or more")
    if args.num_modules < 2:
        raise UsageError(f"--num-modules {args.num_modules} leaves nothing to route, so the network would "
                         f"ignore the task; use 2 or more")
    check_positive(module_width=args.module_width, embedding_width=args.embedding_width)
    # --hidden-sizes only sets the derived D and d; on mt10 an untouched suite width means the paper's sizes.
    hidden_sizes_given = tuple(args.hidden_sizes) != tuple(SUITE_DEFAULTS[suite.defaults]["hidden_sizes"])
    if args.embedding_width is not None and args.module_width is not None:
        if hidden_sizes_given:
            raise UsageError("--hidden-sizes has no effect when --embedding-width and --module-width are both "
                             "given; drop one of them")
        return
    paper = {} if hidden_sizes_given else PAPER_SIZES.get(suite.env_id, {})
    if not paper and not args.hidden_sizes:
        raise UsageError("--hidden-sizes is empty, so --embedding-width and --module-width cannot be derived "
                         "from it; give both explicitly")
    if args.embedding_width is None:
        args.embedding_width = paper.get("embedding_width") or max(args.hidden_sizes)
    if args.module_width is None:
        args.module_width = paper.get("module_width") or max(args.hidden_sizes)


def stacked_modules(num_modules: int, d_in: int, d_out: int, std: float) -> tuple[nn.Parameter, nn.Parameter]:
    """One layer's n modules as a stacked weight [n, d_in, d_out] (each slice orthogonal) and bias [n, d_out]."""
    weight = torch.empty(num_modules, d_in, d_out)
    for module_weight in weight:  # initialisation only; the forward pass runs all modules at once
        torch.nn.init.orthogonal_(module_weight, std)
    return nn.Parameter(weight), nn.Parameter(torch.zeros(num_modules, d_out))


class SoftModularNet(nn.Module):
    """State encoder, task encoder, routing network and modular base network for one output head."""

    def __init__(self, obs_dim: int, out_dim: int, num_tasks: int, num_layers: int, num_modules: int,
                 module_width: int, embedding_width: int, out_std: float):
        super().__init__()
        n, d, D = num_modules, module_width, embedding_width
        self.num_tasks, self.num_layers, self.num_modules = num_tasks, num_layers, num_modules
        self.state_encoder = nn.Sequential(layer_init(nn.Linear(obs_dim, D)), nn.ReLU(),
                                           layer_init(nn.Linear(D, D)), nn.ReLU())
        # h(z) = z @ task_weight + task_bias for a one-hot z: task t's row is its column of the linear map.
        self.task_weight = per_task(nn.Parameter(torch.randn(num_tasks, D)))  # [T, D]
        self.task_bias = nn.Parameter(torch.zeros(D))
        # Routing: W_d(l) maps to the n x n logits of the mix after layer l; W_u(l) feeds p(l) into p(l+1).
        self.route_down = nn.ModuleList(layer_init(nn.Linear(D, n * n), std=0.01) for _ in range(num_layers - 1))
        self.route_up = nn.ModuleList(layer_init(nn.Linear(n * n, D)) for _ in range(num_layers - 2))
        stacks = [stacked_modules(n, D if layer == 0 else d, d, np.sqrt(2)) for layer in range(num_layers)]
        weights, biases = zip(*stacks, strict=True)
        self.module_weight = nn.ParameterList(weights)  # L x [n, d_in, d]
        self.module_bias = nn.ParameterList(biases)  # L x [n, d]
        out_weight = torch.empty(n * d, out_dim)
        torch.nn.init.orthogonal_(out_weight, out_std)  # one output layer over the concatenated last modules
        self.out_weight = nn.Parameter(out_weight.view(n, d, out_dim))  # [n, d, out]: module j's output map U_j
        self.out_bias = nn.Parameter(torch.zeros(out_dim))

    def forward(self, obs: torch.Tensor, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs [T, N, obs_dim], task_ids [T, N] -> (output [T, N, out], routing [L-1, T, N, n, n]).

        ``routing[l, ..., i, j]`` is the weight of source module j in target module i's input."""
        n = self.num_modules
        f = self.state_encoder(obs)  # [T, N, D]
        h = nn.functional.one_hot(task_ids, self.num_tasks).to(obs.dtype) @ self.task_weight + self.task_bias
        fh = f * h  # [T, N, D]
        logits = self.route_down[0](torch.relu(fh))  # [T, N, n * n]
        routing = [logits]
        for layer in range(1, self.num_layers - 1):
            logits = self.route_down[layer](torch.relu(self.route_up[layer - 1](logits) * fh))
            routing.append(logits)
        routing = torch.softmax(torch.stack(routing).unflatten(-1, (n, n)), dim=-1)  # [L-1, T, N, n, n]

        x = torch.relu(torch.einsum("tbi,mio->tbmo", f, self.module_weight[0]) + self.module_bias[0])  # [T, N, n, d]
        for layer in range(1, self.num_layers):
            g = routing[layer - 1] @ x  # [T, N, n, d]: target i gets sum_j p[i, j] x_j
            x = torch.relu(torch.einsum("tbmi,mio->tbmo", g, self.module_weight[layer]) + self.module_bias[layer])
        out = torch.einsum("tbmi,mio->tbo", x, self.out_weight) + self.out_bias  # [T, N, out]
        return out, routing


class Agent(nn.Module):
    """Separate soft-modular actor and critic; inputs are task-major [T, n, ...]."""

    def __init__(self, obs_dim: int, act_dim: int, discrete: bool, num_tasks: int, num_layers: int,
                 num_modules: int, module_width: int, embedding_width: int):
        super().__init__()
        self.num_tasks, self.discrete = num_tasks, discrete
        sizes = dict(num_tasks=num_tasks, num_layers=num_layers, num_modules=num_modules,
                     module_width=module_width, embedding_width=embedding_width)
        self.actor = SoftModularNet(obs_dim, act_dim, out_std=0.01, **sizes)
        self.critic = SoftModularNet(obs_dim, 1, out_std=1.0, **sizes)
        self.actor_logstd = None if discrete else per_task(nn.Parameter(torch.zeros(num_tasks, act_dim)))
        # Detached routing of the latest update minibatch, read by method_diagnostics.
        self.last_routing: dict[str, torch.Tensor] = {}

    def get_value(self, obs: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        return self.critic(obs, task_ids)[0].squeeze(-1)  # [T, n]

    def get_action_and_value(self, obs, task_ids, action=None):
        head, actor_routing = self.actor(obs, task_ids)
        value, critic_routing = self.critic(obs, task_ids)
        if torch.is_grad_enabled():  # an update minibatch (rollouts and evaluation run in inference mode)
            self.last_routing = {"actor": actor_routing.detach(), "critic": critic_routing.detach()}
        logstd = None if self.discrete else self.actor_logstd[task_ids[:, :1]]  # [T, 1, A]
        action, logprob, entropy = action_logprob_entropy(head, logstd, action)
        return action, logprob, entropy, value.squeeze(-1)

    def act_deterministic(self, obs, task_ids):
        head = self.actor(obs, task_ids)[0]
        return head.argmax(-1) if self.discrete else head

    def routing(self, obs: torch.Tensor, task_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Routing probabilities of actor and critic, each [L-1, T, N, n, n]."""
        return {"actor": self.actor(obs, task_ids)[1], "critic": self.critic(obs, task_ids)[1]}

    def episode_boundaries(self, ended: torch.Tensor) -> None:
        """Nothing to do at episode boundaries (VarShare's per-episode weight sampling uses this)."""

    def trained_parameter_count(self) -> int:
        # Everything is shared except the task encoders' tables (another task's row multiplies a zero
        # of the one-hot) and the log-std rows: one task's data reaches one row of each.
        total = sum(p.numel() for p in self.parameters())
        t = self.num_tasks
        unused = (t - 1) * (self.actor.task_weight.shape[1] + self.critic.task_weight.shape[1])
        unused += 0 if self.actor_logstd is None else (t - 1) * self.actor_logstd.shape[1]
        return total - unused

    def active_parameter_count(self) -> int:
        return self.trained_parameter_count()


def make_agent(args: Args, suite, obs_dim: int, act_dim: int, discrete: bool) -> Agent:
    return Agent(obs_dim, act_dim, discrete, suite.num_tasks, args.num_layers, args.num_modules,
                 args.module_width, args.embedding_width)


def make_optimizer(args: Args, agent: Agent) -> torch.optim.Optimizer:
    return make_adam(agent.parameters(), args.learning_rate)


def select_run_tasks(args: Args, suite):
    # The first hook after the suite defaults are in args: check and derive the sizes before any env exists.
    if args.init_from is not None:  # a transfer run keeps the base run's shape unless given (as --hidden-sizes)
        base = base_run_args(args.init_from)
        for name in SUITE_KIND_DEFAULTS["gym"]:
            if getattr(args, name) is None and base.get(name) is not None:
                setattr(args, name, base[name])
    resolve_sizes(args, suite)
    if args.transfer_embedding != "fresh" and args.init_from is None:
        raise UsageError("--transfer-embedding says where a transfer run's new embedding row starts; it needs "
                         "--init-from BASE_RUN_DIR")
    return select_tasks(suite, args.tasks, args.holdout_task)


def transfer_weights(args: Args, agent: Agent, base: dict) -> dict:
    """Leave-one-out transfer into this one-task agent (shared/transfer.py): the base run's encoders,
    routing and modules; the new task's embedding rows (actor and critic) keep a fresh agent's random
    start (as every task's row starts), or with --transfer-embedding mean start at the mean of the base
    run's trained rows; its log-std row at --init-logstd. Under --transfer task-params only those train."""
    own = load_shared(agent, base)
    if args.transfer_embedding == "mean":
        with torch.no_grad():
            for net in ("actor", "critic"):
                rows, own_row = base[f"{net}.task_weight"], agent.get_submodule(net).task_weight
                check_shape(f"{net}.task_weight (one task's row)", rows.shape[1:], own_row.shape[1:])
                own_row.copy_(rows.mean(0, keepdim=True))
    return own


def method_update(args: Args, agent: Agent, optimizer, task_losses: torch.Tensor, info: dict) -> dict:
    """One gradient step on the task-stratified minibatch: task_losses is [T]. No task-loss balancing."""
    loss = task_losses.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
    optimizer.step()
    return {"losses/grad_norm": grad_norm}


def routing_statistics(routing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """routing [L-1, T, N, n, n] -> (per-task entropy of a routing row [T], task-pair distance [T, T]).

    Entropy: mean over layers, target modules and observations. Distance: total variation between two
    tasks' mean routing rows (mean over observations first), averaged over layers and target modules."""
    entropy = -(routing * routing.clamp_min(1e-12).log()).sum(-1).mean(dim=(0, 2, 3))  # [T]
    mean_routing = routing.mean(dim=2)  # [L-1, T, n, n]
    difference = mean_routing[:, :, None] - mean_routing[:, None, :]  # [L-1, T, T, n, n]
    distance = 0.5 * difference.abs().sum(-1).mean(dim=(0, 3))  # [T, T]
    return entropy, distance


def method_diagnostics(args: Args, agent: Agent, logger: RunLogger, global_step: int) -> dict:
    out = {}
    for net, routing in agent.last_routing.items():
        entropy, distance = routing_statistics(routing)
        out[f"softmod/{net}/routing_entropy"] = float(entropy.mean())
        for name, value in zip(logger.task_names, entropy.tolist(), strict=True):
            out[f"softmod/{net}/{name}/routing_entropy"] = value
        num_tasks = distance.shape[0]
        if num_tasks > 1:
            pairs = torch.triu_indices(num_tasks, num_tasks, offset=1)
            out[f"softmod/{net}/routing_task_distance"] = float(distance[pairs[0], pairs[1]].mean())
    return out


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
