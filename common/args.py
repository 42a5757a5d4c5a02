"""The command-line flags every from-scratch training script shares, as a base class of its `Args`.

A script's `Args(RunArgs)` adds its hyperparameters after these (tyro lists base fields first, as
CleanRL's scripts list the run flags first) and sets `exp_name` to its own file name. `check_run_args`
refuses bad values of these flags in one line (a ConfigError); a script checks its own with `check_ranges`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional


@dataclass
class RunArgs:
    exp_name: str = "run"
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the environment, numpy and JAX"""
    track: bool = False
    """also log to Weights & Biases (one wandb run per seed; needs `pip install wandb`; offline: WANDB_MODE=offline)"""
    wandb_project_name: str = "flow-rl-jax"
    """the wandb project, with --track"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team or user), with --track; None: your default entity"""
    num_seeds: int = 1
    """train this many independent agents at once, seeded --seed, --seed + 1, ... (vmapped; sharded over all devices)"""
    env_id: str = "Hopper-v4"
    """Gymnasium MuJoCo id (e.g. Ant-v4) or dm_control task (e.g. dm_control/dog-run-v0)"""
    total_timesteps: int = 1_000_000
    """total environment steps"""
    eval_every: int = 10_000
    """evaluate every this many env steps"""
    eval_episodes: int = 5
    """episodes per evaluation"""
    log_every: int = 1000
    """write losses and SPS every this many env steps"""
    save_model: bool = False
    """save the trained parameters to runs/{run_name}/{exp_name}.msgpack"""
    checkpoint_every: int = 100_000
    """write a training checkpoint to runs/{run_name}/checkpoints every this many env steps and at the end
    (0: only when stopped by Ctrl-C or SIGTERM)"""
    keep_checkpoints: int = 2
    """how many of the newest training checkpoints to keep"""
    checkpoint_buffer: bool = True
    """put the replay buffer (compressed) in checkpoints; without it a resumed run refills the buffer before updating"""
    resume: Optional[str] = None
    """continue the run of this training checkpoint, or of a run folder's newest one"""
    eval_only: bool = False
    """load --checkpoint, evaluate it for --eval-episodes and exit"""
    checkpoint: Optional[str] = None
    """a model file (--save-model), a training checkpoint or a run folder, for --eval-only"""
    capture_video: bool = False
    """record the first episode of each evaluation to runs/{run_name}/videos (with --eval-only: every episode)"""
    debug_nans: bool = False
    """turn on JAX's own NaN check (jax_debug_nans), which names the operation that made one"""
    progress: bool = True
    """show a progress bar on the terminal"""


class ConfigError(ValueError):
    """Bad user input: the scripts print its message as one line and exit with status 2."""


def check_run_flags(args) -> None:
    """The flags about where a run comes from (--resume, --eval-only --checkpoint) must agree."""
    if args.resume and args.eval_only:
        raise ConfigError("--resume continues training and --eval-only evaluates: give one of them")
    if args.eval_only and not args.checkpoint:
        raise ConfigError("--eval-only needs --checkpoint PATH (a model file, a training checkpoint or a run folder)")
    if args.checkpoint and not args.eval_only:
        raise ConfigError("--checkpoint is read by --eval-only; to continue training a run use --resume PATH")
    if args.checkpoint and not os.path.exists(args.checkpoint):
        raise ConfigError(f"--checkpoint {args.checkpoint!r} does not exist")
    if args.resume and not os.path.exists(args.resume):
        raise ConfigError(f"--resume {args.resume!r} does not exist (give a checkpoint file or a run folder)")


def check_ranges(args, positive=(), nonnegative=(), fraction=(), unit=()) -> None:
    """Refuse in one line the first flag outside its range: `positive` > 0, `nonnegative` >= 0, `fraction`
    in [0, 1) (momenta, Adam's beta1), `unit` in [0, 1] (discounts, mixing shares)."""
    rules = [(positive, lambda v: v > 0, "positive"), (nonnegative, lambda v: v >= 0, ">= 0"),
             (fraction, lambda v: 0 <= v < 1, "in [0.0, 1.0)"), (unit, lambda v: 0 <= v <= 1, "in [0.0, 1.0]")]
    for names, ok, allowed in rules:
        for name in names:
            value = getattr(args, name)
            if value is not None and not ok(value):
                raise ConfigError(f"--{name.replace('_', '-')} must be {allowed}, got {value}")


def check_run_args(args) -> None:
    """The flags every training script has (run length, buffer, batch, logging, evaluation, checkpoints, where
    the run comes from, the env id), refused in one line; a script checks its own hyperparameters besides.
    sac_flow_o2o.py (it has --offline-steps) sizes its buffer by its dataset too, and may take no env step at all."""
    offline = hasattr(args, "offline_steps")
    check_ranges(args, positive=["num_seeds", "batch_size", "eval_every", "log_every"] + ([] if offline else ["total_timesteps", "buffer_size"]),
                 nonnegative=["learning_starts", "eval_episodes", "checkpoint_every"] + (["total_timesteps"] if offline else []))
    if args.keep_checkpoints < 1:
        raise ConfigError(f"--keep-checkpoints must be at least 1, got {args.keep_checkpoints}")
    if not offline and args.batch_size > args.buffer_size:
        raise ConfigError(f"--batch-size {args.batch_size} is above --buffer-size {args.buffer_size}; it must be at most the buffer size")
    check_run_flags(args)
    from common.env import check_env_id  # gymnasium and the env registries: imported only when checking
    from common.tracking import check_tracking

    check_tracking(args)
    check_env_id(args.env_id, ogbench=offline)
