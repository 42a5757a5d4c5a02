"""The command-line flags every from-scratch training script shares, as a base class of its `Args`.

A script's `Args(RunArgs)` adds its hyperparameters after these (tyro lists base fields first, as
CleanRL's scripts list the run flags first) and sets `exp_name` to its own file name. Checked by
`common.env.check_run_args`. Imports nothing heavy.
"""

from __future__ import annotations

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
