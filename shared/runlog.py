"""Run directory, tensorboard, optional wandb, args.json, eval.jsonl, summary.json, perf timings.

Layout: ``runs/<env-id>__<algo>__<seed>__<timestamp>/`` (PROTOCOL section 6).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import platform
import re
import resource
import time

import numpy as np
import torch

from shared.cli import UsageError, check_writable


def _jsonable(value):
    if isinstance(value, (np.ndarray,)):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return value


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    processor = platform.processor() or platform.machine()
    return f"cpu ({processor}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def wandb_group(config: dict) -> str:
    """One wandb group per row of the report: suite (with --tasks / --holdout-task), method and
    variant (L2Soft, or the --run-name-suffix such as the capacity-matched "wide"), so that the
    groups researchers compare in wandb are the rows the report averages."""
    from shared.report import suite_of, variant_of

    return "__".join(part for part in (suite_of(config), config["algo"], variant_of(config)) if part)


def wandb_tags(config: dict) -> list[str]:
    from shared.report import variant_of

    tags = [config["env_id"], config["algo"], variant_of(config), f"seed-{config['seed']}"]
    if config.get("holdout_task"):
        tags.append(f"holdout-{config['holdout_task']}")
    return [tag[:64] for tag in tags if tag]  # wandb refuses tags longer than 64 characters


def wandb_summary(summary: dict) -> dict:
    """summary.json's numbers, flat, as wandb's run summary shows them in its tables: final
    metrics overall and per task, the three parameter counts, steps and wall time."""
    flat = {"final/success_rate": summary["final_success_rate"], "final/return": summary["final_return"],
            "global_step": summary["global_step"], "wall_time_s": summary["wall_time_s"]}
    for task, result in summary["per_task"].items():
        flat[f"final/{task}/success_rate"] = result["success_rate"]
        flat[f"final/{task}/return"] = result["return"]
    if "sampled" in summary:
        flat["final_sampled/success_rate"] = summary["sampled"]["final_success_rate"]
        for task, result in summary["sampled"]["per_task"].items():
            flat[f"final_sampled/{task}/success_rate"] = result["success_rate"]
    flat.update({f"params/{name}": count for name, count in summary["parameter_counts"].items()})
    return {key: _jsonable(value) for key, value in flat.items()}


class RunLogger:
    def __init__(self, args, algo: str, task_names: tuple[str, ...], runs_dir: str = "runs",
                 resume: dict | None = None):
        """A new run directory under ``runs_dir``; or, with ``resume`` (the checkpoint a resumed run
        restarts from), the run's own directory ``args.resume``: eval.jsonl keeps the lines up to
        the checkpoint's step (later ones are redone), tensorboard hides events after it, and the
        wall time continues from the checkpoint's."""
        from torch.utils.tensorboard import SummaryWriter

        self.algo = algo
        self.task_names = task_names
        self.start_time = time.time() - (resume["extra"]["wall_time"] if resume else 0.0)
        if resume:
            self.dir = args.resume
            self.run_name = os.path.basename(os.path.normpath(args.resume))
            self._lock_run_directory()
            self._keep_evaluations_up_to(resume["global_step"])
        else:
            self._make_run_directory(args, algo, runs_dir)
        config = {k: _jsonable(v) for k, v in dataclasses.asdict(args).items()}
        config.update(algo=algo, task_names=list(task_names), run_name=self.run_name)
        # Values a script derives from its flags (VarShare's per-layer prior std) are recorded beside them.
        config.update({k: _jsonable(v) for k, v in getattr(args, "derived", {}).items()})
        if not resume:
            with open(os.path.join(self.dir, "args.json"), "w") as f:
                json.dump(config, f, indent=2)
            self._lock_run_directory()
        self.wandb = None
        if args.track:
            import wandb

            self.wandb = wandb.init(
                project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                config=config, name=self.run_name, group=wandb_group(config), job_type="train",
                tags=wandb_tags(config), dir=self.dir, save_code=True,
                id=re.sub(r"[^A-Za-z0-9_-]", "-", self.run_name)[-64:], resume="allow",  # --resume continues it
            )
        # A resumed run rewrites the steps after its checkpoint: hide the first attempt's events there.
        self.writer = SummaryWriter(self.dir, purge_step=resume["global_step"] + 1 if resume else None)
        self.perf_history: list[dict] = []  # one entry per iteration: phase times and steps
        self.writer.add_text(
            "hyperparameters",
            "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in config.items()),
        )

    def _make_run_directory(self, args, algo: str, runs_dir: str) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_name = f"{args.env_id}__{algo}__{args.seed}__{stamp}"
        if getattr(args, "run_name_suffix", ""):
            self.run_name += f"__{args.run_name_suffix}"
        check_writable(runs_dir)
        base, attempt = self.run_name, 1
        while True:  # two runs started in the same second must never share a directory
            self.dir = os.path.join(runs_dir, self.run_name)
            try:
                os.mkdir(self.dir)
                break
            except FileExistsError:
                attempt += 1
                self.run_name = f"{base}__{attempt}"

    def _lock_run_directory(self) -> None:
        """Hold a lock on the run's args.json while this process lives: a second process resuming
        the same run (a rerun of the matrix, a requeued job) is refused instead of interleaving."""
        self._lock = open(os.path.join(self.dir, "args.json"))
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{self.dir} is being run by another process right now; wait for it to "
                             f"end") from None

    def _keep_evaluations_up_to(self, step: int) -> None:
        path = os.path.join(self.dir, "eval.jsonl")
        if not os.path.exists(path):
            return
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        kept = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:  # a line cut short by the kill
                continue
            if entry["global_step"] <= step and not entry["final"]:  # the final evaluation is redone
                kept.append(line if line.endswith("\n") else line + "\n")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)

    def elapsed(self) -> float:
        return time.time() - self.start_time

    def scalar(self, name: str, value: float, step: int) -> None:
        self.writer.add_scalar(name, float(value), step)

    def eval(self, result: dict, step: int, final: bool = False) -> None:
        """Log one evaluation: tensorboard (eval/...) and a line of eval.jsonl."""
        success, ret = result["success"], result["return"]
        # A labelled evaluation (sampled, zero-shot, pruned@...) has tags of its own: eval_<label>/...
        tag = f"eval_{result['label']}" if result.get("label") else "eval"
        self.scalar(f"{tag}/success_rate", success.mean(), step)
        self.scalar(f"{tag}/return", ret.mean(), step)
        for name, s, r in zip(self.task_names, success, ret, strict=True):
            self.scalar(f"{tag}/{name}/success_rate", s, step)
            self.scalar(f"{tag}/{name}/return", r, step)
        line = {
            "label": result.get("label", ""),
            "global_step": int(step),
            "wall_time": time.time() - self.start_time,
            "final": final,
            "episodes_per_task": result["episodes_per_task"],
            "success_rate": float(success.mean()),
            "return": float(ret.mean()),
            "per_task": {n: {"success_rate": float(s), "return": float(r)}
                         for n, s, r in zip(self.task_names, success, ret, strict=True)},
        }
        for key, value in result.items():
            if key not in ("success", "return", "episodes_per_task", "label", "sampled"):
                line[key] = _jsonable(value)
        with open(os.path.join(self.dir, "eval.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")

    def summary(self, final_eval: dict, global_step: int, parameter_counts: dict, device: torch.device,
                extra: dict | None = None) -> dict:
        summary = {
            "algo": self.algo,
            "task_names": list(self.task_names),
            "global_step": int(global_step),
            "wall_time_s": time.time() - self.start_time,
            "final_success_rate": float(final_eval["success"].mean()),
            "final_return": float(final_eval["return"].mean()),
            "final_episodes_per_task": final_eval["episodes_per_task"],
            "per_task": {n: {"success_rate": float(s), "return": float(r)} for n, s, r in
                         zip(self.task_names, final_eval["success"], final_eval["return"], strict=True)},
            "parameter_counts": parameter_counts,
            "device": device_name(device),
            "peak_memory_mb": peak_memory_mb(device),
            **(extra or {}),
        }
        if "sampled" in final_eval:  # the final evaluation's pass with sampled actions (--eval-sampled)
            sampled = final_eval["sampled"]
            summary["sampled"] = {
                "final_success_rate": float(sampled["success"].mean()),
                "final_return": float(sampled["return"].mean()),
                "per_task": {n: {"success_rate": float(s), "return": float(r)} for n, s, r in
                             zip(self.task_names, sampled["success"], sampled["return"], strict=True)},
            }
        with open(os.path.join(self.dir, "summary.json"), "w") as f:
            json.dump({k: _jsonable(v) for k, v in summary.items()}, f, indent=2)
        if self.wandb is not None:
            self.wandb.summary.update(wandb_summary(summary))
        return summary

    def perf_summary(self) -> dict:
        """Mean phase times per iteration (the first iteration is skipped as warm-up when possible)."""
        history = self.perf_history[1:] or self.perf_history
        if not history:
            return {}
        mean = {key: float(np.mean([h[key] for h in history])) for key in history[0]}
        iteration = mean["rollout_time"] + mean["update_time"]
        return {"perf": {**mean, "rollout_sps": mean["steps"] / mean["rollout_time"],
                         "update_share": mean["update_time"] / iteration, "iterations_measured": len(history)}}

    def close(self) -> None:
        self.writer.close()
        self._lock.close()  # releases the run directory
        if self.wandb is not None:
            self.wandb.finish()
