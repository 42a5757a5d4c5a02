"""Where a run's scalars go: TensorBoard always and, with --track, Weights & Biases as well.

One `RunWriter` per seed's log folder. With --track each opens its own wandb run (several at once in
one process with --num-seeds), named after the folder, with the arguments (and the agent's seed) as
its config, and logs every scalar the TensorBoard writer gets at the same step. The wandb run id is
derived from the folder name, so a run continued with --resume continues its wandb run; steps below
the run's newest (logged by a crashed session after its last checkpoint) are dropped by wandb, as
TensorBoard's purge_step hides them there. wandb is imported only with --track; without it installed
`check_tracking` refuses --track in one line. Offline (no network): WANDB_MODE=offline, then
`wandb sync {log_dir}/wandb/offline-run-*`.
"""

from __future__ import annotations

import os

from common.args import ConfigError

# Characters wandb refuses in a run id.
_RESERVED = ":;,#?/'"


def check_tracking(args) -> None:
    """Refuse --track when wandb cannot be imported (one line naming the fix)."""
    if getattr(args, "track", False):
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("--track logs to Weights & Biases, which is not installed here: pip install wandb") from None


def wandb_run_id(log_dir: str) -> str:
    """The wandb run id of a log folder: its name, without the characters wandb refuses."""
    name = os.path.basename(os.path.normpath(log_dir))
    return "".join("-" if c in _RESERVED else c for c in name)


class RunWriter:
    """TensorBoard's add_scalar / add_text / flush / close for one log folder, mirrored to a wandb run
    with `track`. `purge_step` and `filename_suffix` are TensorBoard's, for a resumed run."""

    def __init__(self, log_dir: str, args=None, config: dict | None = None, purge_step: int | None = None,
                 filename_suffix: str = ""):
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(log_dir, purge_step=purge_step, filename_suffix=filename_suffix)
        self.run = None
        if args is not None and getattr(args, "track", False):
            import wandb

            # An absolute dir: a wandb service started by another process (WANDB_SERVICE) resolves paths in its own cwd.
            self.run = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, dir=os.path.abspath(log_dir),
                                  name=os.path.basename(os.path.normpath(log_dir)), id=wandb_run_id(log_dir),
                                  resume="allow", config=config, reinit="create_new",
                                  settings=wandb.Settings(silent=True, console="off"))

    def add_scalar(self, tag: str, value, step: int) -> None:
        self.tb.add_scalar(tag, value, step)
        if self.run is not None:
            self.run.log({tag: value}, step=int(step))

    def add_text(self, tag: str, text: str) -> None:
        self.tb.add_text(tag, text)

    def flush(self) -> None:
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()
        if self.run is not None:
            self.run.finish()
            self.run = None
