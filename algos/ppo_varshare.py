"""VarShare: variational weight-space task residuals on PPO; and its L2Soft ablation (--residual l2).

Source: the project's research proposal, "VarShare: Principled Task-Specialization via
Variational Weight Adapters in Multi-Task RL" (November 2025); ../shared/spec/VARSHARE.md and
context/varshare.md restate it. Flipout: Wen, Vicol, Ba, Tran, Grosse, "Flipout: Efficient
Pseudo-Independent Weight Perturbations on Mini-Batches", ICLR 2018. Bayes by Backprop (the
softplus parameterisation and the closed-form Gaussian KL): Blundell, Cornebise, Kavukcuoglu,
Wierstra, "Weight Uncertainty in Neural Networks", ICML 2015.

Every linear layer of actor and critic (hidden layers and heads) runs task m with
W_m = theta + phi_m; phi_m ~ q_m = N(mu_m, softplus(rho_m)^2), prior N(0, sigma_prior^2).
The network input is the observation alone: the task enters only through its residual
(--task-input onehot adds shared MTL's one-hot input to theta, a comparison behind a flag).
This script is ppo_mtl_embed.py with that network and one loss term; the PPO core between the
markers is byte-identical.

Decisions (each a flag; default first):
- Residuals on weights only; biases shared (--residual-bias adds residuals to biases).
- Task input: none (the spec's VarShare: the observation alone). --task-input onehot gives the
  shared network shared MTL's one-hot task input: the first actor and critic layers get one column
  per task, stored as a per-task bias row added after the layer (a one-hot column times the one-hot
  is that row, so no [T, n, T] input is built), initialised as shared MTL's columns (one orthogonal
  draw over observation and task columns) and trained like theta, without residual or KL. It
  tests whether VarShare's `mt3` deficit is the task identity its small residuals cannot carry (at
  the default prior it scores like a task-blind shared MTL there). Measured at 3M steps, it is not:
  with the flag 0.347 and 0.340, without 0.327 and 0.347 (README, `mt3` at 3M). Off by default.
- theta initialised as the shared baseline's layers (orthogonal, CleanRL gains); mu = 0.
- Prior std per layer, scaled with fan-in (--prior-scaling fan-in): sigma_prior_l =
  --sigma-prior-gain / sqrt(fan_in_l), default gain 0.24 on the toy suites and 0.03 on Meta-World
  (chosen on mt3-tune at 2M steps, where gains 0.06 and 0.12 kept the clip fraction up to 2.4x and
  5x shared MTL's once sigma reached the prior). A weight
  noise sigma adds to a unit's pre-activation a noise of std about sigma * sqrt(fan_in) * rms(x),
  so under this rule the noise is about gain * rms(x) at every width (0.24 / sqrt(64) = 0.03, the
  absolute value chosen on the 64-wide toy suites). --prior-scaling absolute --sigma-prior s gives
  every layer s (the earlier behaviour at s = 0.03). The initial sigma is --sigma-init-ratio
  (1/30) times the layer's prior std; args.json records the per-layer values
  (sigma_prior_per_layer). --beta 1 on the toy suites, 0.0003 on Meta-World (mt3-tune, with the
  prox prior step below).
- Loss: ppo_loss + beta * mean_over_tasks(KL_m) / N_m, N_m = num_envs_per_task * num_steps,
  the transitions of one task in one rollout (--kl-scale per-rollout; alternatives: sum,
  per-param). The term is added on every minibatch, matching the per-example ELBO weighting
  of a minibatch mean.
- Gradient: the PPO loss's gradient is clipped to --max-grad-norm first (one norm over all
  parameters, as in every method), then the KL's gradient is added, scaled by the same clip
  coefficient c = min(1, max_grad_norm / ||g_RL||) (--reg-grad-scale rl-clip): every parameter
  then moves along c * (g_RL + g_KL), the ELBO's gradient with beta exact, and the KL, which
  touches only mu and rho, can never shrink theta's RL gradient (clipping the sum could).
  --reg-grad-scale none adds the KL's gradient unscaled after the clip: the effective beta is
  then beta / c and drifts with the RL gradient's norm (logged as varshare/effective_beta and
  varshare/rl_clip_factor).
- Prior step (--prior-step; gradient on the toy suites, prox on Meta-World): gradient adds the
  pull's mu-gradient, k * mu with
  k = beta / sigma_prior^2 per entry (times the loss's scale), to the RL gradient before Adam. At
  the Meta-World prior (sigma_prior about 0.002) k is so stiff that the pull dominates Adam's
  second moment for mu, and Adam's normalised steps make mu step back and forth around its tiny
  stationary point: on mt3-tune at beta 0.3 (the earlier default), each of mu's steps is 0.3-1.1x theta's, but over
  five iterations mu's net move is 0.2-2% of its path against 25-40% for theta
  (benchmarks/varshare_step_split.py), so the acting weights theta + mu carry a perturbation as
  large as the learning step that goes nowhere. prox lets Adam step mu on the RL gradient alone
  and then applies the pull implicitly at Adam's per-entry step size (prior_prox_step): the same
  stationary point, no oscillation, no new knob. Over the same first 36k steps mu's step is then
  0.02-0.2x theta's in the hidden layers and 0.4-0.55x in the heads (0.3-1.1x with gradient); what
  is left is mu following the noisy RL gradient's mean. The pull on rho stays a gradient. Cost:
  a few elementwise passes over mu after each step; `benchmarks/update_cost.py --scripts
  ppo_varshare ppo_varshare:prior_step=prox` (10 rounds, beside two training runs): MT10 shape 842
  against 884 ms a minibatch update (no difference within the noise), cartpole-mt shape 40 against
  32 ms (its small tensors pay per operation). Meta-World's default pairs prox with beta 0.0003,
  a pull 1000x weaker than the earlier 0.3 (at 0.3 prox left the residuals at 0.0002 of theta:
  task-blind). At that beta the KL's pull on rho is too weak to move sigma off its initial 1/30
  of the prior within 2M steps, so the weight noise plays no part and VarShare acts as a
  prox-pulled residual on mu (README, "What the prior's pull does to mu under Adam").
- Estimator in the loss: Flipout (--estimator flipout): one eps per task, layer and minibatch,
  random sign vectors per example; --estimator reparam draws one weight per task per minibatch.
- Acting: mean weights theta + mu_m (--rollout-weights mean). The PPO ratio then compares the
  noisy-weight policy in the loss with the mean-weight policy that acted; the clip bounds the gap.
  --rollout-weights episode draws one weight sample per env per episode and stores that policy's
  log-probabilities as the behaviour log-probabilities (an ablation).
- Evaluation: mean weights; --eval-sample-weights N runs N evaluations, each with one weight
  sample per task, and averages them.
- L2Soft (--residual l2): phi_m = mu_m, penalty lambda * ||mu_m||^2 scaled exactly as the KL;
  default lambda = beta / (2 sigma_prior^2) per layer, the matched setting (with sigma fixed at
  sigma_prior the KL's mu-gradient is then identical). Flags that need weight noise are refused.
- --prune-threshold t: after training, a second final evaluation with |mu| < t zeroed;
  summary.json reports the pruned fraction, both scores and the sparse stored size.
- Diagnostics under varshare/: per task KL, mean |mu|, mean sigma, ||mu_m|| / ||theta|| overall
  and per layer, fraction of |mu| below the pruning threshold (1e-3 when none is set); across
  tasks the mean pairwise cosine of the flattened mu; per update the scaled term and its ratio
  to the PPO loss. summary.json keeps the final per-layer ratios ("residual_ratios") for the report.
- Performance: all tasks run as one batched matmul over the task axis. Acting uses theta + mu,
  cached between parameter changes: one batched matmul per layer, which must still read T
  weight matrices (at the MT10 shape a rollout step takes about 4x the shared baseline's).
  In the loss, the Flipout and reparam layers are autograd Functions with a hand-written
  backward (tested against autograd); softplus(rho) and sigmoid(rho) are computed once per step
  and shared with the KL gradient; Flipout's signs come ten to a random 10-bit number, read
  from a table, as two contiguous blocks. eps, theta + mu, sigma * eps, sigma and sigmoid(rho)
  go into per-layer tensors allocated once (a second loss forward before the first one's
  backward makes that backward refuse). The KL gradient is added in place (add with alpha,
  addcmul, addcdiv, no temporaries) before the one pass that scales every gradient by the RL
  clip coefficient, which a CPU skips when nothing is clipped. At the MT10 shape on a 2-core
  CPU (torch threads 1, under load) these took the minibatch update from 3.7-4.4x the shared
  baseline's to 3.5-3.8x, and from 1.56-1.63x the estimator's floor
  (benchmarks/varshare_cost_floor.py: its matmuls, normal draws and Adam step) to 1.37-1.56x.
  The rest is elementwise work over the [T, d_in, d_out] tensors that eager PyTorch runs one
  pass per operation (softplus and sigmoid alone about 6% of the update), the activations and
  loss the shared baseline also pays, and the sign draws;
  ``varshare_cost_floor.py --profile 10`` prints the split. With --rollout-weights episode the
  per-env sampled weights are cached too: an episode end rebuilds only its env's rows
  (MT10-shaped rollout step 157 ms -> 11 ms; mean weights take 8 ms).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable, Literal, Optional

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
from shared.transfer import base_run_args, init_from_base, load_shared, transfer_args
from shared.weight_cache import WeightCacheMixin

ALGO = "ppo_varshare"


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
    residual: Literal["variational", "l2"] = "variational"
    """variational: VarShare (Gaussian residuals, KL to the prior); l2: L2Soft (deterministic residuals, L2 penalty)"""
    beta: Optional[float] = None
    """weight of the KL term (ELBO weighting of one rollout's data against the prior at kl-scale per-rollout);
    default 1 on the toy suites, 0.0003 on Meta-World (SUITE_KIND_DEFAULTS)"""
    prior_scaling: Literal["fan-in", "absolute"] = "fan-in"
    """fan-in: a layer's prior std is --sigma-prior-gain / sqrt(fan_in), so the noise a residual adds to a
    pre-activation does not grow with width; absolute: --sigma-prior for every layer"""
    sigma_prior_gain: Optional[float] = None
    """fan-in scaling: prior std of a layer = gain / sqrt(fan_in); default 0.24 on the toy suites (0.03 for a
    64-wide layer), 0.03 on Meta-World (SUITE_KIND_DEFAULTS)"""
    sigma_prior: Optional[float] = None
    """absolute scaling: prior std of every residual entry (default 0.03)"""
    sigma_init_ratio: float = 1 / 30
    """initial sigma of every residual entry as a fraction of its layer's prior std (1/30: 1e-3 under 0.03)"""
    prior_step: Optional[Literal["gradient", "prox"]] = None
    """how the prior's pull on mu enters the update: gradient (its gradient joins the RL gradient in Adam,
    as the loss is written); prox (Adam steps mu on the RL gradient alone, then the pull is applied exactly
    at Adam's per-entry step size; same stationary point, without the oscillation a stiff pull gets from
    Adam's normalised steps). Default: gradient on the toy suites, prox on Meta-World (SUITE_KIND_DEFAULTS)"""
    reg_grad_scale: Literal["rl-clip", "none"] = "rl-clip"
    """rl-clip: the regulariser's gradient is scaled by the RL gradient's clip coefficient, so every update
    keeps the ELBO's ratio of RL to KL gradient (beta exact); none: added unscaled after the clip (the
    effective beta is then beta x max(1, ||g_RL|| / max_grad_norm))"""
    kl_scale: Literal["per-rollout", "sum", "per-param"] = "per-rollout"
    """KL_m divided by the task's transitions per rollout N_m, not divided, or divided by the residual count"""
    estimator: Literal["flipout", "reparam"] = "flipout"
    """weight-noise estimator in the loss: Flipout (decorrelated per example) or one sample per task per minibatch"""
    rollout_weights: Literal["mean", "episode"] = "mean"
    """act with theta + mu (mean), or with one weight sample per env per episode (parameter-space exploration)"""
    eval_sample_weights: int = 0
    """0: evaluate with mean weights; N > 0: N evaluations, each with one weight sample per task, averaged"""
    l2_lambda: Optional[float] = None
    """L2Soft penalty weight; default: the matched beta / (2 sigma_prior^2)"""
    residual_bias: bool = False
    """give biases a residual too (default: biases are shared)"""
    prune_threshold: Optional[float] = None
    """after training, also evaluate with residual entries |mu| < threshold set to zero"""
    task_input: Literal["none", "onehot"] = "none"
    """none: the observation is the network's only input (the spec's VarShare); onehot: the shared network
    also reads shared MTL's one-hot task input (a per-task row of the first layers, no residual or KL)"""


OBS_NORM_PER_TASK = False  # one observation normaliser shared by all tasks


DEFAULT_SIGMA_PRIOR_GAIN = 0.24  # fan-in scaling: 0.24 / sqrt(64) = 0.03, the value chosen on the toy suites
# VarShare's own defaults by kind of suite: the toy values were chosen on the toy suites, the
# Meta-World ones (mt3-tune, mt3, mt10, single tasks) on mt3-tune at 2M steps (README tuning table).
# Gain: of five gain x beta settings, only 0.03 kept the clip fraction within 1.5x shared MTL's once
# sigma reached its equilibrium. Prior step and beta: the prox step at beta 0.0003 had a final success
# of 0.527 / 0.313 (seeds 1 / 2, mean 0.420) against 0.280 / 0.400 (mean 0.340) for the gradient step
# at beta 0.3, the earlier default; at beta 0.3 prox left the residuals task-blind, and the gradient
# step at beta 0.0003 stalled on push-wall (one seed).
SUITE_KIND_DEFAULTS = {"gym": dict(sigma_prior_gain=DEFAULT_SIGMA_PRIOR_GAIN, beta=1.0, prior_step="gradient"),
                       "metaworld": dict(sigma_prior_gain=0.03, beta=0.0003, prior_step="prox")}
DEFAULT_SIGMA_PRIOR = 0.03  # absolute scaling
# L2Soft's lambda tuned on mt3-tune (README tuning table: x0.03 to x10 of 1 / (2 sigma_prior^2) at gain
# 0.12; x3 had the best final success over two seeds), as flags: the matrix's l2soft-tuned row. It was
# tuned with the gradient step and keeps it. The toy suites have no tuned lambda (their L2Soft is the
# matched one, --residual l2 alone).
L2SOFT_TUNED = {"metaworld": ("--sigma-prior-gain", "0.12", "--beta", "3", "--prior-step", "gradient")}


def softplus_inverse(x: float) -> float:
    return float(np.log(np.expm1(x)))


def layer_prior_std(args: Args, fan_in: int) -> float:
    """The prior std of one layer's residual entries. A weight noise sigma adds to a unit's
    pre-activation a noise of std about sigma * sqrt(fan_in) * rms(x): under fan-in scaling that
    is gain * rms(x) at every width, under absolute scaling it grows as sqrt(fan_in)."""
    if args.prior_scaling == "absolute":
        return args.sigma_prior if args.sigma_prior is not None else DEFAULT_SIGMA_PRIOR
    return args.sigma_prior_gain / math.sqrt(fan_in)  # resolved by make_agent (SUITE_KIND_DEFAULTS)


SIGN_BITS = 10  # signs per random draw: a 1,024 x 10 table (40 KB) stays in cache; wider tables did not pay
# Row w holds the SIGN_BITS bits of the number w as signs: bit j set -> -1, clear -> +1. One copy
# per device and dtype, made on first use (not a host-to-device copy on every draw).
WORD_SIGNS = {(torch.device("cpu"), torch.float32):
              ((torch.arange(2**SIGN_BITS)[:, None] >> torch.arange(SIGN_BITS)) & 1).float().mul_(-2).add_(1)}


def random_signs(shape, like: torch.Tensor) -> torch.Tensor:
    """Independent +-1 entries (Flipout's sign vectors): SIGN_BITS from each uniform random
    SIGN_BITS-bit number, read from a table. On a CPU that is about 6x cheaper than one random
    draw per sign, and 30% cheaper than eight signs per random byte (the draws are half the cost)."""
    key = (like.device, like.dtype)
    if key not in WORD_SIGNS:
        WORD_SIGNS[key] = WORD_SIGNS[(torch.device("cpu"), torch.float32)].to(like.device, like.dtype)
    count = math.prod(shape)
    words = torch.randint(0, 2**SIGN_BITS, (-(-count // SIGN_BITS),), device=like.device, dtype=torch.int32)
    signs = WORD_SIGNS[key].index_select(0, words)  # [count / SIGN_BITS, SIGN_BITS]
    return signs.view(-1)[:count].view(shape)


def work_tensor(work: dict[str, torch.Tensor] | None, name: str) -> torch.Tensor | None:
    """The preallocated output ``name`` of VarShareLinear.loss_work, or None (a fresh tensor)."""
    return None if work is None else work[name]


class FlipoutMatmul(torch.autograd.Function):
    """Flipout for all tasks at once, with a hand-written backward.

    y = x @ (theta + mu_t) + bias + ((x * s_in) @ (sigma_t * eps_t)) * s_out, sigma_t = softplus(rho_t).
    Same numbers as autograd through that expression (a test checks it), with fewer passes over
    the [T, d_in, d_out] tensors: the weight gradient goes to mu as it is (no copy), theta gets
    its sum over tasks, and rho's gradient is (dL/d delta) * eps * sigmoid(rho) in one product
    instead of autograd's mul and softplus backward. ``sigma`` and ``slope`` = sigmoid(rho) come
    from VarShareLinear.sigma_and_slope, which the KL gradient reuses. theta + mu and sigma * eps
    are written into the layer's work tensors ``work`` (VarShareLinear.loss_work) when given."""

    @staticmethod
    def forward(ctx, x, theta, mu, rho, bias, sigma, slope, eps, s_in, s_out, work=None):
        weight = torch.add(theta, mu, out=work_tensor(work, "weight"))  # [T, d_in, d_out]
        delta = torch.mul(sigma, eps, out=work_tensor(work, "delta"))
        x_in = x * s_in  # [T, n, d_in]
        y = torch.baddbmm(bias, x, weight)
        y.addcmul_(torch.bmm(x_in, delta), s_out)
        ctx.save_for_backward(x, weight, delta, x_in, s_in, s_out, eps, slope)
        ctx.bias_shape = bias.shape
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # the saved weights carry no graph
    def backward(ctx, grad_y):
        x, weight, delta, x_in, s_in, s_out, eps, slope = ctx.saved_tensors
        grad_out = grad_y * s_out
        grad_x = grad_theta = grad_mu = grad_rho = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(grad_y, weight.transpose(1, 2))
            grad_x.addcmul_(torch.bmm(grad_out, delta.transpose(1, 2)), s_in)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_mu = torch.bmm(x.transpose(1, 2), grad_y)  # [T, d_in, d_out]
            grad_theta = grad_mu.sum(0)
        if ctx.needs_input_grad[3]:
            grad_rho = torch.bmm(x_in.transpose(1, 2), grad_out).mul_(eps).mul_(slope)
        if ctx.needs_input_grad[4]:
            grad_bias = grad_y.sum_to_size(ctx.bias_shape)
        grads = grad_x, grad_theta, grad_mu, grad_rho, grad_bias, None, None, None, None, None, None
        return grads[:len(ctx.needs_input_grad)]  # one per argument given (work is optional)


class ReparamMatmul(torch.autograd.Function):
    """One weight sample per task: y = x @ (theta + mu_t + sigma_t * eps_t) + bias, with the
    hand-written backward of FlipoutMatmul's kind (a test checks it against autograd); the weight
    is written into the layer's work tensor ``work["weight"]`` when given."""

    @staticmethod
    def forward(ctx, x, theta, mu, rho, bias, sigma, slope, eps, work=None):
        weight = torch.add(theta, mu, out=work_tensor(work, "weight")).addcmul_(sigma, eps)  # [T, d_in, d_out]
        y = torch.baddbmm(bias, x, weight)
        ctx.save_for_backward(x, weight, eps, slope)
        ctx.bias_shape = bias.shape
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # the saved weights carry no graph
    def backward(ctx, grad_y):
        x, weight, eps, slope = ctx.saved_tensors
        grad_x = grad_theta = grad_mu = grad_rho = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(grad_y, weight.transpose(1, 2))
        grad_weight = torch.bmm(x.transpose(1, 2), grad_y)
        if ctx.needs_input_grad[3]:
            grad_rho = torch.mul(grad_weight, eps).mul_(slope)  # one new tensor, not two
        grad_theta, grad_mu = grad_weight.sum(0), grad_weight
        if ctx.needs_input_grad[4]:
            grad_bias = grad_y.sum_to_size(ctx.bias_shape)
        grads = grad_x, grad_theta, grad_mu, grad_rho, grad_bias, None, None, None, None
        return grads[:len(ctx.needs_input_grad)]


class VarShareLinear(nn.Module):
    """y = x (theta + phi_t) + b for every task t at once on task-major input x [T, n, d_in].

    theta [d_in, d_out] is shared; the residual phi_t ~ N(mu_t, softplus(rho_t)^2) (variational) or
    phi_t = mu_t (l2). How the weight is drawn is chosen by ``mode``:
    - "mean": theta + mu_t (acting, evaluation); cached until a parameter changes;
    - "flipout": mean part plus Flipout noise ((x * s_in) @ (sigma * eps)) * s_out, one eps per
      task and minibatch, random signs per example (decorrelated noise across examples);
    - "reparam": theta + mu_t + sigma_t * eps_t, one sample per task per minibatch;
    - "fixed": a weight sample per row held in ``self.fixed_eps`` ([R, d_in, d_out] with R = T
      or T * k rows; episode-wise rollout sampling and sampled-weight evaluation).
    """

    def __init__(self, num_tasks: int, d_in: int, d_out: int, std: float, variational: bool,
                 sigma_prior: float, sigma_init: float, residual_bias: bool):
        super().__init__()
        self.num_tasks, self.variational = num_tasks, variational
        self.sigma_prior = sigma_prior  # std of the zero-mean Gaussian prior on this layer's residual entries
        rho_init = softplus_inverse(sigma_init)
        theta = torch.empty(d_out, d_in)
        torch.nn.init.orthogonal_(theta, std)  # the shared baseline's init (CleanRL gains)
        self.theta = nn.Parameter(theta.T.contiguous())  # [d_in, d_out]
        self.bias = nn.Parameter(torch.zeros(d_out))
        self.mu = per_task(nn.Parameter(torch.zeros(num_tasks, d_in, d_out)))  # [T, d_in, d_out]
        self.rho = per_task(nn.Parameter(torch.full((num_tasks, d_in, d_out), rho_init))) if variational else None
        self.mu_bias = per_task(nn.Parameter(torch.zeros(num_tasks, 1, d_out))) if residual_bias else None
        self.rho_bias = (per_task(nn.Parameter(torch.full((num_tasks, 1, d_out), rho_init)))
                         if residual_bias and variational else None)
        self.fixed_eps: torch.Tensor | None = None
        self.fixed_eps_bias: torch.Tensor | None = None
        self._mean_cache: torch.Tensor | None = None
        self._sigma_cache: tuple | None = None
        self._loss_work: dict[str, torch.Tensor] | None = None
        self._fixed_cache: tuple | None = None
        self.prune_mask: torch.Tensor | None = None  # evaluation only: residual entries kept

    def residual_mean(self) -> torch.Tensor:
        return self.mu if self.prune_mask is None else self.mu * self.prune_mask

    def mean_weight(self) -> torch.Tensor:
        """theta + mu_t for all tasks, [T, d_in, d_out]. Without autograd (acting, evaluation) it is
        cached; Agent.clear_weight_cache() drops the cache whenever the parameters change."""
        if torch.is_grad_enabled():
            return self.theta + self.residual_mean()
        if self._mean_cache is None:
            self._mean_cache = self.theta + self.residual_mean()
        return self._mean_cache

    def bias_mean(self) -> torch.Tensor:
        return self.bias if self.mu_bias is None else self.bias + self.mu_bias  # [d_out] or [T, 1, d_out]

    def sigma(self) -> torch.Tensor:
        return self.sigma_and_slope()[0]

    def sigma_and_slope(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(softplus(rho), sigmoid(rho)) without autograd, shared by the loss's forward and the KL
        gradient after it, written into the layer's work tensors (loss_work). Agent.clear_weight_cache()
        drops them after every optimiser step (fused Adam may leave version counters alone); the
        version check catches in-place edits elsewhere. The values are good until the next call after
        rho changes: a caller that keeps them longer must copy them."""
        cache = self._sigma_cache
        if cache is None or cache[0] != self.rho._version:
            with torch.no_grad():
                if torch.is_inference_mode_enabled():  # inference tensors could not enter the loss: no cache
                    return nn.functional.softplus(self.rho), torch.sigmoid(self.rho)
                work = self.loss_work()
                cache = (self.rho._version, torch.ops.aten.softplus.out(self.rho, 1.0, 20.0, out=work["sigma"]),
                         torch.sigmoid(self.rho, out=work["slope"]))
            self._sigma_cache = cache
        return cache[1], cache[2]

    def loss_work(self) -> dict[str, torch.Tensor]:
        """Tensors of mu's shape [T, d_in, d_out] that the loss's forward writes on every minibatch
        (eps, theta + mu, sigma * eps, sigma, sigmoid(rho)), allocated once. Fresh allocations of
        this size cost page faults and cold cache lines on every step (at the MT10 shape about a
        tenth of the update). Reuse cannot silently corrupt a gradient: writing into a tensor that
        a pending backward saved advances its version counter, and autograd then refuses to run
        that backward (a test checks it)."""
        work = self._loss_work
        if work is None or work["eps"].shape != self.mu.shape or work["eps"].device != self.mu.device \
                or work["eps"].dtype != self.mu.dtype:
            with torch.no_grad():
                work = {name: torch.empty_like(self.mu) for name in ("eps", "weight", "delta", "sigma", "slope")}
            self._loss_work = work
        return work

    def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "mean" or not self.variational:
            return torch.baddbmm(self.bias_mean().expand(x.shape[0], 1, -1), x, self.mean_weight())
        if mode == "reparam":  # one weight sample per task: theta + mu + sigma * eps
            sigma, slope = self.sigma_and_slope()
            work = self.loss_work()
            eps = work["eps"].normal_()  # [T, d_in, d_out]; the numbers randn_like would draw
            return ReparamMatmul.apply(x, self.theta, self.mu, self.rho, self.noisy_bias(x.shape[0]), sigma, slope,
                                       eps, work)
        if mode == "flipout":
            sigma, slope = self.sigma_and_slope()
            work = self.loss_work()
            eps = work["eps"].normal_()  # [T, d_in, d_out], one draw per task; the numbers randn_like would draw
            T, n, d_in = x.shape
            # One draw for both, split into two contiguous blocks: slices along the last axis would
            # leave both strided, and every product with them slower.
            signs = random_signs((T * n * (d_in + self.mu.shape[2]),), x)
            s_in, s_out = signs[:T * n * d_in].view(T, n, d_in), signs[T * n * d_in:].view(T, n, -1)
            return FlipoutMatmul.apply(x, self.theta, self.mu, self.rho, self.noisy_bias(x.shape[0]), sigma, slope,
                                       eps, s_in, s_out, work)
        if mode == "fixed":  # x: [T, k, d_in] with one weight sample per (task, env) row
            T, k, d_in = x.shape
            weight = self.fixed_weight(k)  # [T * k, d_in, d_out]
            bias = self.bias_mean()
            if self.mu_bias is not None:
                bias = bias.repeat_interleave(k, dim=0)
                if self.rho_bias is not None:
                    sigma_bias = nn.functional.softplus(self.rho_bias).repeat_interleave(k, dim=0)
                    bias = bias + sigma_bias * self.fixed_eps_bias
            y = torch.baddbmm(bias.expand(T * k, 1, -1), x.reshape(T * k, 1, d_in), weight)
            return y.view(T, k, -1)
        raise ValueError(f"unknown weight mode {mode}")

    def noisy_bias(self, num_rows: int) -> torch.Tensor:
        if self.mu_bias is None:
            return self.bias.expand(num_rows, 1, -1)
        if self.rho_bias is None:
            return self.bias + self.mu_bias
        return self.bias + self.mu_bias + nn.functional.softplus(self.rho_bias) * torch.randn_like(self.mu_bias)

    def sampled_weight(self, rows: torch.Tensor | slice, k: int) -> torch.Tensor:
        """theta + mu_t + sigma_t * eps_r for the given rows r of ``fixed_eps`` (row r is task r // k)."""
        tasks = slice(None) if isinstance(rows, slice) else torch.div(rows, k, rounding_mode="floor")
        mean = self.theta + self.residual_mean()[tasks]
        sigma = self.sigma() if isinstance(rows, slice) else nn.functional.softplus(self.rho[tasks])
        if self.prune_mask is not None:
            sigma = sigma * self.prune_mask[tasks]
        if isinstance(rows, slice):
            return mean.repeat_interleave(k, dim=0) + sigma.repeat_interleave(k, dim=0) * self.fixed_eps
        return mean + sigma * self.fixed_eps[rows]

    def fixed_weight(self, k: int) -> torch.Tensor:
        """All rows' sampled weights [T * k, d_in, d_out]. Cached: rebuilt when a parameter changes
        (Agent.clear_weight_cache) or new samples are set; an episode end redraws only its rows."""
        if self._fixed_cache is None or self._fixed_cache[0] != k:
            self._fixed_cache = (k, self.sampled_weight(slice(None), k))
        return self._fixed_cache[1]

    @torch.inference_mode()
    def draw_fixed_eps(self, rows: int, replace: torch.Tensor | None = None) -> None:
        """Draw a weight sample for each of ``rows`` rows, or redraw only the rows in ``replace``.
        Inference mode: the samples live in the rollout's inference-mode world."""
        shape = (rows, *self.mu.shape[1:])
        if self.fixed_eps is None or self.fixed_eps.shape != shape or replace is None:
            eps = torch.randn(shape, device=self.mu.device)
            eps_bias = None
            if self.mu_bias is not None:
                eps_bias = torch.randn((rows, 1, self.mu.shape[2]), device=self.mu.device)
            self.set_samples((eps, eps_bias))
            return
        index = replace.nonzero().squeeze(1)
        self.fixed_eps[index] = torch.randn((index.numel(), *shape[1:]), device=self.mu.device)
        if self.fixed_eps_bias is not None:
            self.fixed_eps_bias[index] = torch.randn_like(self.fixed_eps_bias[index])
        if self._fixed_cache is not None:
            k = self._fixed_cache[0]
            self._fixed_cache[1][index] = self.sampled_weight(index, k)

    def samples(self) -> tuple:
        return self.fixed_eps, self.fixed_eps_bias

    def set_samples(self, samples: tuple) -> None:
        self.fixed_eps, self.fixed_eps_bias = samples
        self._fixed_cache = None

    def residuals(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        pairs = [(self.mu, self.rho)]
        if self.mu_bias is not None:
            pairs.append((self.mu_bias, self.rho_bias))
        return pairs


class VarShareMLP(nn.Module):
    def __init__(self, num_tasks: int, sizes: list[int], out_std: float, prior: Callable[[int], tuple[float, float]],
                 task_input: bool = False, **layer_kwargs):
        """``prior(fan_in)`` gives a layer's (prior std, initial sigma). ``task_input``: the first layer
        also reads a one-hot task input, held as a per-task row ``task_bias`` [T, 1, d_out] (the one-hot
        column of task t is row t); the residuals and their prior cover the observation columns only."""
        super().__init__()
        layers = []
        for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            sigma_prior, sigma_init = prior(d_in)
            std = out_std if i == len(sizes) - 2 else np.sqrt(2)
            layers.append(VarShareLinear(num_tasks, d_in, d_out, std, sigma_prior=sigma_prior, sigma_init=sigma_init,
                                         **layer_kwargs))
        self.layers = nn.ModuleList(layers)
        self.task_bias = None
        if task_input:  # shared MTL's first layer over [observation, one-hot]: one orthogonal draw, split
            first = self.layers[0]
            d_in, d_out = first.theta.shape
            weight = torch.empty(d_out, d_in + num_tasks)
            torch.nn.init.orthogonal_(weight, np.sqrt(2) if len(self.layers) > 1 else out_std)
            with torch.no_grad():
                first.theta.copy_(weight[:, :d_in].T)
            self.task_bias = per_task(nn.Parameter(weight[:, d_in:].T.reshape(num_tasks, 1, d_out).contiguous()))

    def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, mode)
            if i == 0 and self.task_bias is not None:
                x = x + self.task_bias  # [T, n, d] + [T, 1, d]: row t is task t's one-hot column
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


class Agent(WeightCacheMixin):
    """Actor and critic whose every linear layer is a VarShareLinear. The observation is the
    network's only input: task identity enters only through the residual of row t (task t), and,
    with ``task_input``, through the first layers' one-hot task rows."""

    def __init__(self, obs_dim: int, act_dim: int, discrete: bool, num_tasks: int, hidden_sizes: tuple[int, ...],
                 variational: bool, prior: Callable[[int], tuple[float, float]], residual_bias: bool,
                 rollout_weights: str, estimator: str, eval_sample_weights: int, task_input: bool = False):
        """``prior(fan_in)`` gives each layer's (prior std, initial sigma)."""
        super().__init__()
        self.num_tasks, self.discrete = num_tasks, discrete
        kw = dict(variational=variational, prior=prior, residual_bias=residual_bias, task_input=task_input)
        self.critic = VarShareMLP(num_tasks, [obs_dim, *hidden_sizes, 1], out_std=1.0, **kw)
        self.actor = VarShareMLP(num_tasks, [obs_dim, *hidden_sizes, act_dim], out_std=0.01, **kw)
        self.actor_logstd = None if discrete else per_task(nn.Parameter(torch.zeros(num_tasks, act_dim)))
        self.variational = variational
        self.rollout_weights = rollout_weights
        self.estimator = estimator
        self.eval_passes = max(1, eval_sample_weights)  # read by the core's evaluation
        self.eval_sample_weights = eval_sample_weights

    def layers(self) -> list[VarShareLinear]:
        return [*self.critic.layers, *self.actor.layers]

    def layer_names(self) -> list[str]:
        return ([f"critic{i}" for i in range(len(self.critic.layers))]
                + [f"actor{i}" for i in range(len(self.actor.layers))])

    def clear_weight_cache(self) -> None:
        """Called after every optimiser step, load and pruning change: the cached theta + mu is stale."""
        for layer in self.layers():
            layer._mean_cache = layer._sigma_cache = layer._fixed_cache = None

    def mode(self) -> str:
        """Which weights this forward uses: the estimator when a loss is being computed, the
        behaviour weights during rollouts, mean (or sampled) weights in evaluation."""
        if not self.variational:
            return "mean"
        if torch.is_grad_enabled():
            return self.estimator
        if self.training:
            return "fixed" if self.rollout_weights == "episode" else "mean"
        return "fixed" if self.eval_sample_weights > 0 else "mean"

    def train(self, mode: bool = True):
        if not mode and self.training and self.rollout_weights == "episode":
            for layer in self.layers():  # keep the rollout's per-env samples through evaluation
                layer.rollout_samples = layer.samples()
        if not mode and self.variational and self.eval_sample_weights > 0:
            for layer in self.layers():  # one weight sample per task for this evaluation pass
                layer.draw_fixed_eps(self.num_tasks)
        elif mode and not self.training and self.rollout_weights == "episode":
            for layer in self.layers():  # back to the rollout's samples, mid-episode
                layer.set_samples(getattr(layer, "rollout_samples", (None, None)))
        return super().train(mode)

    def ensure_rollout_samples(self, obs: torch.Tensor) -> None:
        if self.mode() == "fixed":
            rows = obs.shape[0] * obs.shape[1]
            for layer in self.layers():
                if layer.fixed_eps is None or layer.fixed_eps.shape[0] != rows:
                    layer.draw_fixed_eps(rows)

    def get_value(self, obs: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        self.ensure_rollout_samples(obs)
        return self.critic(obs, self.mode()).squeeze(-1)  # [T, n]

    def get_action_and_value(self, obs, task_ids, action=None):
        self.ensure_rollout_samples(obs)
        mode = self.mode()
        logstd = None if self.discrete else self.actor_logstd[task_ids[:, :1]]  # [T, 1, A]
        action, logprob, entropy = action_logprob_entropy(self.actor(obs, mode), logstd, action)
        return action, logprob, entropy, self.critic(obs, mode).squeeze(-1)

    def act_deterministic(self, obs, task_ids):
        self.ensure_rollout_samples(obs)
        head = self.actor(obs, self.mode())
        return head.argmax(-1) if self.discrete else head

    def episode_boundaries(self, ended: torch.Tensor) -> None:
        """--rollout-weights episode: envs whose episode ended draw a new weight sample."""
        if self.variational and self.rollout_weights == "episode" and ended.any():
            for layer in self.layers():
                layer.draw_fixed_eps(ended.numel(), replace=ended.reshape(-1))

    def kl_per_task(self) -> torch.Tensor:
        """Closed-form KL(q_m || N(0, sigma_prior^2)) summed over all residual entries (each layer
        with its own prior std), [T]."""
        kl = 0.0
        for layer in self.layers():
            for mu, rho in layer.residuals():
                sigma, prior = nn.functional.softplus(rho), layer.sigma_prior
                terms = torch.log(prior / sigma) + (sigma**2 + mu**2) / (2 * prior**2) - 0.5
                kl = kl + terms.flatten(1).sum(1)
        return kl

    def l2_per_task(self, layer_weight: Callable[[VarShareLinear], float] = lambda layer: 1.0) -> torch.Tensor:
        """sum over layers of layer_weight(layer) * ||mu_m||^2, [T]."""
        return sum(layer_weight(layer) * mu.pow(2).flatten(1).sum(1)
                   for layer in self.layers() for mu, _ in layer.residuals())

    def residual_count(self) -> int:
        """Residual entries of one task (mu_m only)."""
        return sum(mu[0].numel() for layer in self.layers() for mu, _ in layer.residuals())

    def active_parameter_count(self) -> int:
        # At inference theta + mu_m folds into one matrix per layer: the shared network's size.
        shared = sum(layer.theta.numel() + layer.bias.numel() for layer in self.layers())
        return shared + (0 if self.actor_logstd is None else self.actor_logstd.shape[1])

    def trained_parameter_count(self) -> int:
        # With --task-input onehot a task's data also reaches its own one-hot row of the first layers
        # (at inference that row folds into the bias: the active count is unchanged).
        shared = sum(layer.theta.numel() + layer.bias.numel() for layer in self.layers())
        own = sum(p[0].numel() for layer in self.layers() for pair in layer.residuals() for p in pair if p is not None)
        own += sum(net.task_bias[0].numel() for net in (self.critic, self.actor) if net.task_bias is not None)
        return shared + own + (0 if self.actor_logstd is None else self.actor_logstd.shape[1])

    @contextlib.contextmanager
    def pruned(self, threshold: float):
        """Evaluate with residual entries |mu| < threshold set to zero."""
        for layer in self.layers():
            layer.prune_mask = (layer.mu.abs() >= threshold).to(layer.mu.dtype)
        self.clear_weight_cache()
        try:
            yield
        finally:
            for layer in self.layers():
                layer.prune_mask = None
            self.clear_weight_cache()


def make_agent(args: Args, suite, obs_dim: int, act_dim: int, discrete: bool) -> Agent:
    variational = args.residual == "variational"
    if args.prior_scaling == "fan-in" and args.sigma_prior is not None:
        raise UsageError("--sigma-prior sets one absolute prior std; add --prior-scaling absolute, or give "
                         "--sigma-prior-gain for the default fan-in scaling")
    if args.prior_scaling == "absolute" and args.sigma_prior_gain is not None:
        raise UsageError("--sigma-prior-gain applies to --prior-scaling fan-in; use --sigma-prior with absolute")
    if not variational:
        ignored = {"estimator": args.estimator != "flipout", "rollout_weights": args.rollout_weights != "mean",
                   "eval_sample_weights": args.eval_sample_weights != 0,
                   "sigma_init_ratio": args.sigma_init_ratio != Args.sigma_init_ratio}
        for flag, given in ignored.items():
            if given:
                raise UsageError(f"--{flag.replace('_', '-')} needs weight noise and does nothing with "
                                 f"--residual l2; drop it or use --residual variational")
    elif args.l2_lambda is not None:
        raise UsageError("--l2-lambda applies to --residual l2 only; VarShare is weighted by --beta")
    if not variational and args.l2_lambda is not None:
        for flag in ("beta", "sigma_prior", "sigma_prior_gain"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} does nothing when --l2-lambda is given (L2Soft's "
                                 f"default lambda is beta / (2 sigma_prior^2)); drop one of them")
    for flag in ("sigma_prior", "sigma_prior_gain", "sigma_init_ratio"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{flag.replace('_', '-')} must be a positive number, got {value}")
    if (args.beta is not None and not (math.isfinite(args.beta) and args.beta >= 0)) or args.eval_sample_weights < 0:
        raise UsageError("--beta and --eval-sample-weights must be non-negative")
    # The flags left unset take the suite kind's values (args.json records them).
    kind_defaults = SUITE_KIND_DEFAULTS[getattr(suite, "kind", "gym")]
    if args.beta is None and args.l2_lambda is None:
        args.beta = kind_defaults["beta"]
    if args.sigma_prior_gain is None and args.prior_scaling == "fan-in":
        args.sigma_prior_gain = kind_defaults["sigma_prior_gain"]
    no_pull = args.l2_lambda == 0 if args.l2_lambda is not None else args.beta == 0
    args.prior_step = getattr(args, "prior_step", None)
    if args.prior_step == "prox" and no_pull:
        raise UsageError("--prior-step prox changes how the prior's pull on mu is applied, and with a zero "
                         "--beta (or --l2-lambda) there is no pull: drop --prior-step prox")
    if args.prior_step is None and getattr(args, "resume", None) is not None:
        args.prior_step = "gradient"  # its args.json has no prior_step: the run predates the flag
    if args.prior_step is None:  # without a pull the two steps are one: record the plain gradient
        args.prior_step = "gradient" if no_pull else kind_defaults["prior_step"]

    def prior(fan_in: int) -> tuple[float, float]:
        sigma_prior = layer_prior_std(args, fan_in)
        return sigma_prior, args.sigma_init_ratio * sigma_prior

    agent = Agent(obs_dim, act_dim, discrete, suite.num_tasks, args.hidden_sizes, variational, prior,
                  args.residual_bias, args.rollout_weights, args.estimator, args.eval_sample_weights,
                  task_input=args.task_input == "onehot")
    # args.json records the resolved per-layer values next to the flags (shared.runlog reads `derived`).
    names = agent.layer_names()
    args.derived = {"sigma_prior_per_layer": {n: layer.sigma_prior for n, layer in zip(names, agent.layers(),
                                                                                        strict=True)}}
    if not variational:
        args.derived["l2_lambda_per_layer"] = {n: l2_layer_lambda(args, layer)
                                               for n, layer in zip(names, agent.layers(), strict=True)}
    if getattr(args, "resume", None) is not None:
        check_resumed_prior(args)
    return agent


def check_resumed_prior(args: Args) -> None:
    """--resume rebuilds the prior from the run's flags; a flag the run left unset takes today's
    default, which may not be the one the run started with (VarShare's defaults moved once by suite
    kind). The per-layer values args.json recorded are the run's own: refuse when they differ."""
    with open(os.path.join(args.resume, "args.json")) as f:
        recorded = json.load(f)
    for key, values in args.derived.items():
        theirs = recorded.get(key)
        if theirs is not None and any(not math.isclose(theirs.get(name, float("nan")), value)
                                      for name, value in values.items()):
            raise UsageError(f"--resume {args.resume}: the run recorded {key} {theirs}, but its flags now give "
                             f"{values} (a default changed since it started); set sigma_prior_gain and beta in its "
                             f"args.json to the values it ran with, or start it afresh")


def make_optimizer(args: Args, agent: Agent) -> torch.optim.Optimizer:
    return make_adam(agent.parameters(), args.learning_rate)


def select_run_tasks(args: Args, suite):
    return select_tasks(suite, args.tasks, args.holdout_task)


def transfer_weights(args: Args, agent: Agent, base: dict) -> dict:
    """Leave-one-out transfer into this one-task agent (shared/transfer.py): the base run's shared
    theta and biases; the new task's residual starts at mu = 0 with sigma at its initial value (so
    the zero-shot policy is the shared theta), its log-std row at --init-logstd (and, with --task-input onehot, its
    one-hot rows fresh, as shared MTL's new column). Under --transfer task-params only the new task's mu, rho (and
    residual biases), one-hot rows and log-std row train. The base run's regulariser
    (residual kind; beta and each layer's prior std, or L2Soft's per-layer lambda; the prior step) must be this run's:
    the shared theta was trained under it, and the new task would otherwise be pulled toward
    another one without a word."""
    base_args = base_run_args(args.init_from)
    base_input = base_args.get("task_input", "none")
    if base_input != args.task_input:
        raise UsageError(f"--init-from {args.init_from}: that run has --task-input {base_input}, this one "
                         f"--task-input {args.task_input}; pass --task-input {base_input}")
    if base_args.get("residual", "variational") != args.residual:
        raise UsageError(f"--init-from {args.init_from}: that run has --residual {base_args.get('residual')}, this one "
                         f"--residual {args.residual}; pass --residual {base_args.get('residual')}")
    per_layer = "sigma_prior_per_layer" if args.residual == "variational" else "l2_lambda_per_layer"
    theirs = (base_args.get("beta"), base_args.get(per_layer))
    mine = (args.beta, args.derived[per_layer])
    if args.residual == "l2":  # the per-layer lambda is all the penalty depends on
        theirs, mine = (None, theirs[1]), (None, mine[1])
    if theirs[0] != mine[0] or theirs[1] is None or any(
            not math.isclose(theirs[1].get(name, float("nan")), value) for name, value in mine[1].items()):
        raise UsageError(f"--init-from {args.init_from}: that run's prior (beta {theirs[0]}, {per_layer} "
                         f"{theirs[1]}) differs from this run's (beta {mine[0]}, {mine[1]}); pass the base run's "
                         f"--beta and --sigma-prior-gain (or --prior-scaling/--sigma-prior, --l2-lambda)")
    base_step = base_args.get("prior_step") or "gradient"  # absent: the base predates the flag
    if base_step != args.prior_step:
        raise UsageError(f"--init-from {args.init_from}: that run's prior step is {base_step}, this run's "
                         f"{args.prior_step}; pass --prior-step {base_step}")
    return load_shared(agent, base)


def l2_layer_lambda(args: Args, layer: VarShareLinear) -> float:
    """L2Soft's lambda on one layer: --l2-lambda, or the matched beta / (2 sigma_prior^2) of the
    layer's prior std (with sigma fixed at the prior, the KL's mu-gradient is then identical)."""
    return args.l2_lambda if args.l2_lambda is not None else args.beta / (2 * layer.sigma_prior**2)


def regularizer(args: Args, agent: Agent) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled term of the loss, raw per-task value [T]): beta * KL or sum_l lambda_l * ||mu_l||^2,
    mean over tasks, scaled by --kl-scale. The raw value is KL_m, or ||mu_m||^2 for L2Soft. The
    update adds the term's gradient in closed form (add_regularizer_gradient); this autograd
    version gives the logged values and the tests' reference."""
    if args.residual == "variational":
        raw = agent.kl_per_task()
        return regularizer_scale(args, agent) * args.beta * raw.mean(), raw
    weighted = agent.l2_per_task(lambda layer: l2_layer_lambda(args, layer))
    return regularizer_scale(args, agent) * weighted.mean(), agent.l2_per_task()


def regularizer_scale(args: Args, agent: Agent) -> float:
    """--kl-scale: the factor in front of mean_over_tasks(beta * KL_m) (or of the L2 penalty)."""
    if args.kl_scale == "per-rollout":
        return 1.0 / (args.num_envs_per_task * args.num_steps)  # N_m: one task's transitions per rollout
    if args.kl_scale == "per-param":
        return 1.0 / agent.residual_count()
    return 1.0


@torch.no_grad()
def add_regularizer_gradient(args: Args, agent: Agent) -> None:
    """Add the gradient of ``regularizer`` to mu.grad and rho.grad in closed form, in place.

    Same numbers as autograd through ``regularizer`` (a test checks it) at a fraction of the
    cost: the KL's value is not needed for the update, and its gradient is elementwise:
    dKL/dmu = mu / sigma_prior^2, dKL/drho = (sigma - sigma_prior^2 / sigma) * sigmoid(rho) / sigma_prior^2,
    with each layer's own sigma_prior. Written as fused in-place updates of the gradients (add with
    alpha, addcmul, addcdiv): one pass over each gradient per term and no temporaries, where the
    expression as written would make five [T, d_in, d_out] intermediates."""
    c = regularizer_scale(args, agent) / agent.num_tasks  # the mean over tasks
    for layer in agent.layers():
        for mu, rho in layer.residuals():
            for p in (mu, rho):
                if p is not None and p.grad is None:
                    p.grad = torch.zeros_like(p)
            if args.residual == "variational":
                prior_var = layer.sigma_prior**2
                k = c * args.beta / prior_var
                sigma, slope = (layer.sigma_and_slope() if rho is layer.rho
                                else (nn.functional.softplus(rho), torch.sigmoid(rho)))
                if args.prior_step == "gradient":  # prox: the pull on mu is applied after the step
                    mu.grad.add_(mu, alpha=k)
                rho.grad.addcmul_(sigma, slope, value=k).addcdiv_(slope, sigma, value=-k * prior_var)
            elif args.prior_step == "gradient":
                mu.grad.add_(mu, alpha=2.0 * c * l2_layer_lambda(args, layer))


def pull_curvature(args: Args, agent: Agent, layer: VarShareLinear) -> float:
    """d^2 / d mu^2 of the scaled regulariser, per entry of one layer's mu: beta / sigma_prior^2
    (KL) or 2 lambda (L2Soft), times --kl-scale's factor and the mean over tasks."""
    c = regularizer_scale(args, agent) / agent.num_tasks
    if args.residual == "variational":
        return c * args.beta / layer.sigma_prior**2
    return 2.0 * c * l2_layer_lambda(args, layer)


@torch.no_grad()
def prior_prox_step(args: Args, agent: Agent, optimizer, clip_coef: torch.Tensor) -> None:
    """--prior-step prox, after Adam has stepped mu on the RL gradient alone: the quadratic pull
    k * mu / 2 of the regulariser, taken implicitly at Adam's per-entry step size
    a = lr / (sqrt(v_hat) + eps), mu <- mu / (1 + a k) = mu * d / (d + lr k), d = sqrt(v_hat) + eps.
    The fixed point is Adam's with the pull's gradient added (mu = -E[g_RL] / k, the loss's
    stationary point), but a pull much stiffer than the RL gradient no longer dominates Adam's
    second moment and turns every step into a full-size step back and forth. Under rl-clip, k is
    scaled by the clip coefficient, as the gradient it replaces would have been."""
    group = optimizer.param_groups[0]
    lr, eps, beta2 = group["lr"], group["eps"], group["betas"][1]
    scale = clip_coef if args.reg_grad_scale == "rl-clip" else 1.0
    for layer in agent.layers():
        for mu, _ in layer.residuals():
            state = optimizer.state.get(mu)
            if not state:  # no Adam step taken on it (frozen)
                continue
            d = state["exp_avg_sq"].div(1.0 - beta2 ** state["step"]).sqrt_().add_(eps)
            mu.mul_(d).div_(d.add_(lr * scale * pull_curvature(args, agent, layer)))


def method_update(args: Args, agent: Agent, optimizer, task_losses: torch.Tensor, info: dict) -> dict:
    """Clip the RL gradient and add the regulariser's gradient (it lives on mu and rho only, so it
    can never shrink theta's RL gradient), then step. The clip coefficient
    c = min(1, max_grad_norm / ||g_RL||) comes from the RL gradient alone. With --reg-grad-scale
    rl-clip every gradient becomes c * (g_RL + g_reg): the regulariser's gradient is added before
    the one scaling pass, which multiplies both; with none it is added after the clip, unscaled."""
    ppo_loss = task_losses.mean()
    optimizer.zero_grad(set_to_none=True)  # backward then stores its gradients without a zero-fill and an add
    ppo_loss.backward()
    grad_norm = nn.utils.get_total_norm([p.grad for p in agent.parameters() if p.grad is not None])  # ||g_RL||
    clip_coef = torch.clamp(args.max_grad_norm / (grad_norm + 1e-6), max=1.0)  # what the clip multiplies by
    if args.reg_grad_scale == "rl-clip":
        add_regularizer_gradient(args, agent)
    # On a CPU the check is free and skips a pass over every gradient when nothing is clipped; on
    # an accelerator it would wait for the device, so the (exact) multiplication by 1 runs instead.
    if grad_norm.device.type != "cpu" or float(clip_coef) < 1.0:
        nn.utils.clip_grads_with_norm_(agent.parameters(), args.max_grad_norm, grad_norm)
    if args.reg_grad_scale != "rl-clip":
        add_regularizer_gradient(args, agent)
    optimizer.step()
    if args.prior_step == "prox":
        prior_prox_step(args, agent, optimizer, clip_coef)
    agent.clear_weight_cache()
    agent.last_ppo_loss = ppo_loss.detach()  # for the regulariser-to-PPO ratio in the diagnostics
    stats = {"losses/grad_norm": grad_norm, "varshare/rl_clip_factor": 1.0 / clip_coef}
    if agent.variational:  # the beta the update really applies, relative to the RL gradient it meets
        stats["varshare/effective_beta"] = args.beta if args.reg_grad_scale == "rl-clip" else args.beta / clip_coef
    return stats


@torch.no_grad()
def method_diagnostics(args: Args, agent: Agent, logger: RunLogger, global_step: int) -> dict:
    out = {}
    layers = agent.layers()
    names = agent.layer_names()
    reg_term, raw = regularizer(args, agent)
    out["varshare/reg_term"] = reg_term
    if getattr(agent, "last_ppo_loss", None) is not None:
        out["varshare/reg_to_ppo_ratio"] = reg_term / (agent.last_ppo_loss.abs() + 1e-8)
    if agent.variational:
        kl = raw
    theta_sq = sum(layer.theta.pow(2).sum() for layer in layers)
    mu_sq = sum(layer.mu.pow(2).flatten(1).sum(1) for layer in layers)  # [T]
    flat_mu = torch.cat([layer.mu.flatten(1) for layer in layers], dim=1)  # [T, P]
    threshold = args.prune_threshold if args.prune_threshold is not None else 1e-3
    for t, task in enumerate(logger.task_names):
        out[f"varshare/{task}/residual_ratio"] = (mu_sq[t] / theta_sq).sqrt()
        out[f"varshare/{task}/mean_abs_mu"] = flat_mu[t].abs().mean()
        out[f"varshare/{task}/small_mu_fraction"] = (flat_mu[t].abs() < threshold).float().mean()
        for name, layer in zip(names, layers, strict=True):
            out[f"varshare/{task}/residual_ratio/{name}"] = layer.mu[t].norm() / layer.theta.norm()
        if agent.variational:
            out[f"varshare/{task}/kl"] = kl[t]
            out[f"varshare/{task}/mean_sigma"] = torch.cat([layer.sigma()[t].flatten() for layer in layers]).mean()
    if agent.num_tasks > 1:
        unit = flat_mu / (flat_mu.norm(dim=1, keepdim=True) + 1e-12)
        cos = unit @ unit.T
        off = ~torch.eye(agent.num_tasks, dtype=torch.bool, device=cos.device)
        out["varshare/mu_pairwise_cosine"] = cos[off].mean()
    return {k: float(v) for k, v in out.items()}


def method_final(args: Args, agent: Agent, final_evaluation) -> dict:
    """The final ||mu_m|| / ||theta|| per task and layer, as the diagnostics log it (the report
    reads summary.json, not tensorboard). --prune-threshold: evaluate again with small residual
    entries zeroed; report the pruned fraction, the score and the stored size of the surviving
    residuals (sparse: value + index)."""
    task_names = select_run_tasks(args, make_suite(args.env_id)).task_names  # the logger's names, same order
    with torch.no_grad():
        ratios = {task: {name: float(layer.mu[t].norm() / layer.theta.norm())
                         for name, layer in zip(agent.layer_names(), agent.layers(), strict=True)}
                  for t, task in enumerate(task_names)}
    if args.prune_threshold is None:
        return {"residual_ratios": ratios}
    with torch.no_grad():
        mus = torch.cat([layer.mu.flatten() for layer in agent.layers()])
        kept = int((mus.abs() >= args.prune_threshold).sum())
    with agent.pruned(args.prune_threshold):
        pruned = final_evaluation(label=f"pruned@{args.prune_threshold:g}")
    return {"residual_ratios": ratios, "prune": {
        "threshold": args.prune_threshold,
        "fraction_pruned": 1.0 - kept / mus.numel(),
        "residual_entries": mus.numel(),
        "dense_residual_bytes": mus.numel() * 4,
        "sparse_residual_bytes": kept * (4 + 8),  # float32 value + int64 flat index per kept entry
        "final_success_rate": float(pruned["success"].mean()),
        "final_return": float(pruned["return"].mean()),
        "per_task_return": pruned["return"].tolist(),
        "per_task_success_rate": pruned["success"].tolist(),
    }}


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
