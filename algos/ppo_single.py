"""PPO on one task, and the single-task oracle on a multi-task suite.

On a single env id (``CartPole-v1``, ``LunarLander-v3``, ``reach-v3``) this is plain CleanRL-style
PPO (Schulman et al., 2017; Huang et al., "The 37 implementation details of PPO", 2022) and the
project's first sanity check.

On a multi-task suite it is the single-task oracle: one independent PPO agent per task, each with
the per-task share of the budget (``total_timesteps / T``) and the same widths as the multi-task
methods. All agents live in one process as a batch of independent networks (weights
``[T, d_in, d_out]``, run as one batched matmul) and share nothing: separate parameters, separate
observation normalisers, per-task reward scaling, per-task gradient-norm clipping, and Adam whose
state is elementwise and so per task. The summed loss gives each task's parameters exactly its own
gradient. ``--task NAME`` trains one task of the suite alone, with that task's share of
``--total-timesteps``.

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
from shared.suites import apply_suite_defaults, env_seed, make_suite, make_vector_env, select_tasks, space_dims
from shared.transfer import init_from_base, transfer_args

ALGO = "ppo_single"


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
    env_id: str = "CartPole-v1"
    """a gymnasium id, a Meta-World task, or a multi-task suite (then: one independent agent per task)"""
    task: Optional[str] = None
    """on a multi-task suite: train only this task, with its share (total / T) of --total-timesteps"""


OBS_NORM_PER_TASK = True  # independent agents: each task normalises with its own statistics


class TaskLinear(nn.Module):
    """T independent linear layers run as one batched matmul on task-major input [T, n, d_in]."""

    def __init__(self, num_tasks: int, d_in: int, d_out: int, std: float):
        super().__init__()
        weight = torch.empty(num_tasks, d_out, d_in)
        for t in range(num_tasks):  # each task its own orthogonal init, as nn.Linear + layer_init
            torch.nn.init.orthogonal_(weight[t], std)
        self.weight = per_task(nn.Parameter(weight.transpose(1, 2).contiguous()))  # [T, d_in, d_out]
        self.bias = per_task(nn.Parameter(torch.zeros(num_tasks, 1, d_out)))  # [T, 1, d_out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)  # [T, n, d_out]


def task_mlp(num_tasks: int, sizes: list[int], out_std: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        last = i == len(sizes) - 2
        layers.append(TaskLinear(num_tasks, a, b, std=out_std if last else np.sqrt(2)))
        if not last:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class Agent(nn.Module):
    """T independent actor-critic MLPs. Row t of the task-major input is task t (the core's layout),
    so each TaskLinear applies weight[t] to row t; ``task_ids`` only picks the log-std row."""

    def __init__(self, obs_dim: int, act_dim: int, discrete: bool, num_tasks: int, hidden_sizes: tuple[int, ...]):
        super().__init__()
        self.num_tasks, self.discrete = num_tasks, discrete
        self.critic = task_mlp(num_tasks, [obs_dim, *hidden_sizes, 1], out_std=1.0)
        self.actor = task_mlp(num_tasks, [obs_dim, *hidden_sizes, act_dim], out_std=0.01)
        self.actor_logstd = None if discrete else per_task(nn.Parameter(torch.zeros(num_tasks, act_dim)))

    def get_value(self, obs: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)  # [T, n]

    def get_action_and_value(self, obs, task_ids, action=None):
        logstd = None if self.discrete else self.actor_logstd[task_ids[:, :1]]  # [T, 1, A]
        action, logprob, entropy = action_logprob_entropy(self.actor(obs), logstd, action)
        return action, logprob, entropy, self.critic(obs).squeeze(-1)

    def act_deterministic(self, obs, task_ids):
        head = self.actor(obs)
        return head.argmax(-1) if self.discrete else head

    def episode_boundaries(self, ended: torch.Tensor) -> None:
        """Nothing to do at episode boundaries."""


def make_agent(args: Args, suite, obs_dim: int, act_dim: int, discrete: bool) -> Agent:
    return Agent(obs_dim, act_dim, discrete, suite.num_tasks, args.hidden_sizes)


def make_optimizer(args: Args, agent: Agent) -> torch.optim.Optimizer:
    return make_adam(agent.parameters(), args.learning_rate)


def select_run_tasks(args: Args, suite):
    if args.task is not None:
        if not suite.is_multitask:
            raise UsageError(f"--task applies to multi-task suites only; '{suite.env_id}' is a single task")
        if args.tasks is not None or args.holdout_task is not None:
            raise UsageError("--task cannot be combined with --tasks or --holdout-task")
        num_suite_tasks = suite.num_tasks
        suite = select_tasks(suite, [args.task], None)
        if args.total_timesteps < num_suite_tasks:
            raise UsageError(f"--total-timesteps {args.total_timesteps} leaves nothing for one of "
                             f"{num_suite_tasks} tasks; --task trains on total / {num_suite_tasks}")
        args.total_timesteps = args.total_timesteps // num_suite_tasks  # this task's share
        return suite
    return select_tasks(suite, args.tasks, args.holdout_task)


# One network per task, nothing shared: a held-out task's run is the plain run (shared/transfer.py).
transfer_weights = None


def method_update(args: Args, agent: Agent, optimizer, task_losses: torch.Tensor, info: dict) -> dict:
    """Sum of the independent tasks' losses: each task's parameters get exactly its own gradient.
    Each task's gradient is clipped to max_grad_norm on its own."""
    optimizer.zero_grad(set_to_none=True)
    task_losses.sum().backward()
    grads = [p.grad for p in agent.parameters()]
    per_task_sq = sum(g.reshape(agent.num_tasks, -1).pow(2).sum(dim=1) for g in grads)  # [T]
    grad_norm = per_task_sq.sqrt()
    scale = (args.max_grad_norm / (grad_norm + 1e-6)).clamp(max=1.0)  # [T]
    for g in grads:
        g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))
    optimizer.step()
    return {"losses/grad_norm": grad_norm.mean()}


def method_diagnostics(args: Args, agent: Agent, logger: RunLogger, global_step: int) -> dict:
    return {}


def method_final(args: Args, agent: Agent, final_evaluation) -> dict:
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
