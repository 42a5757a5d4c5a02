"""What a training checkpoint's replay buffer costs: size on disk and seconds to write and read.

Fills a buffer with real transitions of an env (uniform random actions, episodes reset as in
training), then packs it, writes it as the scripts do and reads it back, checking the round trip.
The agent's arrays are small next to the buffer (about 20 MB at the authors' sizes).

    python benchmarks/checkpoint_cost.py --env-id Humanoid-v4 --transitions 100000
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", default="Humanoid-v4")
    parser.add_argument("--transitions", type=int, default=100_000)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "checkpoint_cost_cpu.md"))
    opts = parser.parse_args()

    import jax.numpy as jnp
    import numpy as np

    from common.buffer import ReplayBuffer, buffer_init
    from common.checkpoint import FORMAT, pack_buffer, read_container, unpack_buffer, write_atomic
    from common.env import make_env

    env = make_env(opts.env_id, 0)
    n, obs = opts.transitions, env.reset(seed=0)[0]
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    cols = {"obs": np.zeros((n, obs_dim), np.float32), "actions": np.zeros((n, act_dim), np.float32),
            "rewards": np.zeros(n, np.float32), "next_obs": np.zeros((n, obs_dim), np.float32),
            "terminated": np.zeros(n, np.float32)}
    for i in range(n):
        action = env.action_space.sample()
        nxt, reward, terminated, truncated, _ = env.step(action)
        cols["obs"][i], cols["actions"][i], cols["rewards"][i], cols["next_obs"][i], cols["terminated"][i] = (
            obs, action, reward, nxt, terminated)
        obs = env.reset()[0] if terminated or truncated else nxt
    buf = ReplayBuffer(**{k: jnp.asarray(v) for k, v in cols.items()}, pos=jnp.asarray(0, jnp.int32),
                       size=jnp.asarray(n, jnp.int32))
    raw = sum(v.nbytes for v in cols.values())

    start = time.perf_counter()
    packed = pack_buffer(buf)
    t_pack = time.perf_counter() - start
    with tempfile.TemporaryDirectory(dir=ROOT) as folder:
        path = os.path.join(folder, "buffer.ckpt")
        start = time.perf_counter()
        write_atomic(path, {"format": FORMAT, "buffer": packed})
        t_write = time.perf_counter() - start
        size = os.path.getsize(path)
        start = time.perf_counter()
        restored = unpack_buffer(buffer_init(n, obs_dim, act_dim), read_container(path, "x")["buffer"], path)
        t_read = time.perf_counter() - start
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(buf, restored))

    line = (f"| {opts.env_id} | {n} | {raw / 2**20:.0f} | {size / 2**20:.0f} | {size / raw:.2f} | {t_pack:.1f} | "
            f"{t_write:.1f} | {t_read:.1f} |")
    text = (f"# Replay buffer in a checkpoint ({os.cpu_count()}-core {platform.machine()} CPU, "
            f"{time.strftime('%Y-%m-%d')})\n\n`python benchmarks/checkpoint_cost.py --env-id {opts.env_id} "
            f"--transitions {n}`\n\n| env | transitions | raw MiB | file MiB | ratio | pack s | write s | read+unpack s |\n"
            f"|---|---|---|---|---|---|---|---|\n{line}\n")
    os.makedirs(os.path.dirname(opts.out), exist_ok=True)
    with open(opts.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
