"""Everything around a script's training loop, written once for the four scripts.

A script keeps its method: networks, losses, the jitted update, how it acts. `TrainingRun` keeps what
every run does alike: the run folder and one TensorBoard run per seed, the seeds sharded over devices,
the envs, a fresh or restored agent, logging with SPS, evaluation, checkpoints (periodic or on
Ctrl-C/SIGTERM), the divergence stop, --debug-nans, --save-model and the summary. A script's `train`:

    run = TrainingRun(args, ALGO, __file__, resume)
    agent, k_act, buf, obs = run.init_state(create_agent)
    with run:
        for step in run.steps():
            ...act, run.envs.step, run.buffer_add, update...
            run.log(step, episodes, info)
            run.maybe_evaluate(step, act_eval, agent.actor.params)
            if run.maybe_checkpoint(step, agent, k_act, buf, obs):
                break
    return run.finish(agent, update, MODEL_CONFIG, params_to_save)

Every array of a run has a leading seed axis: agent i of `--num-seeds S --seed X` is the single run
`--seed X+i` (common/seeds.py). `eval_only`, `prepare_resume` and `ExitStatus` are the rest of the
command line.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time
from dataclasses import asdict

import jax
import jax.numpy as jnp
import numpy as np

from common.buffer import buffer_add, buffer_init
from common.checkpoint import (Diverged, StopOnSignal, adopt_saved_args, check_metrics, first_nonfinite, load_model,
                               prepare_run_dir, read_resume, refuse_older, restore_training, run_folder,
                               save_checkpoint, save_model, training_checkpoint)
from common.args import ConfigError
from common.env import SeedEnvs, check_env_id, env_dims, evaluate, seed_everything
from common.seeds import check_buffer_memory, per_seed, seed_map, seed_sharding
from common.tracking import RunWriter


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory that XLA frees, so that the next update reuses it.

    XLA:CPU allocates each call's temporaries afresh; glibc serves the large ones with new pages (mmap) and
    returns them on free, so every update faulted its largest buffers in again. From the heap, kept (mmap off,
    no trimming below 2 GiB), they come back mapped. Nothing computed changes. True where the settings took."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
    return all(mallopt(option, value) == 1 for option, value in
               ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 256 << 20)))


def metric_scalars(values: dict, i: int, vector_tags: dict | None = None) -> list[tuple[str, float]]:
    """Seed i's (tag, value) pairs of an update's metrics (seed-stacked host arrays): `losses/{name}` for a scalar,
    `{prefix}{k}` for entry k of a vector (the prefix from `vector_tags`, else `losses/{name}_`)."""
    scalars = []
    for name, value in values.items():
        value = np.asarray(value[i])
        if value.ndim == 0:
            scalars.append((f"losses/{name}", float(value)))
        else:
            prefix = (vector_tags or {}).get(name, f"losses/{name}_")
            scalars.extend((f"{prefix}{k}", float(x)) for k, x in enumerate(value.reshape(-1)))
    return scalars


class TrainingRun:
    """One training run of --num-seeds agents. The script owns the loop's state (agent, acting key, buffer,
    observations) and passes it in; the run owns the bookkeeping. A script reads `envs` (one env per seed),
    `obs_dim`, `act_dim`, `sharding` (of the seed axis), `seeds`, `run_dir`, `log_dirs`, `meta`."""

    def __init__(self, args, algo: str, script: str, resume=None, vector_tags: dict | None = None, offline_steps: int = 0,
                 buffer=None):
        """`resume`: prepare_resume's answer; `vector_tags`: see metric_scalars. sac_flow_o2o.py adds `offline_steps`
        (dataset updates counted before the env steps: step offline_steps + j is env step j) and `buffer`, its own
        as (capacity, init(capacity, obs_dim, act_dim), add)."""
        self.args, self.algo, self.script, self.resume = args, algo, os.path.basename(script), resume
        self.vector_tags, self.offline_steps = vector_tags, offline_steps
        self.last_step = offline_steps + args.total_timesteps
        if resume and resume[1]["step"] > self.last_step:
            raise ConfigError(f"--total-timesteps {args.total_timesteps} ends the run before the checkpoint's step {resume[1]['step']}"
                              + (f" (of which {offline_steps} offline)" if offline_steps else ""))
        self.capacity, self.buffer_init, add = buffer or (args.buffer_size, buffer_init, buffer_add)
        self.filled_buffer = buffer is not None
        self.seeds = [args.seed + i for i in range(args.num_seeds)]
        if resume:  # the run goes on in its checkpoint's run folder, else in runs/{run_name}
            run_name = resume[1]["meta"]["run_name"]
            self.run_dir = run_folder(os.path.dirname(resume[0])) or os.path.join("runs", run_name)
        else:
            run_name = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
            self.run_dir = os.path.join("runs", run_name)
        # One TensorBoard run per seed, so plots and TensorBoard see S ordinary runs.
        self.log_dirs = [self.run_dir] if args.num_seeds == 1 else [f"{self.run_dir}__s{seed}" for seed in self.seeds]
        self.meta = {"run_name": run_name, "elapsed": 0.0, "updates_from": offline_steps + args.learning_starts,
                     "last_return": [float("nan")] * args.num_seeds}
        self.start_step, self.step, self.last_checkpoint, self.stopped = 0, 0, None, None
        self.writers, self.bar, self.envs, self.eval_envs = [], None, None, None
        self.learn_start, self.n_updates, self.postfix = None, 0, {}
        self.returns = [[] for _ in self.seeds]  # every training episode's return, per seed

        keep_freed_memory()
        seed_everything(args.seed)
        self.sharding, self.n_devices = seed_sharding(args.num_seeds)
        self.obs_dim, self.act_dim = env_dims(args.env_id)
        check_buffer_memory(args.num_seeds, self.capacity, self.obs_dim, self.act_dim, self.n_devices)
        prepare_run_dir(self.run_dir, resumed=resume is not None)
        try:
            self.envs = SeedEnvs(args.env_id, self.seeds)
            self.eval_envs = SeedEnvs(args.env_id, [seed + 10_000 for seed in self.seeds], render=args.capture_video)
            if args.capture_video:
                self.eval_envs.render_check()
        except BaseException:
            self.close()
            raise
        # Inserting is its own call with the buffer donated (updated in place); --debug-nans re-runs a
        # call that made a NaN on its inputs, so they must then be kept.
        self.buffer_add = jax.jit(seed_map(add, args.num_seeds), donate_argnums=() if args.debug_nans else 0,
                                  out_shardings=self.sharding)

    def on_seeds(self, tree):
        """Place a seed-stacked pytree on the devices, sharded along the seed axis."""
        return jax.device_put(tree, self.sharding)

    def init_state(self, create_agent, acting=None):
        """The loop's seed-stacked state (agent, acting state, buffer, observations): built with
        `create_agent(args, obs_dim, act_dim, key)`, or restored from the resumed checkpoint. The acting state is
        the acting keys, or `acting(keys)` (o2o adds each seed's action chunk). Opens the logs after the restore,
        so that a refused checkpoint leaves the folder as it was."""
        args, S = self.args, self.args.num_seeds
        try:
            # Each seed's keys are split from its own root exactly as a single run's: agent i is the run --seed X+i.
            keys = jnp.stack([jax.random.split(jax.random.PRNGKey(seed), 4) for seed in self.seeds])
            k_agent, k_act, self.k_eval = self.on_seeds(keys[:, 1]), self.on_seeds(keys[:, 2]), keys[:, 3]
            k_act = k_act if acting is None else acting(k_act)
            make = seed_map(lambda k: create_agent(args, self.obs_dim, self.act_dim, k), S)
            agent = jax.jit(make, out_shardings=self.sharding)(k_agent)
            init = lambda: self.buffer_init(self.capacity, self.obs_dim, self.act_dim)
            if self.filled_buffer:  # a script's buffer with contents (o2o's dataset): made once, copied to every seed
                stack = lambda b: jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (S,) + x.shape), b)
                buf = jax.jit(stack, out_shardings=self.sharding)(init())
            else:  # empty: zeros made in place, each seed's on its device (no host copy, no second buffer)
                buf = jax.jit(lambda: jax.tree_util.tree_map(lambda x: jnp.zeros((S,) + x.shape, x.dtype), init()),
                              out_shardings=self.sharding)()
            obs = self.envs.reset()
            if self.resume:
                agent, k_act, buf, obs = self._restore(agent, k_act, buf)
        except BaseException:
            self.close()
            raise
        self.last_return = list(self.meta["last_return"])  # each seed's latest training return: on the bar, in checkpoints
        if S > 1:
            print(f"{S} seeds ({self.seeds[0]} to {self.seeds[-1]}) on {self.n_devices} device(s); "
                  f"each logs to {self.run_dir}__s<seed>")
        if args.learning_starts >= args.total_timesteps and not self.offline_steps:
            print(f"note: --learning-starts {args.learning_starts} >= --total-timesteps {args.total_timesteps}: this run only "
                  "collects random transitions (resume it with a larger --total-timesteps to learn)")
        if not args.checkpoint_buffer:
            print("checkpoints leave out the replay buffer (--no-checkpoint-buffer): a run resumed from them refills it first")
        self._open_logs()
        return agent, k_act, buf, obs

    def _restore(self, agent, k_act, buf):
        self.last_checkpoint, ckpt = self.resume
        state, buf, obs = restore_training(self.last_checkpoint, ckpt, {"agent": agent, "k_act": k_act}, buf, self.envs)
        self.start_step = self.step = ckpt["step"]
        self.meta = meta = ckpt["meta"]
        if ckpt["buffer"] is None:  # refill before updating again, as at the start of a run
            meta["updates_from"] = max(meta["updates_from"], self.start_step + max(self.args.learning_starts, self.args.batch_size))
        print(f"resumed {self.run_dir} at step {self.start_step} from {self.last_checkpoint}"
              + ("" if ckpt["buffer"] is not None else f" (no buffer saved: refilling until step {meta['updates_from']})"))
        return self.on_seeds(state["agent"]), self.on_seeds(state["k_act"]), self.on_seeds(buf), obs

    def _open_logs(self):
        resumed, start = self.resume is not None, self.start_step
        # purge_step hides anything a crashed run logged after the checkpoint, so no step appears twice; the
        # suffix keeps a resumed session from reusing (and truncating) an event file of the same second.
        # With --track each seed's writer also logs to its own wandb run, continued on resume.
        config = asdict(self.args)
        self.writers = [RunWriter(log_dir, self.args, {**config, "agent_seed": seed}, purge_step=start + 1 if resumed else None,
                                  filename_suffix=f".from{start}" if resumed else "")
                        for log_dir, seed in zip(self.log_dirs, self.seeds)]
        if not resumed:
            table = "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(self.args).items())
            for seed, writer in zip(self.seeds, self.writers):
                writer.add_text("hyperparameters", table + (f"\n|agent seed|{seed}|" if len(self.seeds) > 1 else ""))

    # ---- the loop ------------------------------------------------------------------------------

    def __enter__(self):
        """Start the clocks and the bar; SIGINT/SIGTERM now only ask the loop to stop (maybe_checkpoint)."""
        from tqdm import tqdm

        self._contexts = contextlib.ExitStack()
        self._stop = self._contexts.enter_context(StopOnSignal())
        # jax.debug_nans as a context: the global config flag is not honoured reliably once flax has run.
        self._contexts.enter_context(jax.debug_nans(self.args.debug_nans))
        self.start = self.window_start = time.time() - self.meta["elapsed"]
        self.window_step = self.start_step
        S = len(self.seeds)
        self.bar = tqdm(total=self.last_step, initial=self.start_step, disable=not self.args.progress,
                        dynamic_ncols=True, unit="step", desc=f"{S} seeds" if S > 1 else None)
        return self

    def __exit__(self, kind, error, traceback):
        """Close everything; a NaN found by --debug-nans becomes a Diverged naming the last good checkpoint."""
        try:
            self._contexts.close()
        finally:
            self.close()
        if isinstance(error, FloatingPointError):
            raise Diverged(f"an array (jax_debug_nans: {str(error).splitlines()[0]})", self.step, self.last_checkpoint) from None
        return False

    def close(self):
        for part in (self.bar, *self.writers, self.envs, self.eval_envs):
            if part is not None:
                part.close()

    def steps(self):
        """The steps still to run, counted from 1 (env steps, after the offline steps if any)."""
        for step in range(self.start_step + 1, self.last_step + 1):
            self.step = step  # for the messages of a stop inside the step
            yield step

    def learns(self, step: int) -> bool:
        """Whether this step updates the agent (after --learning-starts, or a resumed run's refill); the first True
        starts the clock of `learn_sps`."""
        if step <= self.meta["updates_from"]:
            return False
        if self.learn_start is None:
            self.learn_start = time.time()
        return True

    def check_update(self, step: int, info: dict) -> None:
        """Stop the run (Diverged) if a metric of the update is NaN or infinite; count it toward `learn_sps`."""
        self.n_updates += self.learn_start is not None
        check_metrics(info, step, self.last_checkpoint, self.seeds)

    def log(self, step: int, episodes: list, info: dict | None) -> None:
        """Each finished episode; every --log-every steps SPS (per seed, since the start), SPS_window (the last
        --log-every steps, evaluation excluded) and the latest update's metrics; the progress bar."""
        args = self.args
        for i, episode in enumerate(episodes):
            if episode is not None:
                self.last_return[i] = float(episode["r"])
                self.returns[i].append(self.last_return[i])
                self.writers[i].add_scalar("charts/episodic_return", self.last_return[i], step)
                self.writers[i].add_scalar("charts/episodic_length", int(episode["l"]), step)
                if "success" in episode:
                    self.writers[i].add_scalar("charts/success", episode["success"], step)
        if step % args.log_every == 0:
            now = time.time()
            sps, window_sps = int(step / (now - self.start)), int((step - self.window_step) / (now - self.window_start))
            self.window_start, self.window_step = now, step
            values = {} if info is None else {k: v for k, v in jax.device_get(info).items() if k != "finite"}
            for i, writer in enumerate(self.writers):
                writer.add_scalar("charts/SPS", sps, step)
                writer.add_scalar("charts/SPS_window", window_sps, step)
                for tag, value in metric_scalars(values, i, self.vector_tags):
                    writer.add_scalar(tag, value, step)
            self.postfix["sps"] = window_sps * len(self.seeds)  # the bar shows all seeds' total
        if any(e is not None for e in episodes) or step % args.log_every == 0:
            returns = self.last_return
            self.postfix["return"] = f"{np.nanmean(returns):.1f}" if not np.all(np.isnan(returns)) else "nan"
            self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(1)

    def maybe_evaluate(self, step: int, act, actor_params, now: bool = False) -> None:
        """Every --eval-every steps (and when `now`): --eval-episodes episodes per seed of `act(actor_params, obs,
        keys)`, logged as eval/episodic_return (and eval/success_rate). Seeded by the step alone, so a resumed run
        evaluates as an uninterrupted one; its time counts in neither SPS_window nor learn_sps."""
        args, seeds = self.args, self.seeds
        if (step % args.eval_every and not now) or args.eval_episodes <= 0:
            return
        eval_start = time.time()
        videos = [[os.path.join(self.run_dir, "videos", f"eval_step{step:010d}{'' if len(seeds) == 1 else f'_s{seed}'}.mp4")]
                  if args.capture_video else [] for seed in seeds]
        eval_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(self.k_eval, step)
        eval_returns, successes = evaluate(self.eval_envs, act, actor_params, self.on_seeds(eval_keys), args.eval_episodes,
                                           [seed + 10_000 + step for seed in seeds], videos)
        for writer, returns, success in zip(self.writers, eval_returns, successes):
            writer.add_scalar("eval/episodic_return", float(np.mean(returns)), step)
            if len(success) == len(returns):
                writer.add_scalar("eval/success_rate", float(np.mean(success)), step)
        self.postfix["eval"] = f"{np.mean(eval_returns):.1f}"
        self.bar.set_postfix(self.postfix, refresh=False)
        eval_time = time.time() - eval_start
        self.window_start += eval_time
        if self.learn_start is not None:
            self.learn_start += eval_time

    def maybe_checkpoint(self, step: int, agent, k_act, buf, obs) -> bool:
        """Checkpoint every --checkpoint-every steps, at the last step and on a signal; True: stop the loop."""
        args, signal = self.args, self._stop.signal
        periodic = args.checkpoint_every and (step % args.checkpoint_every == 0 or step == self.last_step)
        if periodic or signal:
            bad = first_nonfinite(agent, "agent", self.seeds)
            if bad:
                raise Diverged(f"parameter {bad}", step, self.last_checkpoint)
            for writer in self.writers:  # the logs up to this step are on disk before the checkpoint that follows them
                writer.flush()
            self.meta.update(elapsed=time.time() - self.start, last_return=self.last_return)
            payload = training_checkpoint(self.algo, args, step, {"agent": agent, "k_act": k_act},
                                          buf if args.checkpoint_buffer else None, self.envs, obs, self.meta)
            self.last_checkpoint = save_checkpoint(self.run_dir, step, payload, args.keep_checkpoints)
        if signal:
            self.stopped = signal
        return bool(signal)

    # ---- the end -------------------------------------------------------------------------------

    def finish(self, agent, update, model_config, model_params: dict) -> dict:
        """After the loop: --save-model writes each seed's `model_params` with the `model_config` arguments to its
        log folder; prints the summary and returns it (`update`: the jitted update(s), for their compile count)."""
        args, seeds, S = self.args, self.seeds, len(self.seeds)
        jax.block_until_ready(agent)
        end = time.time()
        compiles = sum(u._cache_size() for u in (update if isinstance(update, tuple) else (update,)))
        if args.save_model and not self.stopped:
            for i, log_dir in enumerate(self.log_dirs):
                path = os.path.join(log_dir, f"{args.exp_name}.msgpack")
                save_model(path, self.algo, {k: getattr(args, k) for k in model_config}, per_seed(model_params, i))
                print(f"model of seed {seeds[i]} saved to {path}")
        learn_sps = self.n_updates / (end - self.learn_start) if self.learn_start is not None else float("nan")
        if self.stopped:
            print(f"{self.stopped}: stopped after step {self.step}; checkpoint {self.last_checkpoint}; to continue: "
                  f"python {self.script} --resume {self.run_dir}")
        else:
            print(f"{self.last_step} steps x {S} seed(s) in {end - self.start:.0f} s ({learn_sps * S:.1f} env steps/s in "
                  f"all while learning, evaluation excluded); update compiled {compiles} time(s); logs in {self.log_dirs[0]}"
                  + (f" and {S - 1} more" if S > 1 else ""))
        return {"run_dir": self.run_dir, "log_dirs": self.log_dirs, "compiles": compiles, "returns": self.returns,
                "learn_sps": learn_sps, "total_sps": learn_sps * S, "stopped": self.stopped,
                "checkpoint": self.last_checkpoint, "agent": agent}


# ---- The rest of a script's command line: --resume, --eval-only, exit statuses -----------------------------------


def prepare_resume(args, algo: str, model_config, check_args, renamed: dict | None = None, before: dict | None = None):
    """Read --resume and adopt the run's arguments (refusing a checkpoint older than a setting in
    `model_config`; `renamed`: {name in older checkpoints: name now}; `before`: {argument older checkpoints lack:
    the value they ran with}, so that a changed default does not change a resumed run), then check them as a new
    run's; returns the (path, checkpoint) TrainingRun takes."""
    path, ckpt = read_resume(args, algo, type(args)(), renamed, before)
    refuse_older(ckpt["args"], model_config, path, "--resume", algo)
    check_args(args)
    return path, ckpt


def eval_only(args, algo: str, model_config, load_actor) -> None:
    """--eval-only: adopt --checkpoint's `model_config` settings, rebuild its actor with `load_actor(args, obs_dim,
    act_dim, raw) -> (params, act)` (raw: load_model's parameters), evaluate it and print the mean return."""
    config, raw = load_model(args.checkpoint, algo, model_config, args.seed)
    adopt_saved_args(args, config, type(args)(), model_config, "--checkpoint")
    check_env_id(args.env_id)
    env = SeedEnvs(args.env_id, [args.seed], render=args.capture_video)
    try:
        if args.capture_video:
            env.render_check()
        params, act = load_actor(args, env.observation_space.shape[0], env.action_space.shape[0], raw)
        folder = os.path.abspath(args.checkpoint)  # the videos go to the videos/ folder of the checkpoint's run
        folder = folder if os.path.isdir(folder) else os.path.dirname(folder)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        videos = [os.path.join(run_folder(folder) or folder, "videos", f"eval_only_{stamp}_episode{i}.mp4")
                  for i in range(args.eval_episodes)] if args.capture_video else []
        params, key = jax.tree_util.tree_map(lambda x: x[None], (params, jax.random.PRNGKey(args.seed)))
        (returns,), (successes,) = evaluate(env, act, params, key, args.eval_episodes, [args.seed], [videos])
    finally:
        env.close()
    print(f"{args.env_id}: eval return {np.mean(returns):.2f} +- {np.std(returns):.2f} over {len(returns)} episodes"
          + (f", success rate {np.mean(successes):.2f}" if len(successes) == len(returns) else ""))
    if videos:
        print(f"videos written to {os.path.dirname(videos[0])}")


class ExitStatus:
    """`with ExitStatus(__file__) as status:` around a script's work. Bad input (ConfigError): one line on stderr,
    status 2; a diverged run or an unwritable file (Diverged, OSError): one line, 1; a second Ctrl-C: 130.
    Anything else is a bug and keeps its traceback."""

    def __init__(self, script: str):
        self.name, self.code = os.path.basename(script), 0

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is None:
            return False
        if issubclass(kind, (ConfigError, Diverged, OSError)):
            self.code, message = 2 if issubclass(kind, ConfigError) else 1, f"error: {error}"
        elif issubclass(kind, KeyboardInterrupt):
            self.code, message = 130, "interrupted twice: stopped without writing a checkpoint"
        else:
            return False
        print(f"{self.name}: {message}", file=sys.stderr)
        return True
